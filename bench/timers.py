"""Wall and CPU time per thread and stage of ``sequin-worker backfill``.

    .venv/bin/python bench/timers.py [--records 100000]

Runs the real CLI (``worker.cli.main(["backfill"])``) in this process with the timing
wrappers of bench/instrument.py (a measurement aid; see its TARGETS table), and reads the
CPU time of the writer's Postgres backend (from /proc, when the server is local) and of the
simulator. Workload: harness.workload (the simulator in its own process, ``DATABASE_URL`` or a
throwaway Postgres, a fresh database).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import harness
import instrument
from harness import Databases, SimulatorProcess, Table
from instrument import Timers


def run(dbs: Databases, sim: SimulatorProcess) -> Timers:
    """One instrumented backfill in this process; print the process-level totals."""
    from worker import cli

    timers = Timers()
    missing = instrument.install(timers)
    pg_cpu: dict[int, float] = {}  # backend pid -> its CPU seconds, last seen
    with dbs.fresh("prof") as (dsn, schema):
        env = harness.contender_env(sim, dsn, schema)
        saved, cwd = dict(os.environ), os.getcwd()
        os.environ.clear()
        os.environ.update(env)
        os.chdir(tempfile.gettempdir())  # as a contender: no stray .env file is read
        sim_cpu0 = harness.proc_cpu(sim.pid) or 0.0
        # A backend's CPU can only be read while it lives: sample every 50 ms.
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.05):
                for pid in timers.backend_pids:
                    if (cpu := harness.proc_cpu(pid)) is not None:
                        pg_cpu[pid] = cpu

        threading.Thread(target=watch, daemon=True).start()
        cpu0, w0 = time.process_time(), time.perf_counter()
        try:
            code = cli.main(["backfill"])
        finally:
            stop.set()
            os.environ.clear()
            os.environ.update(saved)
            os.chdir(cwd)
        wall, cpu = time.perf_counter() - w0, time.process_time() - cpu0
        sim_cpu = (harness.proc_cpu(sim.pid) or 0.0) - sim_cpu0
    if code != 0:
        raise RuntimeError(f"backfill exited {code}")

    harness.section("timers: sequin-worker backfill, instrumented, in this process")
    if missing:
        print("NOT TIMED (path not found; fix bench/instrument.py TARGETS): " + ", ".join(missing))
    print(f"process: {wall:.2f} s wall, {cpu:.2f} s CPU (all threads of the worker)")
    if pg_cpu:
        print(f"Postgres backend of the writer: {sum(pg_cpu.values()):.2f} s CPU (from /proc)")
    print(f"simulator process: {sim_cpu:.2f} s CPU")
    pages = sum(k * v for k, v in timers.batch_pages.items())
    print(
        f"batches: {sum(timers.batch_pages.values())} for {pages} pages; pages per batch "
        + ", ".join(f"{k}: {v}x" for k, v in sorted(timers.batch_pages.items()))
    )
    return timers


def _ratio(cpu: float, wall: float) -> str:
    return f"{cpu / wall:.2f}" if wall > 0.005 else ""


def table(
    timers: Timers,
    thread: str,
    total: tuple[float, float],
    parts: list[tuple[str, str]],
    note: str,
) -> None:
    """One thread's stages; a shown label indented by two spaces is nested inside the line
    above it and not counted again in "other"."""
    total_w, total_c = total
    t = Table(["stage", "calls", "wall s", "% wall", "CPU s", "CPU/wall"], left=1)
    covered_w = covered_c = 0.0

    def row(shown: str, calls: object, wall: float, cpu: float) -> None:
        share = f"{100 * wall / total_w:.1f}" if total_w > 0 else ""
        t.add(shown, calls, f"{wall:.2f}", share, f"{cpu:.2f}", _ratio(cpu, wall))

    for label, shown in parts:
        wall, cpu, calls = timers.get(thread, label)
        if not shown.startswith("  "):
            covered_w += wall
            covered_c += cpu
        row(shown, calls, wall, cpu)
    row("other (loop, grouping, logging, GIL waits)", "", total_w - covered_w, total_c - covered_c)
    row("= thread total", "", total_w, total_c)
    print(f"\n{note}")
    print(t.render())


def report(timers: Timers) -> None:
    """The two threads' tables, with the derived lines (HTTP = fetch - decode, and so on)."""
    fetch_w, fetch_c, fetch_n = timers.get("prefetch", "fetch_page (HTTP + decode)")
    dec_w, dec_c, _ = timers.get("prefetch", "decode (codec.decode_page)")
    timers.data[("prefetch", "HTTP")] = [fetch_w - dec_w, fetch_c - dec_c, fetch_n]
    table(
        timers,
        "prefetch",
        timers.threads.get("prefetch", (0.0, 0.0)),
        [
            ("HTTP", "HTTP request + read body"),
            ("decode (codec.decode_page)", "decode (codec: msgspec, exact fallback)"),
            ("validate (parse_page)", "validate (parse_page)"),
            ("put (blocked: queue full)", "put (blocked: queue full)"),
        ],
        "prefetch thread (fetches, decodes, validates); total: Prefetcher.start to its last put",
    )
    block_w, block_c, block_n = timers.get("MainThread", "COPY block")
    fin_w, fin_c, _ = timers.get("MainThread", "COPY finish (server ack)")
    timers.data[("MainThread", "COPY rows")] = [block_w - fin_w, block_c - fin_c, block_n]
    loop_w, loop_c, _ = timers.get("MainThread", "loop (SyncLoop.run)")
    table(
        timers,
        "MainThread",
        (loop_w, loop_c),
        [
            ("wait for a page", "wait for a page (queue empty)"),
            ("apply (one transaction)", "apply (one transaction)"),
            ("cursor fence", "  advance cursor (the fence, first statement)"),
            ("dedup (Batch.rows)", "  dedup (Batch.rows)"),
            ("COPY rows", "  COPY write_row loop (binary, set_types)"),
            ("COPY finish (server ack)", "  COPY finish (server ack)"),
            ("after COPY (upsert, deletes, notify)", "  INSERT..SELECT ON CONFLICT (+ deletes)"),
            ("commit", "  commit"),
        ],
        "applying thread (groups pages, one transaction per batch); total: SyncLoop.run",
    )
    print(
        "\nCPU/wall near 0: waiting (socket, Postgres, queue); near 1: running Python or C "
        "in this process. With two threads, wall time also includes waiting for the GIL."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    with harness.workload(args.records) as (dbs, sim):
        report(run(dbs, sim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
