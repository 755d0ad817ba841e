"""Sampled stacks of the unchanged ``python -m worker backfill`` (no wrapper, no patch).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/spy.py [--records 100000] [--out /tmp/sequin-spy] [--native]
    .venv/bin/python bench/spy.py --cprofile      # no py-spy needed; the applying thread only

py-spy samples the worker three times: ``--idle`` (wall time, idle stacks included), default
(on-CPU only) and ``--gil`` (only the thread holding the GIL); this prints the share of each
thread and its top functions. Raw stacks stay in ``--out`` (speedscope or flamegraph.pl render
them). ``--cprofile`` runs the worker under ``python -m cProfile`` instead: deterministic,
slower, and it sees the main (applying) thread only, not the prefetch thread.
"""

from __future__ import annotations

import argparse
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import harness
from harness import Databases, SimulatorProcess

_FRAME = re.compile(r"^(.*) \(([^()]*?)(?::\d+)?\)$")
# Inclusive functions worth listing: ours and the libraries on the hot path.
_OURS = ("worker/", "psycopg/", "requests/", "msgspec", "urllib3/", "json/")


def _func(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group(2)
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group(1)} ({path})"


def summarize(path: Path, top: int) -> None:
    """Samples per thread, then per thread its top leaf frames and top inclusive functions."""
    per_thread: Counter[str] = Counter()
    self_by: dict[str, Counter[str]] = defaultdict(Counter)
    incl_by: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = stack.partition(": ")[2].split(";")
        thread, funcs = parts[0], [_func(f) for f in parts[1:]]
        per_thread[thread] += n
        if funcs:
            self_by[thread][funcs[-1]] += n
        for f in set(funcs):
            incl_by[thread][f] += n
    total = sum(per_thread.values())
    print("samples per thread: " + ", ".join(f"{t} {n}" for t, n in per_thread.most_common()))
    for thread in ("MainThread", "prefetch"):
        n = per_thread.get(thread, 0)
        if not n:
            continue
        print(f"\n  {thread}: {n} samples ({100 * n / total:.0f}% of all)")
        print("  top self (leaf) frames:")
        for f, c in self_by[thread].most_common(top):
            print(f"    {100 * c / n:5.1f}%  {f}")
        print("  top inclusive functions (worker/ and library entry points):")
        ours = [(f, c) for f, c in incl_by[thread].most_common() if any(s in f for s in _OURS)]
        for f, c in ours[:top]:
            print(f"    {100 * c / n:5.1f}%  {f}")


BACKFILL = ["-m", "worker", "backfill"]


def _backfill(
    dbs: Databases, sim: SimulatorProcess, argv: list[str]
) -> subprocess.CompletedProcess[str]:
    """``argv`` (ending in :data:`BACKFILL`) into a fresh database, to completion."""
    with dbs.fresh("spy") as (dsn, schema):
        return subprocess.run(
            argv,
            env=harness.contender_env(sim, dsn, schema),
            cwd=tempfile.gettempdir(),
            capture_output=True,
            text=True,
            check=False,
        )


def _summary_line(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join(ln for ln in done.stdout.splitlines() if "complete" in ln)


def run_spy(dbs: Databases, sim: SimulatorProcess, out: Path, native: bool, top: int) -> bool:
    spy = shutil.which("py-spy") or str(Path(harness.PYTHON).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (.venv/bin/pip install py-spy); or use --cprofile")
        return False
    out.mkdir(parents=True, exist_ok=True)
    modes = {
        "idle": ["--idle"],  # every thread at every tick: shares of wall time
        "cpu": [],  # only threads running on a CPU
        "gil": ["--gil"],  # only the thread holding the GIL
    }
    ok = True
    for mode, flags in modes.items():
        raw = out / f"backfill-{mode}.txt"
        argv = [spy, "record", "--rate", "250", "--threads", "--format", "raw", "-o", str(raw)]
        argv += [*flags, *(["--native"] if native else []), "--", harness.PYTHON, *BACKFILL]
        done = _backfill(dbs, sim, argv)
        what = " ".join(flags) or "on-CPU samples"
        harness.section(f"py-spy ({mode}: {what}) {_summary_line(done)}")
        if done.returncode != 0 or not raw.exists():
            print(done.stderr[-2000:])
            ok = False
            continue
        summarize(raw, top)
    print(f"\nraw stacks: {out}/backfill-*.txt")
    return ok


def run_cprofile(dbs: Databases, sim: SimulatorProcess, out: Path, top: int) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    stats = out / "backfill.prof"
    done = _backfill(dbs, sim, [harness.PYTHON, "-m", "cProfile", "-o", str(stats), *BACKFILL])
    harness.section("cProfile (main thread: the applying thread) " + _summary_line(done))
    if done.returncode != 0 or not stats.exists():
        print(done.stderr[-2000:])
        return False
    # Own time of every function; cumulative time of ours only (else imports fill the top).
    for order, only in (("tottime", "."), ("cumulative", "/worker/")):
        print(f"\n  top {top} by {order} ({only}):")
        pstats.Stats(str(stats)).sort_stats(order).print_stats(only, top)
    print(f"profile: {stats} (snakeviz or `python -m pstats` read it)")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--cprofile", action="store_true", help="cProfile instead of py-spy")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sequin-spy")
    args = parser.parse_args()
    with harness.workload(args.records) as (dbs, sim):
        if args.cprofile:
            ok = run_cprofile(dbs, sim, args.out, args.top)
        else:
            ok = run_spy(dbs, sim, args.out, args.native, args.top)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
