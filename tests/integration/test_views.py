"""View upkeep never stalls ingestion, and views never silently change meaning (issue 9).

Black-box where it can be: ``python -m worker backfill|run`` against the simulator with
SEQUIN_AUTO_VIEWS=true while a test connection holds an open transaction that has read a view
(it holds ACCESS SHARE on the view until it ends, which every DROP/CREATE OR REPLACE VIEW must
wait for).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.helpers import (
    ROOT,
    free_port,
    run_cli,
    settings,
    spawn_cli,
    view_columns,
    wait_for,
    worker_env,
)
from worker.pg import sqlfiles
from worker.pg.views import Column, plan_columns
from worker.service import run_consumer
from worker.simulator import Simulator

VIEW = "sequin.acme_widget"


pytestmark = pytest.mark.sim(seed=7, records=0)


def _ts(n: int) -> str:
    return f"2030-01-01T00:00:{n:02d}Z"


def _events(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _read_view(dsn: str) -> int:
    """A new reader: must get its answer, not queue behind view DDL (10 s would be 'blocked')."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '10s'")
        row = conn.execute(f"SELECT count(*) FROM {VIEW}").fetchone()
    assert row is not None
    return int(str(row[0]))


def _hold_view(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """An analyst's open transaction that has read the view (ACCESS SHARE until it ends)."""
    reader = psycopg.connect(dsn)
    reader.execute(f"SELECT * FROM {VIEW}").fetchall()
    return reader


def _widget_with_new_key(sim: Simulator, dsn: str, env: dict[str, str]) -> None:
    """acme_widget exists with column ``name``; the stream then brings a new key ``price``,
    so the next refresh has DDL to do on a view."""
    sim.append([sim.make_record("acme:widget", "w1", _ts(1), {"name": "a"})])
    assert run_cli(["backfill"], env).returncode == 0
    assert [n for n, _ in view_columns(dsn, "acme_widget")] == [
        "upstream_id",
        "upstream_updated_at",
        "name",
    ]
    sim.append([sim.make_record("acme:widget", "w2", _ts(2), {"name": "b", "price": 2})])


def test_a_reader_of_a_view_never_stalls_a_backfill(sim: Simulator, db: str) -> None:
    env = worker_env(sim, db, SEQUIN_AUTO_VIEWS="true")
    _widget_with_new_key(sim, db, env)
    reader = _hold_view(db)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "backfill"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        try:
            # While the backfill runs, new readers of the view get their answer.
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the backfill did not exit"
                _read_view(db)
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "backfill complete" in out
        deferred = [e for e in _events(err) if e["event"] == "view_refresh_deferred"]
        assert [e["view"] for e in deferred] == [VIEW]
        assert _read_view(db) == 2  # the rows are in; the view kept its old columns
        assert "price" not in dict(view_columns(db, "acme_widget"))
    finally:
        reader.close()  # the analyst's transaction ends
    # The next refresh does what was deferred, with CREATE OR REPLACE: `name` keeps its place.
    proc2 = run_cli(["backfill"], env)
    assert proc2.returncode == 0, proc2.stderr
    refreshed = [e for e in _events(proc2.stderr) if e["event"] == "view_refreshed"]
    assert [(e["view"], e["action"]) for e in refreshed] == [(VIEW, "extended")]
    assert view_columns(db, "acme_widget") == [
        ("upstream_id", "text"),
        ("upstream_updated_at", "timestamp with time zone"),
        ("name", "text"),
        ("price", "numeric"),
    ]


def test_a_reader_of_a_view_never_stalls_the_service(
    sim: Simulator, db: str, tmp_path: Path
) -> None:
    port = free_port()
    env = worker_env(
        sim,
        db,
        SEQUIN_AUTO_VIEWS="true",
        SEQUIN_HTTP_PORT=str(port),
        SEQUIN_HEARTBEAT_TIMEOUT="3",
        # The heartbeat timeout must exceed one request's whole deadline and one lock wait.
        SEQUIN_DB_TIMEOUT="2",
        SEQUIN_REQUEST_TIMEOUT="1.5",
        SEQUIN_READ_TIMEOUT="1",
        SEQUIN_CONNECT_TIMEOUT="1",
    )
    _widget_with_new_key(sim, db, env)
    health = f"http://127.0.0.1:{port}/healthz"
    reader = _hold_view(db)
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log_file:
        proc = spawn_cli(["run"], env, output=log_file)
        try:
            wait_for(lambda: requests.get(health, timeout=2).json()["caught_up"] is True)
            # Well past the heartbeat timeout, while the keeper keeps being refused the lock:
            # the loop is alive and new readers of the view are served.
            until = time.monotonic() + 3
            while time.monotonic() < until:
                assert requests.get(health, timeout=5).status_code == 200
                assert _read_view(db) == 2
                time.sleep(0.1)
            assert "price" not in dict(view_columns(db, "acme_widget"))
            reader.close()
            # Retried on its own once the reader is gone.
            wait_for(lambda: "price" in dict(view_columns(db, "acme_widget")))
            assert requests.get(health, timeout=5).status_code == 200
        finally:
            reader.close()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
    assert code == 0
    events = _events(log_path.read_text())
    assert any(e["event"] == "view_refresh_deferred" for e in events)


def test_a_new_key_never_renames_an_old_column(sim: Simulator, db: str) -> None:
    env = worker_env(sim, db, SEQUIN_AUTO_VIEWS="true")
    sim.append([sim.make_record("acme:widget", "w1", _ts(1), {"id": 1, "name": "a"})])
    assert run_cli(["backfill"], env).returncode == 0
    # `ID` sanitises to `id` too (and sorts before it): it must not take `id` over.
    sim.append([sim.make_record("acme:widget", "w2", _ts(2), {"ID": "X-2", "id": 2, "name": "b"})])
    assert run_cli(["backfill"], env).returncode == 0
    assert view_columns(db, "acme_widget") == [
        ("upstream_id", "text"),
        ("upstream_updated_at", "timestamp with time zone"),
        ("id", "numeric"),
        ("name", "text"),
        ("id_2", "text"),
    ]
    with psycopg.connect(db) as conn:
        rows = conn.execute(f"SELECT id, id_2 FROM {VIEW} ORDER BY upstream_id").fetchall()
    assert [(int(str(a)), b) for a, b in rows] == [(1, None), (2, "X-2")]


def test_plan_columns_keeps_names_and_order() -> None:
    before = [Column("id", "id", "numeric"), Column("z", "z", "text")]
    after = plan_columns(
        [("ID", "string", False), ("a", "boolean", True), ("id", "null", True)], before
    )
    assert after == [
        Column("id", "id", "numeric"),  # only nulls in the sample: the type stays
        Column("z", "z", "text"),  # gone from the sample: the column stays
        Column("id_2", "ID", "text"),
        Column("a", "a", "boolean"),
    ]


NOT_TIMESTAMPS = [
    "now",
    "today",
    "tomorrow",
    "yesterday",
    "infinity",
    "-infinity",
    "epoch",
    "allballs",
    " now ",
    "2029-05-01",  # a date, no time
    "2029-05-01T10:00:00",  # no offset: its meaning would depend on the reader's TimeZone
    "2029-02-30T10:00:00Z",  # does not exist
    "Tue May 01 10:00:00 2029 UTC",
    "J2451187",
]


def test_only_iso_8601_timestamps_read_as_timestamptz(sim: Simulator, db: str) -> None:
    env = worker_env(sim, db, SEQUIN_AUTO_VIEWS="true")
    sim.append([sim.make_record("acme:widget", "w0", _ts(1), {"at": "2029-05-01T10:00:00Z"})])
    assert run_cli(["backfill"], env).returncode == 0
    assert dict(view_columns(db, "acme_widget"))["at"] == "timestamp with time zone"
    sim.append(
        [
            sim.make_record("acme:widget", f"w{i + 1:02d}", _ts(2), {"at": value})
            for i, value in enumerate(NOT_TIMESTAMPS)
        ]
    )
    # No refresh: the view still casts `at`, now over rows that hold no timestamp.
    assert run_cli(["backfill"], {**env, "SEQUIN_AUTO_VIEWS": "false"}).returncode == 0
    with psycopg.connect(db) as conn:
        rows = conn.execute(f"SELECT upstream_id, at FROM {VIEW} ORDER BY 1").fetchall()
        raw = conn.execute(
            "SELECT data ->> 'at' FROM sequin.records WHERE upstream_id <> 'w0' ORDER BY 1"
        ).fetchall()
    assert rows[0][1] is not None and rows[0][1].isoformat() == "2029-05-01T10:00:00+00:00"
    assert [r[1] for r in rows[1:]] == [None] * len(NOT_TIMESTAMPS)
    assert sorted(r[0] for r in raw) == sorted(NOT_TIMESTAMPS)  # the strings are kept


def test_the_keeper_never_lists_the_collections_of_the_records_table(
    sim: Simulator, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim.append(
        [
            sim.make_record(coll, f"{coll}-1", _ts(1), {"n": 1})
            for coll in ("acme:widget", "acme:gadget", "other:thing")
        ]
    )
    used: list[str] = []
    lock = threading.Lock()
    real = sqlfiles.query

    def spy(name: str, schema: str) -> Any:
        with lock:
            used.append(name)
        return real(name, schema)

    monkeypatch.setattr(sqlfiles, "query", spy)
    for _ in range(2):  # the second run refreshes at catch-up: the collections come from the
        # registry then, the first run's from its batches
        run_consumer(settings(sim, db, SEQUIN_AUTO_VIEWS="true"), "backfill", threading.Event())
    assert "view_key_types" in used
    assert not {"collections_present", "collections_all"} & set(used)
    for view in ("acme_widget", "acme_gadget", "other_thing"):
        assert dict(view_columns(db, view))["n"] == "numeric"


def test_the_views_command_covers_rows_stored_without_auto_views(sim: Simulator, db: str) -> None:
    sim.append(
        [
            sim.make_record(coll, f"{coll}-{i}", _ts(i), {"n": i})
            for coll in ("acme:widget", "acme:gadget", "other:thing")
            for i in range(3)
        ]
    )
    env = worker_env(sim, db, SEQUIN_AUTO_VIEWS="false")
    assert run_cli(["backfill"], env).returncode == 0
    assert not view_columns(db, "acme_widget")
    proc = run_cli(["views"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "sequin.acme_gadget: acme:gadget, 1 data columns",
        "sequin.acme_widget: acme:widget, 1 data columns",
        "sequin.other_thing: other:thing, 1 data columns",
    ]
    # Nothing changed: a second run does no DDL at all, so it takes no lock on any view.
    reader = _hold_view(db)
    try:
        again = run_cli(["views"], env, timeout=60)
    finally:
        reader.close()
    assert again.returncode == 0 and "deferred" not in again.stdout
    refreshed = [e for e in _events(again.stderr) if e["event"] == "view_refreshed"]
    assert refreshed == []  # "unchanged" is logged at debug level only


def test_a_type_change_recreates_the_view_keeping_names_and_order(sim: Simulator, db: str) -> None:
    env = worker_env(sim, db, SEQUIN_AUTO_VIEWS="true")
    sim.append([sim.make_record("acme:widget", "w1", _ts(1), {"price": 1, "name": "a"})])
    assert run_cli(["backfill"], env).returncode == 0
    sim.append([sim.make_record("acme:widget", "w2", _ts(2), {"price": "n/a", "name": "b"})])
    assert run_cli(["backfill"], {**env, "SEQUIN_AUTO_VIEWS": "false"}).returncode == 0
    proc = run_cli(["views"], env)
    assert proc.returncode == 0, proc.stderr
    refreshed = [e for e in _events(proc.stderr) if e["event"] == "view_refreshed"]
    assert [(e["view"], e["action"]) for e in refreshed] == [(VIEW, "recreated")]
    assert view_columns(db, "acme_widget") == [
        ("upstream_id", "text"),
        ("upstream_updated_at", "timestamp with time zone"),
        ("name", "text"),
        ("price", "text"),  # numbers and strings: text, same name, same place
    ]
