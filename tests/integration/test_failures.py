"""Database failures against a real Postgres: each gets a class, an action and a budget.

The classes come from SQLSTATEs (worker.failures); here real errors are provoked (a tiny
statement_timeout with a slow trigger, a held row lock with lock_timeout, a role without
privileges, a dropped table) and the worker is checked end to end: what it retries, what
it stops on, what it tells the operator, and what /healthz and /metrics show meanwhile.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql

from tests.conftest import SCHEMA, fetch_rows
from tests.helpers import (
    TOKEN,
    assert_table_matches,
    metric,
    settings,
    wait_for,
)
from tests.integration.test_bad_input import dead_letters, spec_record
from tests.integration.test_store import T, apply_pages, make_store, raw
from worker.errors import StoreFailure
from worker.metrics import Metrics
from worker.ops import OpsServer
from worker.pg.migrations import migrate
from worker.service import run_consumer
from worker.simulator import Simulator
from worker.sync import LoopState

# -- the classification (pure) --------------------------------------------------------------


pytestmark = pytest.mark.sim(seed=7, records=120, record_size=100)


# -- real Postgres errors get their class -----------------------------------------------------


def admin(db: str, *statements: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def dbname(db: str) -> str:
    name = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    assert isinstance(name, str)
    return name


SLOW_ROWS = """
CREATE FUNCTION sequin.slow_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
CREATE TRIGGER slow_rows BEFORE INSERT OR UPDATE ON sequin.records
    FOR EACH ROW EXECUTE FUNCTION sequin.slow_rows();
"""


def test_a_statement_timeout_is_a_resource_failure_and_the_connection_serves_the_retry(
    db: str,
) -> None:
    admin(db, SLOW_ROWS, f"ALTER DATABASE {dbname(db)} SET statement_timeout = '100ms'")
    store = make_store(db)
    with pytest.raises(StoreFailure) as caught:
        apply_pages(store, [raw("a", T(1), 1)])
    assert (caught.value.failure_class, caught.value.sqlstate) == ("resource", "57014")
    assert "statement timeout" in str(caught.value)
    admin(db, "DROP TRIGGER slow_rows ON sequin.records")
    apply_pages(store, [raw("a", T(1), 1)])  # same connection, same position: it commits
    assert set(fetch_rows(db)) == {("stripe:customer", "a")}


def test_a_lock_timeout_is_transient(db: str) -> None:
    admin(db, f"ALTER DATABASE {dbname(db)} SET lock_timeout = '200ms'")
    store = make_store(db)
    with psycopg.connect(db) as holder:
        holder.execute("SELECT * FROM sequin.cursors FOR UPDATE")
        with pytest.raises(StoreFailure) as caught:
            apply_pages(store, [raw("a", T(1), 1)])
    assert (caught.value.failure_class, caught.value.sqlstate) == ("transient", "55P03")
    apply_pages(store, [raw("a", T(1), 1)])  # the lock is gone: the retry commits
    assert set(fetch_rows(db)) == {("stripe:customer", "a")}


# -- end to end: budget, exit codes, messages, /healthz and metrics ---------------------------


def limited_role(db: str, *, can_migrate: bool) -> str:
    """A role that may check the migrations (``can_migrate``) and move its cursor, but was
    never granted the records table. Dropped with the test's database (see drop_roles)."""
    role = f"sequin_lim_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(role).as_string(None)
    statements = [
        f"CREATE ROLE {ident} LOGIN",
        f"GRANT USAGE ON SCHEMA sequin TO {ident}",
        f"GRANT SELECT, INSERT, UPDATE ON sequin.cursors, sequin.schema_migrations TO {ident}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA sequin TO {ident}",
        f"REVOKE ALL ON sequin.records FROM {ident}",
    ]
    if can_migrate:
        statements += [
            f"GRANT CREATE ON DATABASE {dbname(db)} TO {ident}",
            f"GRANT CREATE ON SCHEMA sequin TO {ident}",
        ]
    admin(db, *statements)
    _roles.append((db, ident))
    info = psycopg.conninfo.conninfo_to_dict(db)
    info["user"] = role
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


_roles: list[tuple[str, str]] = []


@pytest.fixture
def drop_roles(db: str) -> Iterator[None]:  # after `db`, so that it runs before its drop
    yield
    while _roles:
        db, ident = _roles.pop()
        admin(db, f"DROP OWNED BY {ident}", f"DROP ROLE {ident}")


