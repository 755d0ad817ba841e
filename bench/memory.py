"""Does the worker's memory stay flat? Peak RSS of ``sequin-worker backfill`` by stream size.

    .venv/bin/python bench/memory.py                       # 100k and 500k records
    .venv/bin/python bench/memory.py --records 100000 1000000 --baseline

Same workload and database rules as ``bench/run.py`` (simulator in its own process, records/5
keys, ~0.8 KB records; ``DATABASE_URL`` or a throwaway Postgres; a fresh database per run).
Peak RSS comes from ``wait4`` (exact); when psutil is installed the RSS is also sampled every
0.25 s, to show the curve (at 25/50/75% of the run) and not only its top. Reports; asserts
nothing.
"""

from __future__ import annotations

import argparse
import sys
import threading

import harness
from harness import Databases, Running, SimulatorProcess, Table


class RssSampler:
    """Samples a process's RSS (MB) every ``interval`` seconds while it runs."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        try:
            import psutil
        except ImportError:
            return
        self._proc = psutil.Process(pid)
        self._error = psutil.Error
        self._interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.samples.append(self._proc.memory_info().rss / 2**20)
            except self._error:
                return

    def stop(self) -> None:
        self._stop.set()

    def at(self, share: float) -> str:
        if not self.samples:
            return "-"
        return f"{self.samples[min(len(self.samples) - 1, int(share * len(self.samples)))]:.0f}"


def measure(dbs: Databases, sim: SimulatorProcess, contender: str) -> list[str]:
    with dbs.fresh("mem") as (dsn, schema):
        running: Running = (
            harness.spawn_baseline(sim, dsn, schema)
            if contender == "baseline"
            else harness.spawn_worker(sim, dsn, schema)
        )
        sampler = RssSampler(running.proc.pid)
        res = running.result(1800)
        sampler.stop()
    print(
        f"  {contender} {res.records} records: peak RSS {res.peak_rss_mb:.0f} MB "
        f"({res.rate:.0f} records/s)",
        file=sys.stderr,
        flush=True,
    )
    return [
        contender,
        str(res.records),
        f"{res.wall:.1f}",
        f"{res.rate:.0f}",
        sampler.at(0.25),
        sampler.at(0.5),
        sampler.at(0.75),
        f"{res.peak_rss_mb:.0f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 500_000])
    parser.add_argument("--baseline", action="store_true", help="measure bench/baseline.py too")
    args = parser.parse_args()
    contenders = ["worker", "baseline"] if args.baseline else ["worker"]
    table = Table(
        ["contender", "records", "wall s", "rec/s", "RSS@25%", "RSS@50%", "RSS@75%", "peak MB"],
        left=1,
    )
    with harness.database_server() as (admin, where):
        dbs = Databases(admin)
        version = dbs.server_info()["server_version"]
        for n in args.records:
            with SimulatorProcess(n, n // 5) as sim:
                print(f"{sim.describe()}", file=sys.stderr, flush=True)
                for contender in contenders:
                    table.add(*measure(dbs, sim, contender))
    m = harness.machine_info()
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}); Python {m['python']}; "
        f"Postgres {version} ({where})"
    )
    print(table.render())
    peaks: dict[str, list[float]] = {}
    for r in table.rows:
        peaks.setdefault(r[0], []).append(float(r[-1]))
    for contender, values in peaks.items():
        if len(values) > 1:
            print(
                f"{contender}: peak RSS {values[0]:.0f} -> {values[-1]:.0f} MB "
                f"({(values[-1] / values[0] - 1) * 100:+.0f}%) from {args.records[0]} to "
                f"{args.records[-1]} records"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
