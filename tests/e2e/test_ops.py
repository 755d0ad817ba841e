"""Two processes of one consumer: one leader."""

from __future__ import annotations

import signal
import time

import pytest
import requests

from tests.helpers import free_port, metric, spawn_cli, wait_for, worker_env
from worker.simulator import Simulator

pytestmark = pytest.mark.sim(seed=21, records=2000)


def test_two_processes_of_one_consumer_one_leader(sim: Simulator, db: str) -> None:
    ports = [free_port(), free_port()]
    procs = [spawn_cli(["run"], worker_env(sim, db, SEQUIN_HTTP_PORT=str(p))) for p in ports]
    try:
        for p in ports:
            wait_for(
                lambda p=p: (
                    requests.get(f"http://127.0.0.1:{p}/readyz", timeout=2).status_code == 200
                )
            )

        def leaders() -> list[float]:
            return [
                metric(
                    requests.get(f"http://127.0.0.1:{p}/metrics", timeout=2).text,
                    "sequin_worker_leader",
                )
                for p in ports
            ]

        wait_for(lambda: sorted(leaders()) == [0.0, 1.0])
        for p in ports:  # the standby is alive too
            assert requests.get(f"http://127.0.0.1:{p}/healthz", timeout=2).status_code == 200
        leader = ports[leaders().index(1.0)]
        text = requests.get(f"http://127.0.0.1:{leader}/metrics", timeout=2).text
        wait_for(
            lambda: (
                metric(
                    requests.get(f"http://127.0.0.1:{leader}/metrics", timeout=2).text,
                    "sequin_worker_records_received_total",
                )
                == 2000
            )
        )
        assert text
    finally:
        started = time.monotonic()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=15) for proc in procs]
        elapsed = time.monotonic() - started
        for proc in procs:
            proc.communicate()
    assert codes == [0, 0]
    assert elapsed < 10
