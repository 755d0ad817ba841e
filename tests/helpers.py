"""Test helpers written once, shared by every tier: settings, subprocess runs, waiting,
free ports, the cursors table, the record builder and table comparison."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import psycopg
import requests

from tests.conftest import fetch_one, fetch_rows
from worker.config import Settings
from worker.service import Outcome, run_consumer
from worker.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "sk-test-0c4f9b2a77"


def settings(sim: Simulator, dsn: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "SEQUIN_API_TOKEN": TOKEN,
        "SEQUIN_BASE_URL": sim.base_url,
        "DATABASE_URL": dsn,
        "SEQUIN_POLL_INTERVAL": 0.05,
        "SEQUIN_LOCK_RETRY_INTERVAL": 0.2,
    }
    values.update(over)
    return Settings(_env_file=None, **values)


def backfill(sim: Simulator, dsn: str, **over: Any) -> Outcome:
    """One in-process ``backfill`` against ``sim`` (settings as :func:`settings`)."""
    return run_consumer(settings(sim, dsn, **over), "backfill", threading.Event())


def worker_env(sim: Simulator, dsn: str, **over: str) -> dict[str, str]:
    """Environment for a ``python -m worker`` subprocess (nothing inherited that matters)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SEQUIN_") and k != "DATABASE_URL"
    }
    env.update(
        {
            "SEQUIN_API_TOKEN": TOKEN,
            "SEQUIN_BASE_URL": sim.base_url,
            "DATABASE_URL": dsn,
            "SEQUIN_POLL_INTERVAL": "0.05",
            "SEQUIN_LOCK_RETRY_INTERVAL": "0.2",
            "SEQUIN_LOG_FORMAT": "json",
            "SEQUIN_HTTP_PORT": "0",
        }
    )
    env.update(over)
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 120, *, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """``python -m worker ARGS`` to its end, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_cli(
    args: list[str], env: dict[str, str], *, output: IO[str] | None = None
) -> subprocess.Popen[str]:
    """``python -m worker ARGS`` started; its stdout and stderr piped, or both into ``output``."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=ROOT,
        stdout=output or subprocess.PIPE,
        stderr=output or subprocess.PIPE,
        text=True,
    )


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def assert_table_matches(
    dsn: str,
    expected: dict[tuple[str, str], dict[str, Any]],
    *,
    mode: str = "soft",
    schema: str = "sequin",
) -> None:
    """The records table equals the last version of every key in the stream."""
    rows = fetch_rows(dsn, schema)
    want = {k: v for k, v in expected.items() if mode == "soft" or not v["deleted"]}
    missing = want.keys() - rows.keys()
    extra = rows.keys() - want.keys()
    assert not missing and not extra, f"missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    for key, rec in want.items():
        row = rows[key]
        assert row["deleted"] == rec["deleted"], key
        assert row["upstream_updated_at"] == _ts(rec["upstream_updated_at"]), key
        assert row["data"] == rec.get("data"), key
        assert row["sync_id"] == rec.get("sync_id"), key


# --------------------------------------------------------------------------- waiting and ports


def wait_for(
    cond: Callable[[], Any], timeout: float = 30, what: str = "the condition", step: float = 0.05
) -> Any:
    """Poll ``cond`` until it returns something truthy and return that; fail naming ``what``.

    A ``requests`` error counts as "not yet" (a server still starting), and the last one is
    shown if time runs out."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except requests.RequestException as exc:
            last = exc
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(text: str, name: str) -> float:
    """Sum of all samples of ``name`` (any labels) in an exposition text."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} not exposed"
    return total


# --------------------------------------------------------------------------- the cursors table


class CursorRow(NamedTuple):
    cursor: str | None
    records_applied: int
    pages_applied: int
    dead_letters: int
    last_upstream_updated_at: datetime | None


def consumer_row(dsn: str, consumer: str = "default") -> CursorRow | None:
    """The consumer's row of ``sequin.cursors``, or None before its first commit."""
    row = fetch_one(
        dsn,
        "SELECT cursor, records_applied, pages_applied, dead_letters, last_upstream_updated_at "
        "FROM sequin.cursors WHERE consumer = %s",
        consumer,
    )
    return None if row is None else CursorRow(*row)


def cursor_row(dsn: str, consumer: str = "default") -> CursorRow:
    """The consumer's row of ``sequin.cursors``; fails the test if there is none."""
    row = consumer_row(dsn, consumer)
    assert row is not None, f"no cursor row for consumer {consumer!r}"
    return row


def stored_cursor(dsn: str, consumer: str = "default") -> str | None:
    row = consumer_row(dsn, consumer)
    return None if row is None else row.cursor


def terminate_backends(db: str, pattern: str) -> int:
    """``pg_terminate_backend`` every session of this database whose application_name matches."""
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE %s "
            "AND pid <> pg_backend_pid()",
            (pattern,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def view_columns(dsn: str, view: str) -> list[tuple[str, str]]:
    """(column name, data type) of a view in the ``sequin`` schema, in column order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'sequin' AND table_name = %s ORDER BY ordinal_position",
            (view,),
        ).fetchall()
    return [(str(n), str(t)) for n, t in rows]


# --------------------------------------------------------------------------- records

DROP = object()  # as an override, removes the field from the record


def record(
    upstream_id: str = "0018b000021BldZAAS",
    upstream_updated_at: str = "2024-11-10T18:39:00.070453Z",
    **over: Any,
) -> dict[str, Any]:
    """One record as the API sends it (the API document's example, every field);
    keyword overrides replace fields, ``DROP`` removes one."""
    base: dict[str, Any] = {
        "sync_id": "70a313f8-7c94-43d4-8d0c-5659a52de5c4",
        "collection_id": "salesforce:task",
        "upstream_id": upstream_id,
        "upstream_updated_at": upstream_updated_at,
        "data": {"activity_date": "2023-09-12", "n": 1},
        "deleted": False,
        "created_at": "2024-11-10T18:39:00.070453Z",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not DROP}
