"""The operator's commands run as a subprocess: status, views, check, the progress line."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from tests.helpers import ROOT, TOKEN, backfill, run_cli, settings, view_columns, worker_env
from worker.service import run_consumer
from worker.simulator import FaultConfig, Simulator
from worker.sync import LoopState

pytestmark = pytest.mark.sim(seed=31, records=1500)


def test_status_json_and_table(sim: Simulator, db: str) -> None:
    backfill(sim, db, SEQUIN_PROVIDER="stripe", SEQUIN_CONSUMER="stripe-only")
    sim.append_raw('{"collection_id": "stripe:customer", "upstream_id": 5}')
    backfill(sim, db, SEQUIN_PROVIDER="stripe", SEQUIN_CONSUMER="stripe-only")
    env = worker_env(sim, db)
    proc = run_cli(["status", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (c,) = doc["consumers"]
    assert c["consumer"] == "stripe-only"
    assert c["filters"] == {"provider": "stripe"}
    assert c["records_applied"] == sim.record_count(provider="stripe")
    assert c["dead_letters"] == 1
    assert c["leader_alive"] is False
    assert c["lag_seconds"] > 0
    assert c["cursor"]
    colls = {x["collection_id"]: x for x in doc["collections"]}
    expected = sim.expected_state(provider="stripe")
    for coll, x in colls.items():
        assert x["live"] == sum(1 for k, v in expected.items() if k[0] == coll and not v["deleted"])
        assert x["deleted"] == sum(1 for k, v in expected.items() if k[0] == coll and v["deleted"])
    text = run_cli(["status"], env)
    assert text.returncode == 0
    assert "stripe-only" in text.stdout and "provider=stripe" in text.stdout
    assert "stripe:customer" in text.stdout and "leader" in text.stdout


def test_status_shows_the_live_leader(sim: Simulator, db: str) -> None:
    stop = threading.Event()
    state = LoopState()
    t = threading.Thread(
        target=run_consumer, args=(settings(sim, db), "run", stop), kwargs={"state": state}
    )
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not state.caught_up and time.monotonic() < deadline:
            time.sleep(0.05)
        doc = json.loads(run_cli(["status", "--json"], worker_env(sim, db)).stdout)
        (c,) = doc["consumers"]
        assert c["leader_alive"] is True
        assert c["leader"]["application_name"] == "sequin-worker-lock:default"
    finally:
        stop.set()
        t.join(15)


def test_status_without_schema_or_database(sim: Simulator, empty_db: str) -> None:
    proc = run_cli(["status"], worker_env(sim, empty_db))
    assert proc.returncode == 6
    assert "sequin-worker migrate" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["status"], worker_env(sim, "postgresql://x@127.0.0.1:1/none"))
    assert proc.returncode == 6 and "Traceback" not in proc.stderr


def test_views_follow_the_json_after_a_refresh(sim: Simulator, db: str) -> None:
    backfill(sim, db)
    assert "rating" not in dict(view_columns(db, "hubspot_deal"))
    sim.append([sim.make_record("hubspot:deal", "d-new", "2031-01-01T00:00:00Z", {"rating": 5})])
    backfill(sim, db)
    proc = run_cli(["views"], worker_env(sim, db))
    assert proc.returncode == 0, proc.stderr
    assert "sequin.hubspot_deal: hubspot:deal" in proc.stdout
    assert dict(view_columns(db, "hubspot_deal"))["rating"] == "numeric"


def test_a_relation_that_is_not_ours_is_left_alone(sim: Simulator, db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE sequin.stripe_customer (mine int)")
    backfill(sim, db)
    assert dict(view_columns(db, "stripe_customer")) == {"mine": "integer"}
    proc = run_cli(["views"], worker_env(sim, db))
    assert proc.returncode == 0
    assert "skipped sequin.stripe_customer" in proc.stdout


def test_backfill_shows_a_live_progress_line_on_a_terminal(db: str) -> None:
    with Simulator(token=TOKEN, seed=4, records=3000, faults=FaultConfig(latency=0.05)) as sim:
        env = worker_env(sim, db, SEQUIN_LOG_FORMAT="auto", SEQUIN_PAGE_SIZE="100")
        main, child = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "backfill"],
            env=env,
            cwd=ROOT,
            stdin=child,
            stdout=child,
            stderr=child,
            close_fds=True,
        )
        os.close(child)
        output = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        proc.wait(30)
        os.close(main)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "\r\x1b[Kbackfill: " in text and "/s, reached " in text
    assert "backfill complete: 3000 records" in text
    assert "page_applied" not in text  # per-batch events stay out of the way on a terminal


def test_check_all_green(sim: Simulator, db: str) -> None:
    proc = run_cli(["check"], worker_env(sim, db))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["✓", "configuration:"],
        ["✓", "API:"],
        ["✓", "database:"],
        ["✓", "migrations:"],
        ["✓", "consumer:"],
    ]


def test_check_reports_each_failure_with_a_hint(sim: Simulator, empty_db: str) -> None:
    proc = run_cli(["check"], worker_env(sim, empty_db, SEQUIN_API_TOKEN="sk-bad-token-xyz"))
    assert proc.returncode == 8
    out = proc.stdout
    assert "✗ API: the Sequin API rejected the token" in out
    assert "✗ migrations: schema sequin: pending" in out and "sequin-worker migrate" in out
    assert out.count("hint:") == 2
    assert "sk-bad-token-xyz" not in out + proc.stderr
    proc = run_cli(["check"], worker_env(sim, "postgresql://x@127.0.0.1:1/none"))
    assert proc.returncode == 8 and "✗ database:" in proc.stdout
    proc = run_cli(["check"], worker_env(sim, empty_db, SEQUIN_PAGE_SIZE="x"))
    assert proc.returncode == 8 and "✗ configuration: SEQUIN_PAGE_SIZE" in proc.stdout
