"""Records/s of the unchanged ``sequin-worker backfill`` under settings that need no code change.

    .venv/bin/python bench/levers.py [--records 100000] [--repeat 3] [--only sync_commit gc]
    # A/B of two versions of the code (git archive changes nothing in the repository):
    mkdir -p /tmp/old && git archive <commit> worker sql | tar -x -C /tmp/old
    .venv/bin/python bench/levers.py --repeat 5 --only NONE --compare-tree /tmp/old

A lever varies one of: the environment (``PGOPTIONS``, ``SEQUIN_*``), a Python prelude run in
the worker's interpreter before the CLI (GC and switch-interval settings), or the schema after
``sequin-worker migrate``. Each repetition runs every lever once, in a rotated order, so that
load from other processes on the machine spreads over all levers instead of landing on a few.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import harness
import psycopg
from harness import Databases, ProcResult, SimulatorProcess, Table
from psycopg import sql


def _drop_low_cardinality_indexes(sim: SimulatorProcess, dsn: str, schema: str) -> None:
    """``sequin-worker migrate``, then drop the indexes on sync_id and provider (3 distinct
    values each)."""
    env = harness.contender_env(sim, dsn, schema)
    argv = [harness.PYTHON, "-m", "worker", "migrate"]
    subprocess.run(argv, env=env, cwd=tempfile.gettempdir(), capture_output=True, check=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for index in ("records_sync_id_idx", "records_provider_idx"):
            conn.execute(sql.SQL("DROP INDEX {}.{}").format(*map(sql.Identifier, (schema, index))))


@dataclass
class Lever:
    """A way to run the unchanged worker differently."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[SimulatorProcess, str, str], None] | None = None  # before the run
    prelude: str | None = None  # Python run in the worker's interpreter before the CLI


SYNC_OFF = {"PGOPTIONS": "-c synchronous_commit=off"}
GC_FREEZE = "import gc\ngc.freeze()\ngc.set_threshold(50_000, 20, 100)"
SWITCH = "import sys\nsys.setswitchinterval(0.0005)"

LEVERS: list[Lever] = [
    Lever("defaults (batch <= 5000, prefetch 8 pages)"),
    Lever("PGOPTIONS synchronous_commit=off", SYNC_OFF),
    Lever("SEQUIN_PREFETCH_PAGES=16 (batches up to 10 pages)", {"SEQUIN_PREFETCH_PAGES": "16"}),
    Lever("SEQUIN_BATCH_MAX_RECORDS=500 (a page a tx)", {"SEQUIN_BATCH_MAX_RECORDS": "500"}),
    Lever("SEQUIN_PREFETCH_PAGES=1", {"SEQUIN_PREFETCH_PAGES": "1"}),
    Lever("gc.freeze() + gc.set_threshold(50000, 20, 100)", prelude=GC_FREEZE),
    Lever("gc.disable() (reference only)", prelude="import gc\ngc.disable()"),
    Lever("sys.setswitchinterval(0.0005) (GIL hand-over)", prelude=SWITCH),
    Lever("schema: no sync_id/provider indexes", setup=_drop_low_cardinality_indexes),
    Lever(
        "prefetch 16 + sync_commit off + gc threshold",
        {"SEQUIN_PREFETCH_PAGES": "16", **SYNC_OFF},
        prelude=GC_FREEZE,
    ),
]


def run(
    dbs: Databases,
    sim: SimulatorProcess,
    repeat: int,
    only: list[str] | None,
    compare_tree: Path | None = None,
) -> None:
    """Run the levers (those whose name contains one of ``only``, plus the defaults) and print
    their medians. ``compare_tree``: a folder holding another ``worker/`` and ``sql/``, run as
    one more lever through PYTHONPATH: an A/B of two versions on the same workload."""
    levers = [
        lv
        for lv in LEVERS
        if not only or any(o in lv.name for o in only) or lv.name.startswith("defaults")
    ]
    if compare_tree is not None:
        path = os.pathsep.join(
            p for p in (str(compare_tree.resolve()), os.environ.get("PYTHONPATH")) if p
        )
        levers.append(Lever(f"worker/ from {compare_tree}", {"PYTHONPATH": path}))
    harness.section(f"levers without code changes ({repeat} interleaved runs each, median)")
    results: dict[str, list[ProcResult]] = {lv.name: [] for lv in levers}
    for r in range(repeat):
        for lever in levers[r % len(levers) :] + levers[: r % len(levers)]:
            with dbs.fresh("lever") as (dsn, schema):
                if lever.setup is not None:
                    lever.setup(sim, dsn, schema)
                running = harness.spawn_worker(sim, dsn, schema, prelude=lever.prelude, **lever.env)
                res = running.result(900)
            results[lever.name].append(res)
            print(f"  {lever.name}: {res.rate:.0f} records/s", file=sys.stderr, flush=True)
    base = statistics.median(r.rate for r in results[levers[0].name])
    t = Table(
        ["setting", "rec/s (wall)", "vs defaults", "range", "own rec/s", "CPU s", "RSS MB"], 1
    )
    for lever in levers:
        runs = results[lever.name]
        rate = statistics.median(r.rate for r in runs)
        t.add(
            lever.name,
            f"{rate:.0f}",
            f"{rate / base:.2f}",
            f"{min(r.rate for r in runs):.0f}-{max(r.rate for r in runs):.0f}",
            f"{statistics.median(r.own_rate for r in runs):.0f}",
            f"{statistics.median(r.cpu for r in runs):.1f}",
            f"{max(r.peak_rss_mb for r in runs):.0f}",
        )
    print(t.render())
    print(
        "own rec/s: the worker's summary line (start-up excluded); CPU s: the worker process. "
        "The schema row drops indexes that README lists as part of the public contract: an "
        "experiment, not advice."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per lever")
    parser.add_argument(
        "--only", nargs="+", help="only the levers whose name contains one of these (+ defaults)"
    )
    parser.add_argument(
        "--compare-tree",
        type=Path,
        metavar="DIR",
        help="also run the worker/ found in DIR (A/B of two versions)",
    )
    args = parser.parse_args()
    with harness.workload(args.records) as (dbs, sim):
        run(dbs, sim, args.repeat, args.only, args.compare_tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
