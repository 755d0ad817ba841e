"""Bad settings through the installed command: exit 2, one line per variable, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.unit.test_config import ALL_VARS


def test_cli_exits_2_with_one_line_per_variable_and_no_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARS}
    env.update({"SEQUIN_PAGE_SIZE": "0", "SEQUIN_API_TOKEN": "tok-secret-123"})
    proc = run_cli(["backfill"], env, timeout=60, cwd=tmp_path)  # no .env file there
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        "sequin-worker: config: SEQUIN_PAGE_SIZE: Input should be greater than or equal to 1"
        in lines
    )
    assert "sequin-worker: config: DATABASE_URL: required but not set" in lines
    assert len(lines) == 2
    assert "tok-secret-123" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "dsn",
    [
        "not-a-url",
        "mysql://root:s3cret-pw@127.0.0.1/db",
        "postgresql://root:s3cret-pw@127.0.0.1:5432/db?foo=bar",
    ],
)
def test_a_database_url_libpq_cannot_parse_exits_2_naming_it(tmp_path: Path, dsn: str) -> None:
    """Before: retried as a lost connection (for ever in `run`), with libpq's message quoting
    the DSN, password included."""
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARS}
    env.update({"SEQUIN_API_TOKEN": "tok", "DATABASE_URL": dsn, "SEQUIN_LOG_FORMAT": "json"})
    proc = run_cli(["backfill"], env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "sequin-worker: config: DATABASE_URL: not a valid PostgreSQL connection string" in (
        proc.stderr
    )
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    assert "db_retry" not in proc.stderr + proc.stdout
