"""Database failures through the installed command: exit 6 and what to fix."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import fetch_rows
from tests.helpers import (
    run_cli,
    worker_env,
)
from tests.integration.test_failures import (
    SLOW_ROWS,
    admin,
    dbname,
    drop_roles,  # noqa: F401  (a fixture, used by name)
    limited_role,
)
from worker.simulator import Simulator

pytestmark = pytest.mark.sim(seed=7, records=120, record_size=100)


def test_backfill_with_a_batch_that_always_times_out_exits_6_without_fetching_again(
    sim: Simulator, db: str
) -> None:
    """Before: each timeout counted as a lost connection whose count reset at the next
    reconnect, so backfill retried for ever and fetched the same pages every time."""
    admin(db, SLOW_ROWS, f"ALTER DATABASE {dbname(db)} SET statement_timeout = '200ms'")
    env = worker_env(sim, db, SEQUIN_MAX_RETRIES="2", SEQUIN_PAGE_SIZE="40")
    proc = run_cli(["backfill"], env, timeout=60)
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert "3 attempts" in proc.stderr and "statement timeout" in proc.stderr
    assert "Traceback" not in proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    retries = [e for e in events if e["event"] == "db_retry"]
    assert [(e["class"], e["attempt"]) for e in retries] == [("resource", 1), ("resource", 2)]
    assert retries[1]["failing_s"] > retries[0]["failing_s"]
    first_page = [e for e in sim.request_log if "after_cursor" not in e.params]
    assert len(first_page) == 1  # the held pages were applied again, not fetched again
    assert fetch_rows(db) == {}


@pytest.mark.usefixtures("drop_roles")
@pytest.mark.parametrize(
    ("command", "where"),
    [("backfill", "batch"), ("run", "batch"), ("backfill", "migrations")],
)
def test_a_missing_privilege_stops_at_once_with_exit_6_and_what_to_fix(
    sim: Simulator, db: str, command: str, where: str
) -> None:
    """Before: the same exit 6, but with Postgres' message alone."""
    dsn = limited_role(db, can_migrate=where == "batch")
    env = worker_env(sim, dsn, SEQUIN_MAX_RETRIES="20", SEQUIN_AUTO_VIEWS="false")
    started = time.monotonic()
    proc = run_cli([command], env, timeout=60)
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert time.monotonic() - started < 20  # no retries: 20 of them would take minutes
    last = proc.stderr.strip().splitlines()[-1]
    assert "permission denied" in last and "42501" in last and "grant" in last, last
    assert ("records" in last) == (where == "batch"), last
    assert "Traceback" not in proc.stderr
    assert '"db_retry"' not in proc.stderr


def test_a_dropped_records_table_stops_at_once_with_exit_6_and_what_to_fix(
    sim: Simulator, db: str
) -> None:
    admin(db, "DROP TABLE sequin.records CASCADE")
    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_AUTO_VIEWS="false"), timeout=60)
    assert proc.returncode == 6, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "does not exist" in last and "42P01" in last and "SEQUIN_DB_SCHEMA" in last, last
    assert '"db_retry"' not in proc.stderr
