"""Bad settings through the installed command: exit 2, one line per variable, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.unit.test_config import ALL_VARS


def test_cli_exits_2_with_one_line_per_variable_and_no_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARS}
    env.update({"SEQUIN_PAGE_SIZE": "0", "SEQUIN_API_TOKEN": "tok-secret-123"})
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "backfill"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
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
