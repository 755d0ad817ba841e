"""The installed command end to end: backfill, run, reset, exit codes, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from tests.conftest import fetch_rows
from tests.helpers import (
    ROOT,
    TOKEN,
    assert_table_matches,
    backfill,
    free_port,
    run_cli,
    spawn_cli,
    stored_cursor,
    wait_for,
    worker_env,
)
from worker.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.sim(seed=11, records=3000)


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


def test_cli_simulate_serves_and_stops_on_sigterm(tmp_path: object) -> None:
    import requests

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


def _answers(url: str) -> bool:
    import requests

    try:
        requests.get(url, timeout=1)
    except requests.ConnectionError:
        return False
    return True
