"""Never stuck, never silently wrong, on the fetch side: the installed command and the
in-process service against the simulator's stalls and pagination faults."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from structlog.testing import capture_logs

from tests.conftest import fetch_rows
from tests.helpers import (
    TOKEN,
    assert_table_matches,
    consumer_row,
    run_cli,
    settings,
    terminate_backends,
    wait_for,
    worker_env,
)
from worker.metrics import Metrics
from worker.ops import OpsServer
from worker.service import run_consumer
from worker.simulator import FaultConfig, Simulator
from worker.sync import LoopState

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


def test_a_fetch_stuck_past_the_heartbeat_timeout_turns_healthz_503(
    sim: Simulator, db: str
) -> None:
    """The applying thread waiting on the queue is not progress: with the API silent, the
    heartbeat goes stale (here the probe's timeout is shorter than one request), and it
    comes back once pages flow again."""
    state, metrics = LoopState(), Metrics("default")
    ops = OpsServer(
        "127.0.0.1", 0, metrics=metrics, state=state, db_ping=lambda: True, heartbeat_timeout=1.0
    ).start()
    url = f"http://127.0.0.1:{ops.port}/healthz"
    sim.faults = FaultConfig(rate_silent=1.0)
    stop = threading.Event()
    cfg = settings(sim, db, SEQUIN_REQUEST_TIMEOUT=30, SEQUIN_READ_TIMEOUT=30)
    t = threading.Thread(
        target=run_consumer, args=(cfg, "run", stop), kwargs={"state": state, "metrics": metrics}
    )
    t.start()
    try:
        wait_for(lambda: state.leader and sim.request_log, 20, "the first request")
        wait_for(lambda: requests.get(url, timeout=5).status_code == 503, 10, "healthz 503")
        assert "heartbeat" in requests.get(url, timeout=5).json()["error"]
    finally:
        stop.set()
        t.join(10)
        ops.stop()
    assert not t.is_alive(), "stopping did not end the stuck fetch"
    assert not [x for x in threading.enumerate() if x.name == "prefetch"]


def test_lost_leases_during_an_api_outage_leave_no_prefetch_thread_behind(
    sim: Simulator, db: str
) -> None:
    """Each session's halt ends its fetch and retry wait, so after several lost leases only
    the current session's prefetch thread remains."""
    sim.faults = FaultConfig(rate_5xx=1.0)
    stop = threading.Event()
    t = threading.Thread(target=run_consumer, args=(settings(sim, db), "run", stop))
    with capture_logs() as logs:
        t.start()
        try:
            for n in (1, 2, 3):
                wait_for(lambda: sessions(logs) >= n, 20, f"session {n}")  # noqa: B023
                wait_for(lambda: retries(logs) >= 2 * n, 20, "retries")  # noqa: B023
                if n < 3:
                    assert terminate_backends(db, "sequin-worker-lock:%") == 1
            time.sleep(0.5)
            prefetchers = [x for x in threading.enumerate() if x.name == "prefetch"]
            assert len(prefetchers) == 1, prefetchers
        finally:
            stop.set()
            t.join(15)
    assert not t.is_alive()
    assert not [x for x in threading.enumerate() if x.name == "prefetch"]


def sessions(logs: list[dict[str, object]]) -> int:
    return sum(1 for e in logs if e["event"] == "session_started")


def retries(logs: list[dict[str, object]]) -> int:
    return sum(1 for e in logs if e["event"] == "api_retry")


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
