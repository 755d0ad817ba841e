"""Never stuck, never silently wrong, on the fetch side: the installed command and the
in-process service against the simulator's stalls and pagination faults."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from structlog.testing import capture_logs

from tests.helpers import (
    settings,
    terminate_backends,
    wait_for,
)
from worker.metrics import Metrics
from worker.ops import OpsServer
from worker.service import run_consumer
from worker.simulator import FaultConfig, Simulator
from worker.sync import LoopState

pytestmark = pytest.mark.sim(seed=11, records=3000)


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
