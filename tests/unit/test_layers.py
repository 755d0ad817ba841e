"""The house's layers, checked from the outside: the domain and the loop load without the
HTTP stack, the Postgres driver or any adapter (the import-linter contracts in pyproject.toml
keep the source so; this proves it at run time, in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

DOMAIN_AND_LOOP = [
    "worker.errors",
    "worker.model",
    "worker.records",
    "worker.codec",
    "worker.paging",
    "worker.failures",
    "worker.config",
    "worker.ports",
    "worker.testing",
    "worker.prefetch",
    "worker.sync",
]
# Top-level names: the third-party stacks, and our adapters wherever they live.
FORBIDDEN = [
    "requests",
    "urllib3",
    "psycopg",
    "worker.api",
    "worker.http_deadline",
    "worker.pg",
    "worker.service",
]


def test_the_domain_and_the_loop_import_no_adapter() -> None:
    code = (
        f"import {', '.join(DOMAIN_AND_LOOP)}; import sys; "
        f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') "
        f"for f in {FORBIDDEN!r})); "
        "assert not bad, bad"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
