"""End to end: the real client, store, lease and loop against the simulator and Postgres."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from tests.conftest import fetch_rows
from tests.helpers import (
    ROOT,
    TOKEN,
    assert_table_matches,
    free_port,
    run_cli,
    settings,
    spawn_cli,
    stored_cursor,
    wait_for,
    worker_env,
)
from worker.service import run_consumer
from worker.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.sim(seed=11, records=3000)


def backfill(sim: Simulator, dsn: str, **over: object):  # type: ignore[no-untyped-def]
    return run_consumer(settings(sim, dsn, **over), "backfill", threading.Event())


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


def test_cli_backfill_prints_a_summary_and_exits_0(sim: Simulator, db: str) -> None:
    proc = run_cli(["backfill"], worker_env(sim, db))
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("backfill complete: 3000 records in ")
    assert "records/s" in summary and "dead-lettered" in summary
    assert TOKEN not in proc.stdout + proc.stderr
    events = [
        json.loads(line)["event"] for line in proc.stderr.splitlines() if line.startswith("{")
    ]
    assert "page_applied" in events and "caught_up" in events


def test_cli_rejected_token_exits_3_fast(sim: Simulator, db: str) -> None:
    started = time.monotonic()
    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_API_TOKEN="sk-wrong-token-abc"))
    assert proc.returncode == 3
    assert time.monotonic() - started < 30
    assert "rejected the token" in proc.stderr and "Traceback" not in proc.stderr
    assert "sk-wrong-token-abc" not in proc.stderr + proc.stdout


def test_cli_consumer_with_other_filters_exits_2(sim: Simulator, db: str) -> None:
    backfill(sim, db, SEQUIN_PROVIDER="stripe")
    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_PROVIDER="hubspot"))
    assert proc.returncode == 2
    assert "created with filters" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_cursor_rejected_by_the_api_exits_4_and_applies_nothing(
    sim: Simulator, db: str
) -> None:
    backfill(sim, db)
    with psycopg.connect(db) as conn:
        conn.execute("UPDATE sequin.cursors SET cursor = 'garbage'")
    sim.append([sim.make_record("stripe:customer", "late", "2099-01-01T00:00:00Z", {})])
    proc = run_cli(["backfill"], worker_env(sim, db))
    assert proc.returncode == 4, proc.stderr
    assert "HTTP 400" in proc.stderr and "Traceback" not in proc.stderr
    assert stored_cursor(db) == "garbage"
    assert ("stripe:customer", "late") not in fetch_rows(db)


def test_cli_reset_starts_a_consumer_over(sim: Simulator, db: str) -> None:
    backfill(sim, db)
    env = worker_env(sim, db)
    assert run_cli(["reset"], env).returncode == 2  # refuses without --yes
    proc = run_cli(["reset", "--yes"], env)
    assert proc.returncode == 0 and "cursor deleted" in proc.stdout
    assert stored_cursor(db) is None
    assert backfill(sim, db).totals.received == 3000


def test_unreachable_database_exits_6_with_a_clear_message(sim: Simulator) -> None:
    env = worker_env(
        sim, "postgresql://nobody:pw-secret-99@127.0.0.1:1/none", SEQUIN_MAX_RETRIES="1"
    )
    proc = run_cli(["backfill"], env)
    assert proc.returncode == 6
    assert "database" in proc.stderr and "Traceback" not in proc.stderr
    assert "pw-secret-99" not in proc.stderr + proc.stdout


def test_run_serves_live_records_and_sigterm_exits_0(sim: Simulator, db: str) -> None:
    proc = spawn_cli(["run"], worker_env(sim, db))
    try:
        wait_for(
            lambda: (
                stored_cursor(db) is not None and len(fetch_rows(db)) == len(sim.expected_state())
            ),
            60,
        )
        key = ("hubspot:deal", "live-1")
        sim.append([sim.make_record(*key, "2099-01-01T00:00:00Z", {"amount": 5})])
        wait_for(lambda: key in fetch_rows(db), 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 10
    assert "Traceback" not in err
    assert_table_matches(db, sim.expected_state())


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
    from worker.migrations import migrate

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


def test_cli_simulate_serves_and_stops_on_sigterm(tmp_path: object) -> None:
    import requests

    from tests.helpers import ROOT

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "simulate",
            "--port",
            str(port),
            "--records",
            "50",
            "--token",
            "tok-sim",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/records"
        wait_for(lambda: _answers(url), 60)
        body = requests.get(
            url, params={"limit": 500}, headers={"Authorization": "Bearer tok-sim"}, timeout=5
        ).json()
        assert len(body["records"]) == 50
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"http://127.0.0.1:{port}" in out + err


def _answers(url: str) -> bool:
    import requests

    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True


def test_run_never_gives_up_on_transient_failures(sim: Simulator, db: str) -> None:
    """`run` is a service: past SEQUIN_MAX_RETRIES it keeps retrying (and stays healthy);
    only `backfill` gives up. Then SIGTERM still ends it cleanly."""
    import requests

    sim.faults = FaultConfig(rate_5xx=1.0)
    port = free_port()
    env = worker_env(sim, db, SEQUIN_MAX_RETRIES="1", SEQUIN_HTTP_PORT=str(port))
    down = worker_env(sim, "postgresql://x@127.0.0.1:1/none", SEQUIN_MAX_RETRIES="1")
    api_down, db_down = spawn_cli(["run"], env), spawn_cli(["run"], down)
    try:
        wait_for(lambda: len(sim.request_log) >= 4, timeout=30)  # well past 1 retry
        time.sleep(1)
        assert api_down.poll() is None and db_down.poll() is None
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200
        sim.faults = FaultConfig()
        wait_for(lambda: len(fetch_rows(db)) == len(sim.expected_state()), 60)
    finally:
        for proc in (api_down, db_down):
            proc.send_signal(signal.SIGTERM)
        results = [proc.communicate(timeout=15) for proc in (api_down, db_down)]
    assert [api_down.returncode, db_down.returncode] == [0, 0], results
    assert "api_retry" in results[0][1] and "db_retry" in results[1][1]
