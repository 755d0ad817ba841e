"""/metrics, /healthz, /readyz: in-process and on two real `run` processes of one consumer."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.helpers import metric, settings, wait_for
from worker.metrics import Metrics
from worker.ops import OpsServer
from worker.service import run_consumer
from worker.simulator import Simulator
from worker.sync import LoopState

pytestmark = pytest.mark.sim(seed=21, records=2000)


def test_endpoints_in_process(sim: Simulator, db: str) -> None:
    state, metrics = LoopState(), Metrics("default")
    pings = {"ok": True}
    ops = OpsServer(
        "127.0.0.1",
        0,
        metrics=metrics,
        state=state,
        db_ping=lambda: pings["ok"],
        heartbeat_timeout=5,
    ).start()
    base = f"http://127.0.0.1:{ops.port}"
    try:
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 503  # not migrated yet
        stop = threading.Event()
        sim.append_raw('{"not": "a record"}')
        t = threading.Thread(
            target=run_consumer,
            args=(settings(sim, db), "run", stop),
            kwargs={"state": state, "metrics": metrics},
        )
        t.start()
        wait_for(lambda: state.caught_up)
        text = requests.get(f"{base}/metrics", timeout=5).text
        assert metric(text, "sequin_worker_records_applied_total") > 0
        assert metric(text, "sequin_worker_records_deleted_total") > 0
        assert metric(text, "sequin_worker_records_dead_lettered_total") == 1
        assert metric(text, "sequin_worker_records_received_total") == 2001
        assert metric(text, "sequin_worker_leader") == 1
        assert metric(text, "sequin_worker_caught_up") == 1
        assert metric(text, 'sequin_worker_api_requests_total{status="200"}') >= 5
        assert metric(text, "sequin_worker_batch_apply_duration_seconds_count") >= 1
        assert metric(text, "sequin_worker_last_commit_timestamp_seconds") > time.time() - 60
        assert metric(text, "sequin_worker_lag_seconds") > 0  # simulated history is old
        assert 'collection="stripe:customer"' in text
        health = requests.get(f"{base}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["leader"] is True
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
        pings["ok"] = False
        assert (
            requests.get(f"{base}/readyz", timeout=5).json()["reason"] == "database does not answer"
        )
        stop.set()
        t.join(15)
        assert not t.is_alive()
        text = requests.get(f"{base}/metrics", timeout=5).text
        assert metric(text, "sequin_worker_leader") == 0
        # A loop that shows no sign of life turns liveness red.
        state.heartbeat = time.monotonic() - 10
        stuck = requests.get(f"{base}/healthz", timeout=5)
        assert stuck.status_code == 503 and "heartbeat" in stuck.json()["error"]
        assert requests.get(f"{base}/nope", timeout=5).status_code == 404
    finally:
        ops.stop()
