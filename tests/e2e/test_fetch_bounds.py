"""Fetch bounds through the installed command: deadlines, tokens, the pagination contract."""

from __future__ import annotations

import time

import pytest

from tests.conftest import fetch_rows
from tests.helpers import (
    TOKEN,
    assert_table_matches,
    consumer_row,
    run_cli,
    worker_env,
)
from worker.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.sim(seed=11, records=3000)


def test_backfill_against_a_trickling_api_gives_up_at_the_request_deadline(
    sim: Simulator, db: str
) -> None:
    """A byte every 0.2 s never trips the per-read timeout: only the total deadline ends
    the request, then the retry budget ends the backfill (exit 5) instead of hanging."""
    sim.faults = FaultConfig(rate_trickle=1.0, trickle_bytes=1, trickle_interval=0.2)
    env = worker_env(
        sim,
        db,
        SEQUIN_REQUEST_TIMEOUT="1.5",
        SEQUIN_READ_TIMEOUT="1",
        SEQUIN_CONNECT_TIMEOUT="1",
        SEQUIN_MAX_RETRIES="1",
    )
    started = time.monotonic()
    proc = run_cli(["backfill"], env, timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert time.monotonic() - started < 30
    assert "SEQUIN_REQUEST_TIMEOUT" in proc.stderr and "Traceback" not in proc.stderr
    assert [e.status for e in sim.request_log] == ["trickle", "trickle"]


def test_a_token_with_a_trailing_newline_works(sim: Simulator, db: str) -> None:
    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_API_TOKEN=TOKEN + "\n"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_table_matches(db, sim.expected_state())


def test_a_token_with_a_control_character_exits_2_naming_the_variable(
    sim: Simulator, db: str
) -> None:
    proc = run_cli(["run"], worker_env(sim, db, SEQUIN_API_TOKEN="sk-abc\x01def"), timeout=60)
    assert proc.returncode == 2
    assert "SEQUIN_API_TOKEN" in proc.stderr and "Traceback" not in proc.stderr
    assert "abc" not in proc.stderr + proc.stdout
    assert sim.request_log == []


def test_backfill_goes_on_after_short_pages_until_an_empty_page(sim: Simulator, db: str) -> None:
    sim.faults = FaultConfig(rate_short_page=1.0, seed=5)
    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_PAGE_SIZE="200"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "short_page" in [e.status for e in sim.request_log]
    assert_table_matches(db, sim.expected_state())
    row = consumer_row(db)
    assert row is not None and row[1] == 3000
    last = sim.request_log[-1]
    assert last.params.get("after_cursor") == row[0] and last.status == 200  # the empty page


@pytest.mark.parametrize("fault", ["cycle", "rewind"])
def test_a_cursor_going_back_exits_4_before_the_page_is_applied(
    sim: Simulator, db: str, fault: str
) -> None:
    """Page 3 goes back (a cursor handed out before, or records older than page 2 ended
    with): nothing of it is applied, the stored cursor is where page 2 ended, and every
    record was applied once."""
    sim.faults = FaultConfig(**{f"rate_{fault}": 1.0})  # type: ignore[arg-type]
    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_PAGE_SIZE="100"), timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("already given" if fault == "cycle" else "went back") in proc.stderr
    statuses = [e.status for e in sim.request_log]
    assert statuses == [200, 200, fault], statuses
    row = consumer_row(db)
    assert row is not None
    assert row[0] == sim.request_log[2].params["after_cursor"]  # where page 2 ended
    assert row[1] == 200
    assert len(fetch_rows(db)) <= 200
