"""Bad settings through the installed command: exit 2, one line per variable, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

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
