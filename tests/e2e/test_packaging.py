"""The wheel carries its migrations: a worker installed with pip finds sql/ and works."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import fetch_rows
from tests.helpers import ROOT, TOKEN, worker_env
from worker.simulator import Simulator


def test_installed_wheel_backfills(tmp_path: Path, db: str) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = wheels.glob("sequin_worker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "worker/sql/queries.sql" in names
    assert "worker/sql/migrations/001_initial.sql" in names
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    with Simulator(token=TOKEN, seed=2, records=500) as sim:
        env = worker_env(sim, db, PYTHONPATH=str(site))
        where = subprocess.run(
            [sys.executable, "-c", "import worker; print(worker.__file__)"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        assert where.stdout.startswith(str(site))
        proc = subprocess.run(
            [sys.executable, "-m", "worker", "backfill"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert len(fetch_rows(db)) == len(sim.expected_state())
