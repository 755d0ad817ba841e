"""End to end: the real client, store, lease and loop against the simulator and Postgres."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from tests.conftest import fetch_rows
from tests.helpers import (
    ROOT,
    TOKEN,
    assert_table_matches,
    backfill,
    stored_cursor,
)
from worker.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.sim(seed=11, records=3000)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_backfill_leaves_the_latest_version_of_every_key(
    sim: Simulator, db: str, mode: str
) -> None:
    outcome = backfill(sim, db, SEQUIN_DELETE_MODE=mode, SEQUIN_PAGE_SIZE=250)
    assert outcome.caught_up
    assert outcome.totals.received == 3000
    expected = sim.expected_state()
    assert any(r["deleted"] for r in expected.values())  # the data set has deletes
    assert_table_matches(db, expected, mode=mode)
    # The stored cursor is the end of the stream: the API hands it back with nothing after it.
    final = sim_final_cursor(sim, stored_cursor(db))
    assert final == stored_cursor(db)


def sim_final_cursor(sim: Simulator, cursor: object) -> object:
    import requests

    resp = requests.get(
        f"{sim.base_url}/v1/records",
        params={"after_cursor": cursor, "limit": 500},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    body = resp.json()
    assert body["records"] == []
    return body["cursor"]


def test_second_backfill_resumes_and_changes_nothing(sim: Simulator, db: str) -> None:
    backfill(sim, db)
    with psycopg.connect(db) as conn:
        before = conn.execute(
            "SELECT collection_id, upstream_id, synced_at FROM sequin.records"
        ).fetchall()
    cursor = stored_cursor(db)
    again = backfill(sim, db)
    assert again.totals.received == 0 and again.totals.upserted == 0
    with psycopg.connect(db) as conn:
        after = conn.execute(
            "SELECT collection_id, upstream_id, synced_at FROM sequin.records"
        ).fetchall()
    assert sorted(before) == sorted(after)
    assert stored_cursor(db) == cursor


def test_new_records_after_a_backfill_are_picked_up(sim: Simulator, db: str) -> None:
    backfill(sim, db)
    key = ("stripe:customer", "cus_new_1")
    sim.append([sim.make_record(*key, "2099-01-01T00:00:00Z", {"name": "new"})])
    outcome = backfill(sim, db)
    assert outcome.totals.received == 1
    assert fetch_rows(db)[key]["data"] == {"name": "new"}


@pytest.mark.parametrize(
    "filters",
    [
        {"SEQUIN_PROVIDER": "stripe"},
        {"SEQUIN_COLLECTION": "salesforce:task"},
        {"SEQUIN_SYNC_ID": None},
    ],
    ids=["provider", "collection", "sync_id"],
)
def test_filters(sim: Simulator, db: str, filters: dict[str, str | None]) -> None:
    if "SEQUIN_SYNC_ID" in filters:
        filters = {"SEQUIN_SYNC_ID": sim.sync_ids["hubspot"]}
    backfill(sim, db, **filters)
    api_filters = {k.removeprefix("SEQUIN_").lower(): v for k, v in filters.items()}
    expected = sim.expected_state(**api_filters)  # type: ignore[arg-type]
    assert expected and len(expected) < len(sim.expected_state())
    assert_table_matches(db, expected)


def test_sharded_consumers_write_one_table(sim: Simulator, db: str) -> None:
    for provider in ("stripe", "salesforce", "hubspot"):
        backfill(sim, db, SEQUIN_PROVIDER=provider, SEQUIN_CONSUMER=f"by-{provider}")
    assert_table_matches(db, sim.expected_state())


def test_malformed_records_are_dead_lettered_and_the_rest_applied(sim: Simulator, db: str) -> None:
    fragments = [
        '{"collection_id": "stripe:customer", "upstream_id": "bad-ts", "upstream_updated_at": '
        '"not-a-time", "data": {}, "deleted": false}',
        '"just a string"',
        '{"collection_id": "stripe:customer", "upstream_id": "nul", "upstream_updated_at": '
        '"2030-01-01T00:00:00Z", "data": {"k\\u0000": "v\\ud800"}, "deleted": false}',
        '{"upstream_id": "no-collection", "upstream_updated_at": "2030-01-01T00:00:00Z", '
        '"data": {}, "deleted": false}',
    ]
    for f in fragments:
        sim.append_raw(f)
    outcome = backfill(sim, db)
    assert outcome.totals.dead_lettered == 4
    with psycopg.connect(db) as conn:
        dead = conn.execute(
            "SELECT raw, reason, after_cursor FROM sequin.dead_letters ORDER BY id"
        ).fetchall()
    assert [json.loads(d[0]) for d in dead] == [json.loads(f) for f in fragments]
    assert all(d[2] for d in dead)  # the page's after_cursor, for replay
    rows = fetch_rows(db)
    assert rows[("stripe:customer", "nul")]["data"] == {"k\ufffd": "v\ufffd"}
    expected = sim.expected_state()
    assert_table_matches(
        db,
        {
            **expected,
            ("stripe:customer", "nul"): {
                "deleted": False,
                "upstream_updated_at": "2030-01-01T00:00:00Z",
                "data": {"k\ufffd": "v\ufffd"},
                "sync_id": None,
            },
        },
    )


def test_lost_database_connection_is_recovered(db: str) -> None:
    with Simulator(token=TOKEN, seed=5, records=6000, faults=FaultConfig(latency=0.02)) as sim:
        done: list[object] = []
        t = threading.Thread(
            target=lambda: done.append(
                backfill(sim, db, SEQUIN_PAGE_SIZE=100, SEQUIN_BATCH_MAX_RECORDS=100)
            )
        )
        t.start()
        kills = 0
        while t.is_alive() and kills < 3:
            time.sleep(0.3)
            with psycopg.connect(db, autocommit=True) as conn:
                n = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'sequin-worker%%' AND datname = current_database()"
                ).fetchone()
            kills += 1 if n and n[0] else 0
        t.join(120)
        assert done, "backfill did not finish"
        assert kills >= 1
        assert_table_matches(db, sim.expected_state())


def test_concurrent_migrations_apply_each_version_once(empty_db: str) -> None:
    from worker.pg.migrations import migrate

    errors: list[BaseException] = []
    applied: list[int] = []  # what each call says it applied, all calls together

    def go() -> None:
        try:
            with psycopg.connect(empty_db, autocommit=True) as conn:
                applied.extend(migrate(conn, "sequin"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # The oracle is the migrations directory, not the table: every numbered file applied by
    # exactly one of the four calls, and recorded once.
    versions = sorted(
        int(p.name.split("_", 1)[0]) for p in (ROOT / "sql" / "migrations").glob("*.sql")
    )
    assert versions, "no migrations found"
    assert sorted(applied) == versions
    with psycopg.connect(empty_db) as conn:
        table = [
            v for (v,) in conn.execute("SELECT version FROM sequin.schema_migrations ORDER BY 1")
        ]
    assert table == versions


def test_custom_schema(sim: Simulator, empty_db: str) -> None:
    backfill(sim, empty_db, SEQUIN_DB_SCHEMA="sync_data")
    assert_table_matches(empty_db, sim.expected_state(), schema="sync_data")
