"""Benchmark: sequin-worker backfill against a hand-written loop, on one simulated workload.

    .venv/bin/python bench/run.py                 # full run (~3-4 min on 2 cores)
    .venv/bin/python bench/run.py --quick         # no 1M run, one repetition (~1.5 min)
    .venv/bin/python bench/run.py --records 100000 500000 --json out.json

Workload: the simulator (``sequin-worker simulate``) in its own process on a free loopback
port, N records of ~0.8 KB over N/5 keys (updates of the same keys, ~5% deletes, equal
timestamps), no latency. Database: ``DATABASE_URL`` if set (a fresh database per contender,
or a fresh schema where the role may not CREATE DATABASE), else one throwaway embedded
Postgres for the whole run. Every contender is its own process; its peak RSS and CPU time
are its own (``wait4``).

Sections:

1. head to head at the first ``--records`` size: drain only (requests + orjson, no
   database: the ceiling), ``bench/baseline.py``, ``sequin-worker backfill``; median of
   ``--repeat`` runs, baseline and worker alternating who goes first.
2. the worker at every further ``--records`` size (is peak RSS flat?).
3. with ``--latency-ms`` of simulated API latency: drain, baseline, the worker as one
   consumer, and three consumers sharded by provider run concurrently (total records over
   the wall time from the first start to the last exit).

It reports; it asserts nothing about speed. Non-zero exit only if a contender fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import harness
from harness import Databases, ProcResult, SimulatorProcess, Table

PROVIDERS = ("stripe", "salesforce", "hubspot")
TIMEOUT = 900.0  # per contender, seconds


@dataclass
class Row:
    """One line of the report."""

    section: str
    contender: str
    records: int
    wall_s: float
    rate: float  # records / wall second, interpreter start-up included
    own_rate: float  # records / second by the contender's own timer (0: n/a)
    cpu_s: float
    peak_rss_mb: float
    runs: int = 1
    rate_min: float = 0.0
    rate_max: float = 0.0
    vs_baseline: float = 0.0

    @classmethod
    def of(cls, section: str, results: list[ProcResult], name: str | None = None) -> Row:
        """The median run by rate; peak RSS is the highest of all runs."""
        ordered = sorted(results, key=lambda r: r.rate)
        mid = ordered[(len(ordered) - 1) // 2]
        return cls(
            section=section,
            contender=name or mid.name,
            records=mid.records,
            wall_s=mid.wall,
            rate=statistics.median(r.rate for r in results),
            own_rate=statistics.median(r.own_rate for r in results),
            cpu_s=mid.cpu,
            peak_rss_mb=max(r.peak_rss_mb for r in results),
            runs=len(results),
            rate_min=ordered[0].rate,
            rate_max=ordered[-1].rate,
        )


def size(n: int) -> str:
    """100000 -> 100k, 1000000 -> 1M."""
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1_000_000:g}M"
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_one(dbs: Databases, label: str, sim: SimulatorProcess, contender: str) -> ProcResult:
    if contender == "drain":
        res = harness.spawn_drain(sim).result(TIMEOUT)
    else:
        with dbs.fresh(label) as (dsn, schema):
            spawn = harness.spawn_baseline if contender == "baseline" else harness.spawn_worker
            res = spawn(sim, dsn, schema).result(TIMEOUT)
    log(
        f"  {contender:<9} {res.records:>8} records  {res.wall:6.1f} s  {res.rate:7.0f}/s  "
        f"rss {res.peak_rss_mb:5.0f} MB"
    )
    return res


def head_to_head(dbs: Databases, n: int, repeat: int) -> list[Row]:
    section = f"{size(n)}, no latency"
    results: dict[str, list[ProcResult]] = {"drain": [], "baseline": [], "worker": []}
    with SimulatorProcess(n, n // 5) as sim:
        log(f"head to head: {sim.describe()} ({sim.command}, {sim.base_url})")
        harness.spawn_drain(sim).result(TIMEOUT)  # warms the simulator's caches; not counted
        for i in range(repeat):
            order = (
                ["drain", "baseline", "worker"] if i % 2 == 0 else ["drain", "worker", "baseline"]
            )
            for contender in order:
                results[contender].append(run_one(dbs, f"h{i}", sim, contender))
    rows = [Row.of(section, results[c], c) for c in ("drain", "baseline", "worker")]
    base = rows[1].rate
    for row in rows:
        row.vs_baseline = row.rate / base
    return rows


def scaling(dbs: Databases, sizes: list[int]) -> list[Row]:
    rows = []
    for n in sizes:
        with SimulatorProcess(n, n // 5) as sim:
            log(f"scaling: {sim.describe()}")
            rows.append(Row.of(f"{size(n)}, no latency", [run_one(dbs, "s", sim, "worker")]))
    return rows


def latency(dbs: Databases, n: int, latency_ms: float) -> list[Row]:
    section = f"{size(n)}, {latency_ms:g} ms"
    rows: list[Row] = []
    with SimulatorProcess(n, n // 5, latency_ms=latency_ms) as sim:
        log(f"latency: {sim.describe()}")
        for contender in ("drain", "baseline", "worker"):
            rows.append(Row.of(section, [run_one(dbs, "l", sim, contender)], contender))
        with dbs.fresh("l3") as (dsn, schema):
            running = [
                harness.spawn_worker(
                    sim,
                    dsn,
                    schema,
                    name=f"worker[{p}]",
                    SEQUIN_PROVIDER=p,
                    SEQUIN_CONSUMER=f"bench-{p}",
                )
                for p in PROVIDERS
            ]
            shards = [r.result(TIMEOUT) for r in running]
    wall = max(r.ended for r in shards) - min(r.started for r in shards)
    records = sum(r.records for r in shards)
    for r in shards:
        log(f"  {r.name:<18} {r.records:>7} records  {r.wall:6.1f} s  rss {r.peak_rss_mb:.0f} MB")
    log(f"  3 shards: {records} records in {wall:.1f} s")
    rows.append(
        Row(
            section=section,
            contender="worker x3 by provider",
            records=records,
            wall_s=wall,
            rate=records / wall,
            own_rate=0.0,
            cpu_s=sum(r.cpu for r in shards),
            peak_rss_mb=max(r.peak_rss_mb for r in shards),
        )
    )
    base = rows[1].rate
    for row in rows:
        row.vs_baseline = row.rate / base
    return rows


def render(rows: list[Row]) -> str:
    table = Table(
        [
            "workload",
            "contender",
            "records",
            "wall s",
            "rec/s",
            "x baseline",
            "own rec/s",
            "CPU s",
            "peak RSS MB",
            "runs (rec/s range)",
        ]
    )
    for r in rows:
        spread = f"{r.runs} ({r.rate_min:.0f}-{r.rate_max:.0f})" if r.runs > 1 else "1"
        table.add(
            r.section,
            r.contender,
            r.records,
            f"{r.wall_s:.1f}",
            f"{r.rate:.0f}",
            f"{r.vs_baseline:.2f}" if r.vs_baseline else "",
            f"{r.own_rate:.0f}" if r.own_rate else "",
            f"{r.cpu_s:.1f}",
            f"{r.peak_rss_mb:.0f}",
            spread,
        )
    return table.render()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--records",
        type=int,
        nargs="+",
        help="workload sizes; the first is the head-to-head and latency workload, the worker "
        "runs at each (default 100000 1000000; --quick: 100000)",
    )
    parser.add_argument("--quick", action="store_true", help="skip 1M; one repetition")
    parser.add_argument("--repeat", type=int, help="head-to-head repetitions (default 3)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="default 50")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency section")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args()
    sizes: list[int] = args.records or ([100_000] if args.quick else [100_000, 1_000_000])
    repeat: int = args.repeat or (1 if args.quick else 3)

    started = time.monotonic()
    machine = harness.machine_info()
    rows: list[Row] = []
    with harness.database_server() as (admin, where):
        dbs = Databases(admin)
        pg = dbs.server_info()
        log(f"database: {where}; Postgres {pg['server_version']}")
        rows += head_to_head(dbs, sizes[0], repeat)
        rows += scaling(dbs, sizes[1:])
        if not args.no_latency:
            rows += latency(dbs, sizes[0], args.latency_ms)
        isolation = "database" if dbs.can_create_db else "schema"

    print()
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']}, "
        f"Linux {machine['kernel']}; Python {machine['python']}"
    )
    print(
        f"postgres: {pg['server_version']} ({where}; a fresh {isolation} per contender; "
        f"shared_buffers {pg['shared_buffers']}, synchronous_commit {pg['synchronous_commit']})"
    )
    print(
        "workload: simulator in its own process, ~0.8 KB records over records/5 keys "
        "(updates, ~5% deletes), limit 500"
    )
    print()
    print(render(rows))
    print()
    h2h = {r.contender: r for r in rows[:3]}
    print(
        f"worker / baseline at {sizes[0]} records: {h2h['worker'].rate / h2h['baseline'].rate:.2f}x"
        f" by wall time, {h2h['worker'].own_rate / h2h['baseline'].own_rate:.2f}x by their own"
        f" timers (start-up excluded); drain-only ceiling {h2h['drain'].rate:.0f} records/s"
    )
    workers = [r for r in rows if r.contender == "worker" and "no latency" in r.section]
    if len(workers) > 1:
        growth = ", ".join(f"{r.records}: {r.peak_rss_mb:.0f} MB" for r in workers)
        print(f"worker peak RSS by size: {growth}")
    lat = {r.contender: r for r in rows if "ms" in r.section}
    if lat:
        one, three = lat["worker"].rate, lat["worker x3 by provider"].rate
        print(
            f"at {args.latency_ms:g} ms latency: 3 consumers by provider {three:.0f} records/s "
            f"vs one consumer {one:.0f} ({three / one:.2f}x)"
        )
    print(
        "rec/s = records / wall time of the process (start-up included); own rec/s = the "
        "contender's summary line; CPU s = user+sys of the contender process"
    )
    print(f"total bench time {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "postgres": pg, "rows": [asdict(r) for r in rows]}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
