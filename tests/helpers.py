"""Helpers shared by the integration tests: settings, subprocess runs, table comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.conftest import fetch_rows
from worker.config import Settings
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
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
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