def test_run_keeps_retrying_a_failing_batch_but_healthz_and_metrics_show_it(
    sim: Simulator, db: str
) -> None:
    admin(db, SLOW_ROWS, f"ALTER DATABASE {dbname(db)} SET statement_timeout = '200ms'")
    state, metrics = LoopState(), Metrics("default")
    ops = OpsServer(
        "127.0.0.1", 0, metrics=metrics, state=state, db_ping=lambda: True, heartbeat_timeout=1
    ).start()
    base = f"http://127.0.0.1:{ops.port}"
    stop = threading.Event()
    t = threading.Thread(
        target=run_consumer,
        args=(settings(sim, db, SEQUIN_MAX_RETRIES=0, SEQUIN_PAGE_SIZE=40), "run", stop),
        kwargs={"state": state, "metrics": metrics},
    )
    t.start()
    try:
        wait_for(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 503)
        body = requests.get(f"{base}/healthz", timeout=5).json()
        assert body["failure_class"] == "resource" and "failing" in body["error"]
        assert time.monotonic() - state.heartbeat < 1  # the loop itself is alive
        text = requests.get(f"{base}/metrics", timeout=5).text
        assert metric(text, 'sequin_worker_batch_failures_total{class="resource"}') >= 2
        assert metric(text, "sequin_worker_batch_failing_seconds") > 0
        assert t.is_alive()  # run retries past SEQUIN_MAX_RETRIES
        # The cause goes away: the next attempt commits and health comes back.
        admin(db, "DROP TRIGGER slow_rows ON sequin.records")
        wait_for(lambda: state.caught_up)
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        text = requests.get(f"{base}/metrics", timeout=5).text
        assert metric(text, "sequin_worker_batch_failing_seconds") == 0
    finally:
        stop.set()
        t.join(30)
        ops.stop()
    assert not t.is_alive()
    assert_table_matches(db, sim.expected_state())


# -- grouping never changes the result (README, "Guarantees") -------------------------------

REFUSE = """
CREATE FUNCTION sequin.refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.data->>'refuse' = 'yes' THEN
        RAISE EXCEPTION 'refused by a test trigger' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_marked BEFORE INSERT OR UPDATE ON sequin.records
    FOR EACH ROW EXECUTE FUNCTION sequin.refuse_marked();
"""


PLAN_KEYS = {"newest-refused", "oldest-refused", "two-refused", "all-refused", "plain"}


def versions_stream() -> list[dict[str, Any]]:
    """Keys whose versions Postgres partly refuses: (key, second, refused?)."""
    plan = [
        ("newest-refused", 1, False),
        ("newest-refused", 2, True),
        ("oldest-refused", 3, True),
        ("oldest-refused", 4, False),
        ("two-refused", 5, False),
        ("two-refused", 6, True),
        ("two-refused", 7, True),
        ("all-refused", 8, True),
        ("all-refused", 9, True),
        ("plain", 10, False),
    ]
    out = []
    for uid, sec, refused in plan:
        data = {"id": uid, "n": sec, **({"refuse": "yes"} if refused else {})}
        out.append(spec_record(uid, 1000 + sec, data=data))
    return out


def test_the_table_does_not_depend_on_how_pages_were_grouped(db: str, empty_db: str) -> None:
    """Before: when the newest version of a key was refused in the row-by-row fallback, the
    older valid versions of the batch were neither stored nor dead-lettered, so one batch
    lost the key that one-record batches stored. Rule: a key gets the newest version that
    Postgres accepts; every newer version it refused is dead-lettered."""
    with psycopg.connect(empty_db, autocommit=True) as conn:
        migrate(conn, SCHEMA)
    results = []
    with Simulator(token=TOKEN, seed=3, records=30, record_size=100) as sim:
        sim.append(versions_stream())
        for dsn, size in ((db, 1), (empty_db, 100)):
            admin(dsn, REFUSE)
            outcome = run_consumer(
                settings(
                    sim,
                    dsn,
                    SEQUIN_PAGE_SIZE=size,
                    SEQUIN_BATCH_MAX_RECORDS=size,
                    SEQUIN_AUTO_VIEWS="false",
                ),
                "backfill",
                threading.Event(),
            )
            assert outcome.caught_up
            rows = {k[1]: v["data"]["n"] for k, v in fetch_rows(dsn).items() if k[1] in PLAN_KEYS}
            dead = sorted((d["upstream_id"], d["raw"]) for d in dead_letters(dsn))
            results.append((rows, dead, outcome.totals))
    (small_rows, small_dead, _), (big_rows, big_dead, big_totals) = results
    assert big_totals.pages == 1  # really one batch
    assert small_rows == big_rows
    assert big_rows == {"newest-refused": 1, "oldest-refused": 4, "two-refused": 5, "plain": 10}
    # Every refused version newer than what the key holds is a dead letter, either way.
    refused_newer = {("newest-refused", 2), ("two-refused", 6), ("two-refused", 7)}
    refused_newer |= {("all-refused", 8), ("all-refused", 9)}
    for dead in (small_dead, big_dead):
        got = {(uid, _n(raw_text)) for uid, raw_text in dead}
        assert refused_newer <= got, got


def _n(raw_text: str) -> int:
    return int(json.loads(raw_text)["data"]["n"])
