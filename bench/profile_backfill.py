"""Where does ``sequin-worker backfill`` spend its time? The evidence behind bench/PROFILE.md.

    .venv/bin/python bench/profile_backfill.py timers     # wall/CPU per thread and stage
    .venv/bin/python bench/profile_backfill.py py-spy     # sampled stacks (pip install py-spy)
    .venv/bin/python bench/profile_backfill.py levers     # settings that need no code change
    .venv/bin/python bench/profile_backfill.py micro      # per-record costs, COPY variants
    .venv/bin/python bench/profile_backfill.py all

Workload as in bench/run.py: the simulator in its own process (``--records``, default 100k,
over records/5 keys, ~0.8 KB, no latency), ``DATABASE_URL`` or a throwaway Postgres, a fresh
database per run.

* ``timers`` runs the real CLI (``worker.cli.main(["backfill"])``) in this process with
  timing wrappers around the stages (per batch or per page, never per record, so the
  overhead is small): wall and thread CPU time for each, per thread, plus the CPU time of
  the Postgres backend (from /proc, when the server is local) and of the simulator.
* ``py-spy`` samples ``python -m worker backfill`` three times: ``--idle`` (wall time, idle
  stacks included), default (on-CPU only) and ``--gil`` (only the thread holding the GIL);
  prints the share of each thread and the top functions. Raw stacks stay in ``--out``.
* ``levers`` reruns the CLI with settings that need no code change (synchronous_commit
  through PGOPTIONS, batch and prefetch sizes) and reports records/s for each.
* ``micro`` fetches real pages and times each per-record step of the worker in isolation
  (decode, timestamp parsing, UUID, re-serialising ``data``, validation, dedup), then COPY
  variants into a staging table (text as today, binary with set_types, timestamps as
  text, ``data`` passed through).

Nothing here changes the worker; wrappers are installed on the imported modules only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import harness
import orjson
import psycopg
import requests
from harness import Databases, SimulatorProcess, Table

try:  # optional: only for one line of the micro benchmark
    import msgspec
except ImportError:
    msgspec = None

F = TypeVar("F", bound=Callable[..., Any])
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a local process (all threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


# --------------------------------------------------------------------------- timers


class Timers:
    """Wall and thread-CPU seconds per (thread, stage), from wrappers."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        self._lock = threading.Lock()

    def add(self, label: str, wall: float, cpu: float) -> None:
        key = (threading.current_thread().name, label)
        with self._lock:
            slot = self.data[key]
            slot[0] += wall
            slot[1] += cpu
            slot[2] += 1

    def wrap(self, label: str | Callable[..., str], fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                name = label if isinstance(label, str) else label(*args, **kwargs)
                self.add(name, time.perf_counter() - w0, time.thread_time() - c0)

        return inner  # type: ignore[return-value]

    def get(self, thread: str, label: str) -> tuple[float, float, int]:
        w, c, n = self.data.get((thread, label), (0.0, 0.0, 0.0))
        return w, c, int(n)


class TimedQueue(queue.Queue[Any]):
    """The prefetch queue, timing how long the applying thread waits on it."""

    timers: Timers

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return super().get(block, timeout)
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return super().get(block, timeout)
        finally:
            self.timers.add("wait for a page", time.perf_counter() - w0, time.thread_time() - c0)


def instrument(timers: Timers, pg_pids: list[int], batch_pages: Counter[int]) -> None:
    """Install the wrappers on the worker's modules (this process only)."""
    from worker import api, sync
    from worker.pg import store

    names: dict[int, str] = {}
    init = store.PgStore.__init__

    def pg_init(self: store.PgStore, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        names.update({id(q): name for name, q in self._q.items()})

    store.PgStore.__init__ = pg_init  # type: ignore[method-assign]

    connect = store.PgStore.connect

    def pg_connect(self: store.PgStore) -> None:
        connect(self)
        pg_pids.append(self.conn.info.backend_pid)

    store.PgStore.connect = pg_connect  # type: ignore[method-assign]

    prefetch_init = sync.Prefetcher.__init__

    def p_init(self: sync.Prefetcher, *args: Any, **kwargs: Any) -> None:
        prefetch_init(self, *args, **kwargs)
        q = TimedQueue(maxsize=self.queue.maxsize)
        q.timers = timers
        self.queue = q

    sync.Prefetcher.__init__ = p_init  # type: ignore[method-assign]

    apply = store.PgStore.apply
    inside = threading.local()

    def count_apply(self: store.PgStore, batch: store.Batch) -> store.ApplyResult:
        batch_pages[len(batch.pages)] += 1
        inside.apply = True
        try:
            return apply(self, batch)
        finally:
            inside.apply = False

    def commit_label(*args: Any) -> str:
        return "commit" if getattr(inside, "apply", False) else "commit (outside apply)"

    w = timers.wrap
    store.PgStore.apply = w("apply (one transaction)", count_apply)  # type: ignore[method-assign]
    store.Batch.rows = w("dedup (Batch.rows)", store.Batch.rows)  # type: ignore[method-assign]
    store.PgStore._write_rows = w("COPY + upsert", store.PgStore._write_rows)  # type: ignore[method-assign]
    sync.SyncLoop._session = w("session", sync.SyncLoop._session)  # type: ignore[method-assign]
    sync.Prefetcher._run = w("thread", sync.Prefetcher._run)  # type: ignore[method-assign]
    sync.Prefetcher._put = w("queue put (blocked while full)", sync.Prefetcher._put)  # type: ignore[method-assign]
    sync.parse_page = w("validate (parse_page)", sync.parse_page)
    api.SequinClient._fetch_once = w("fetch (HTTP + decode)", api.SequinClient._fetch_once)  # type: ignore[method-assign]
    api.decode_page = w("orjson decode (decode_page)", api.decode_page)

    def exec_label(cur: Any, query: Any, *args: Any, **kwargs: Any) -> str:
        return "execute " + names.get(id(query), "other")

    psycopg.Cursor.execute = w(exec_label, psycopg.Cursor.execute)  # type: ignore[method-assign]
    psycopg.Copy.__exit__ = w("COPY finish", psycopg.Copy.__exit__)  # type: ignore[method-assign]
    psycopg.Transaction.__exit__ = w(commit_label, psycopg.Transaction.__exit__)  # type: ignore[method-assign]


def run_timers(dbs: Databases, sim: SimulatorProcess) -> None:
    """The real CLI in this process, instrumented."""
    from worker import cli

    timers = Timers()
    pg_pids: list[int] = []
    batch_pages: Counter[int] = Counter()
    instrument(timers, pg_pids, batch_pages)
    pg_cpu: dict[int, float] = {}  # backend pid -> its CPU seconds, last seen
    with dbs.fresh("prof") as (dsn, schema):
        env = {
            "SEQUIN_API_TOKEN": harness.TOKEN,
            "SEQUIN_BASE_URL": sim.base_url,
            "DATABASE_URL": dsn,
            "SEQUIN_DB_SCHEMA": schema,
            "SEQUIN_LOG_LEVEL": "warning",
            "SEQUIN_HTTP_PORT": "0",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        sim_cpu0 = proc_cpu(sim.pid) or 0.0
        # A backend's CPU can only be read while it lives: sample every 50 ms.
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.05):
                for pid in pg_pids:
                    if (c := proc_cpu(pid)) is not None:
                        pg_cpu[pid] = c

        threading.Thread(target=watch, daemon=True).start()
        cpu0, w0 = time.process_time(), time.perf_counter()
        try:
            code = cli.main(["backfill"])
        finally:
            stop.set()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        wall, cpu = time.perf_counter() - w0, time.process_time() - cpu0
        sim_cpu = (proc_cpu(sim.pid) or 0.0) - sim_cpu0
    if code != 0:
        raise RuntimeError(f"backfill exited {code}")

    section("timers: sequin-worker backfill, instrumented, in this process")
    print(f"process: {wall:.2f} s wall, {cpu:.2f} s CPU (all threads of the worker)")
    if pg_cpu:
        print(f"Postgres backend of the writer: {sum(pg_cpu.values()):.2f} s CPU (from /proc)")
    print(f"simulator process: {sim_cpu:.2f} s CPU")
    pages = sum(k * v for k, v in batch_pages.items())
    print(
        f"batches: {sum(batch_pages.values())} for {pages} pages; pages per batch "
        + ", ".join(f"{k}: {v}x" for k, v in sorted(batch_pages.items()))
    )

    def table(thread: str, whole: str, parts: list[tuple[str, str]], note: str) -> None:
        total_w, total_c, _ = timers.get(thread, whole)
        t = Table(["stage", "calls", "wall s", "% wall", "CPU s", "CPU/wall"], left=1)
        covered_w = covered_c = 0.0
        for label, shown in parts:
            pw, pc, n = timers.get(thread, label)
            if shown.startswith("  "):  # nested inside the previous line: not added again
                pass
            else:
                covered_w += pw
                covered_c += pc
            t.add(shown, n, f"{pw:.2f}", f"{100 * pw / total_w:.1f}", f"{pc:.2f}", _ratio(pc, pw))
        ow, oc = total_w - covered_w, total_c - covered_c
        t.add(
            "other (loop, grouping, logging)",
            "",
            f"{ow:.2f}",
            f"{100 * ow / total_w:.1f}",
            f"{oc:.2f}",
            _ratio(oc, ow),
        )
        t.add(
            "= thread total",
            "",
            f"{total_w:.2f}",
            "100.0",
            f"{total_c:.2f}",
            _ratio(total_c, total_w),
        )
        print(f"\n{note}")
        print(t.render())

    fetch_w, fetch_c, fetch_n = timers.get("prefetch", "fetch (HTTP + decode)")
    dec_w, dec_c, _ = timers.get("prefetch", "orjson decode (decode_page)")
    timers.data[("prefetch", "HTTP (request, body)")] = [fetch_w - dec_w, fetch_c - dec_c, fetch_n]
    table(
        "prefetch",
        "thread",
        [
            ("HTTP (request, body)", "HTTP request + read body"),
            ("orjson decode (decode_page)", "orjson decode"),
            ("validate (parse_page)", "validate (parse_page)"),
            ("queue put (blocked while full)", "put (blocked: queue full)"),
        ],
        "prefetch thread (fetches, decodes, validates)",
    )
    wr_w, wr_c, wr_n = timers.get("MainThread", "COPY + upsert")
    up_w, up_c, _ = timers.get("MainThread", "execute upsert_rows")
    fin_w, fin_c, _ = timers.get("MainThread", "COPY finish")
    timers.data[("MainThread", "COPY rows")] = [
        wr_w - up_w - fin_w,
        wr_c - up_c - fin_c,
        wr_n,
    ]
    table(
        "MainThread",
        "session",
        [
            ("wait for a page", "wait for a page (queue empty)"),
            ("apply (one transaction)", "apply (one transaction)"),
            ("execute advance_cursor", "  advance cursor (UPDATE)"),
            ("dedup (Batch.rows)", "  dedup (Batch.rows)"),
            ("COPY rows", "  COPY write_row loop (text)"),
            ("COPY finish", "  COPY finish (server ack)"),
            ("execute upsert_rows", "  INSERT..SELECT ON CONFLICT"),
            ("commit", "  commit"),
        ],
        "applying thread (groups pages, one transaction per batch)",
    )
    print(
        "\nCPU/wall near 0: waiting (socket, Postgres, queue); near 1: running Python or C "
        "in this process. With two threads, wall time also includes waiting for the GIL."
    )


def _ratio(cpu: float, wall: float) -> str:
    return f"{cpu / wall:.2f}" if wall > 0.005 else ""


# --------------------------------------------------------------------------- py-spy


_FRAME = re.compile(r"^(.*) \(([^()]*?)(?::\d+)?\)$")


def _func(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group(2)
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group(1)} ({path})"


def summarize_spy(path: Path, top: int) -> None:
    per_thread: Counter[str] = Counter()
    self_by: dict[str, Counter[str]] = defaultdict(Counter)
    incl_by: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        _, _, frames = stack.partition(": ")
        parts = frames.split(";")
        thread = parts[0]
        funcs = [_func(f) for f in parts[1:]]
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
        print("  top inclusive functions (worker/ and psycopg/requests entry points):")
        shown = 0
        for f, c in incl_by[thread].most_common():
            if any(s in f for s in ("worker/", "psycopg/", "requests/", "orjson", "urllib3/")):
                print(f"    {100 * c / n:5.1f}%  {f}")
                shown += 1
                if shown >= top:
                    break


def run_spy(dbs: Databases, sim: SimulatorProcess, out: Path, native: bool, top: int) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy")
        return
    out.mkdir(parents=True, exist_ok=True)
    modes = {
        "idle": ["--idle"],  # every thread at every tick: shares of wall time
        "cpu": [],  # only threads running on a CPU
        "gil": ["--gil"],  # only the thread holding the GIL
    }
    for mode, flags in modes.items():
        raw = out / f"backfill-{mode}.txt"
        with dbs.fresh("spy") as (dsn, schema):
            env = harness.base_env()
            env.update(
                {
                    "SEQUIN_API_TOKEN": harness.TOKEN,
                    "SEQUIN_BASE_URL": sim.base_url,
                    "DATABASE_URL": dsn,
                    "SEQUIN_DB_SCHEMA": schema,
                    "SEQUIN_LOG_LEVEL": "warning",
                    "SEQUIN_HTTP_PORT": "0",
                }
            )
            argv = [spy, "record", "--rate", "250", "--threads", "--format", "raw", "-o", str(raw)]
            argv += [*flags, *(["--native"] if native else []), "--"]
            argv += [sys.executable, "-m", "worker", "backfill"]
            done = subprocess.run(
                argv,
                env=env,
                cwd=tempfile.gettempdir(),
                capture_output=True,
                text=True,
                check=False,
            )
        summary = [ln for ln in done.stdout.splitlines() if "complete" in ln]
        section(f"py-spy ({mode}: {' '.join(flags) or 'on-CPU samples'}) {' '.join(summary)}")
        if done.returncode != 0 or not raw.exists():
            print(done.stderr[-2000:])
            continue
        summarize_spy(raw, top)
    print(f"\nraw stacks: {out}/backfill-*.txt (flamegraph.pl or speedscope can render them)")


# --------------------------------------------------------------------------- levers


def _drop_low_cardinality_indexes(dsn: str, schema: str) -> None:
    """Migrate, then drop the indexes on sync_id and provider (3 distinct values each)."""
    from psycopg import sql

    from worker import logs
    from worker.pg.migrations import migrate

    logs.configure("warning", "json")
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn, schema)
        for index in ("records_sync_id_idx", "records_provider_idx"):
            conn.execute(sql.SQL("DROP INDEX {}.{}").format(*map(sql.Identifier, (schema, index))))


@dataclass
class Lever:
    """A way to run the unchanged worker differently."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[str, str], None] | None = None  # (dsn, schema) before the run
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
    # Applied since: binary COPY with set_types, the cheap digit-run guard, no decoded
    # records kept alive until commit (see PROFILE.md, 'Applied').
]


def run_levers(
    dbs: Databases,
    sim: SimulatorProcess,
    repeat: int,
    only: list[str] | None,
    compare_tree: Path | None = None,
) -> None:
    """Each repetition runs every lever once, in a rotated order, so that load from other
    processes on the machine spreads over all levers instead of landing on a few.

    ``compare_tree``: a folder holding another ``worker/`` and ``sql/`` (e.g. ``git archive
    HEAD worker sql | tar -x -C DIR``), run as one more lever through PYTHONPATH: an A/B of
    two versions of the code on the same workload."""
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
    section(f"levers without code changes ({repeat} interleaved runs each, median)")
    results: dict[str, list[harness.ProcResult]] = {lv.name: [] for lv in levers}
    for r in range(repeat):
        for lever in levers[r % len(levers) :] + levers[: r % len(levers)]:
            with dbs.fresh("lever") as (dsn, schema):
                if lever.setup is not None:
                    lever.setup(dsn, schema)
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


# --------------------------------------------------------------------------- micro


def _best(fn: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _each(fn: Callable[[bytes], object], items: list[bytes]) -> None:
    for item in items:
        fn(item)


def _each_page(parse: Callable[..., object], pages: list[list[Any]]) -> None:
    for records in pages:
        parse(records, cursor="c", after_cursor=None)


def fetch_pages(sim: SimulatorProcess, n_pages: int) -> list[bytes]:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {harness.TOKEN}"
    bodies, cursor = [], None
    for _ in range(n_pages):
        params: dict[str, str | int] = {"limit": 500}
        if cursor:
            params["after_cursor"] = cursor
        body = http.get(sim.base_url + "/v1/records", params=params, timeout=60).content
        bodies.append(body)
        cursor = orjson.loads(body)["cursor"]
    return bodies


def run_micro(dbs: Databases, sim: SimulatorProcess, n_pages: int) -> None:
    from worker import records as rec
    from worker.model import Batch

    bodies = fetch_pages(sim, n_pages)
    docs = [orjson.loads(b) for b in bodies]
    raws = [r for d in docs for r in d["records"]]
    n = len(raws)
    section(f"micro: per-record costs on {n} real records ({n_pages} pages), best of 5")
    us = 1e6 / n
    t = Table(["step", "us/record", "s per 100k"], left=1)

    def add(name: str, seconds: float) -> None:
        t.add(name, f"{seconds * us:.2f}", f"{seconds * 1e5 / n:.3f}")

    # Each decoded page is dropped at once (the worker holds ~10 at most): keeping all 40
    # alive would mostly measure the cyclic GC walking them (see the gc line below).
    add("orjson.loads (page bodies)", _best(lambda: _each(orjson.loads, bodies)))
    add("json.loads, stdlib (baseline's)", _best(lambda: _each(json.loads, bodies)))
    add(
        "  orjson.loads, all 40 pages kept alive (GC)",
        _best(lambda: [orjson.loads(b) for b in bodies]),
    )
    page_lists = [d["records"] for d in docs]
    pages = [rec.parse_page(d["records"], cursor=d["cursor"], after_cursor=None) for d in docs]
    add(
        "parse_page (validate, all of it)",
        _best(lambda: _each_page(rec.parse_page, page_lists)),
    )
    stamps = [r["upstream_updated_at"] for r in raws]
    created = [r["created_at"] for r in raws if r.get("created_at")]
    both = stamps + created
    add("  datetime.fromisoformat x2", _best(lambda: [datetime.fromisoformat(s) for s in both]))
    add(
        "  parse_timestamp x2 (regex+fromisoformat)",
        _best(lambda: [rec.parse_timestamp(s, "t") for s in both]),
    )
    sync_ids = [r["sync_id"] for r in raws]
    add("  UUID(sync_id)", _best(lambda: [UUID(s) for s in sync_ids]))
    datas = [r["data"] for r in raws if isinstance(r.get("data"), dict)]
    add("  orjson.dumps(data).decode()", _best(lambda: [orjson.dumps(d).decode() for d in datas]))
    add("  _data_json (dumps + NUL check)", _best(lambda: [rec._data_json(d) for d in datas]))
    keys = [r["upstream_id"] for r in raws]
    add("  _BAD_CHARS scan of ids x2", _best(lambda: [rec._has_bad_chars(k) for k in keys * 2]))
    batches = [Batch(after_cursor=None, pages=pages[i : i + 4]) for i in range(0, len(pages), 4)]
    add("dedup (Batch.rows, 4-page batches)", _best(lambda: [b.rows() for b in batches]))
    decode_raw = _msgspec_raw_decoder()
    if decode_raw is not None:
        add(
            "msgspec decode, data kept raw (no dict, no dumps)",
            _best(lambda: [decode_raw(b) for b in bodies]),
        )
        add(
            "  vs orjson.loads + orjson.dumps(data) per record",
            _best(
                lambda: [
                    [orjson.dumps(r["data"]) for r in orjson.loads(b)["records"]] for b in bodies
                ]
            ),
        )
    else:
        print("(msgspec not importable: the raw-data decode line is skipped)")
    print(t.render())

    rows = [r for b in batches for r in b.rows()]
    by_key = {(r["collection_id"], r["upstream_id"]): r for r in raws}
    section(f"micro: COPY of {len(rows)} deduplicated rows into a staging table (best of 3)")
    variants = _copy_variants(rows, by_key)
    t = Table(["COPY variant", "wall s", "client CPU s", "us/row wall"], left=1)
    with dbs.fresh("micro") as (dsn, _schema), psycopg.connect(dsn) as conn:
        for name, (ddl, copy_sql, types, make_rows) in variants.items():
            conn.execute("DROP TABLE IF EXISTS stage")
            conn.execute(ddl)
            conn.commit()
            prepared = make_rows()
            best_w, best_c = 1e9, 1e9
            for _ in range(3):
                w0, c0 = time.perf_counter(), time.thread_time()
                with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    if types:
                        copy.set_types(types)
                    for row in prepared:
                        copy.write_row(row)
                conn.rollback()
                best_w = min(best_w, time.perf_counter() - w0)
                best_c = min(best_c, time.thread_time() - c0)
            t.add(name, f"{best_w:.3f}", f"{best_c:.3f}", f"{best_w * 1e6 / len(rows):.1f}")
    print(t.render())
    print(
        "(row preparation, e.g. building Jsonb wrappers, is not timed; a staging table "
        "without indexes: this is the client->server transfer and parse only)"
    )


def _msgspec_raw_decoder() -> Callable[[bytes], Any] | None:
    """A page decoder that keeps each record's ``data`` as its raw JSON bytes (msgspec.Raw):
    the passthrough lever. Other fields stay loosely typed so bad records could still be
    dead-lettered. None when msgspec is not installed (it is not a dependency)."""
    if msgspec is None:
        return None
    return msgspec.json.Decoder(_RawBody).decode


_STAGE = """CREATE TABLE stage (collection_id text NOT NULL, upstream_id text NOT NULL,
 sync_id uuid, upstream_updated_at timestamptz NOT NULL, created_at timestamptz,
 deleted boolean NOT NULL, data {data_type})"""
_COLS = "(collection_id, upstream_id, sync_id, upstream_updated_at, created_at, deleted, data)"
_TYPES = ["text", "text", "uuid", "timestamptz", "timestamptz", "bool", "jsonb"]


def _copy_variants(
    rows: list[Any], by_key: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, tuple[str, str, list[str] | None, Callable[[], list[tuple[Any, ...]]]]]:
    from psycopg.types.json import Jsonb

    def as_is(s: str) -> str:
        return s

    def today() -> list[tuple[Any, ...]]:
        return [
            (
                r.collection_id,
                r.upstream_id,
                r.sync_id,
                r.upstream_updated_at,
                r.created_at,
                r.deleted,
                r.data_json,
            )
            for r in rows
        ]

    def binary() -> list[tuple[Any, ...]]:
        return [
            (
                r.collection_id,
                r.upstream_id,
                r.sync_id,
                r.upstream_updated_at,
                r.created_at,
                r.deleted,
                None if r.data_json is None else Jsonb(r.data_json, dumps=as_is),
            )
            for r in rows
        ]

    def text_stamps() -> list[tuple[Any, ...]]:
        out = []
        for r in rows:
            raw = by_key[(r.collection_id, r.upstream_id)]
            out.append(
                (
                    r.collection_id,
                    r.upstream_id,
                    raw["sync_id"],
                    raw["upstream_updated_at"],
                    raw["created_at"],
                    r.deleted,
                    r.data_json,
                )
            )
        return out

    text_copy = f"COPY stage {_COLS} FROM STDIN"
    bin_copy = f"COPY stage {_COLS} FROM STDIN (FORMAT BINARY)"
    return {
        "text, as today (datetime, UUID, str)": (
            _STAGE.format(data_type="jsonb"),
            text_copy,
            None,
            today,
        ),
        "binary + set_types (jsonb passed through)": (
            _STAGE.format(data_type="jsonb"),
            bin_copy,
            _TYPES,
            binary,
        ),
        "text, timestamps/uuid as received strings": (
            _STAGE.format(data_type="jsonb"),
            text_copy,
            None,
            text_stamps,
        ),
        "text, data into a text column (no jsonb parse)": (
            _STAGE.format(data_type="text"),
            text_copy,
            None,
            today,
        ),
    }


if msgspec is not None:

    class _RawRec(msgspec.Struct):
        collection_id: Any = None
        upstream_id: Any = None
        upstream_updated_at: Any = None
        deleted: Any = None
        sync_id: Any = None
        created_at: Any = None
        data: msgspec.Raw = msgspec.Raw(b"null")

    class _RawBody(msgspec.Struct):
        records: list[_RawRec]
        cursor: str


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def workload(records: int) -> Iterator[tuple[Databases, SimulatorProcess]]:
    with (
        harness.database_server() as (admin, where),
        SimulatorProcess(records, records // 5) as sim,
    ):
        dbs = Databases(admin)
        info = dbs.server_info()
        m = harness.machine_info()
        print(
            f"machine: {m['nproc']} CPUs ({m['cpu']}); Python {m['python']}; Postgres "
            f"{info['server_version']} ({where}); workload: {sim.describe()}"
        )
        harness.spawn_drain(sim).result(300)  # warm the simulator
        yield dbs, sim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("what", choices=["timers", "py-spy", "levers", "micro", "all"])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3, help="levers: runs per setting")
    parser.add_argument(
        "--compare-tree",
        type=Path,
        metavar="DIR",
        help="levers: also run the worker/ found in DIR (A/B of two versions)",
    )
    parser.add_argument(
        "--only", nargs="+", help="levers: only those whose name contains one of these (+ defaults)"
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sequin-spy")
    args = parser.parse_args()
    # timers last: its wrappers stay installed in this process.
    todo = ["py-spy", "levers", "micro", "timers"] if args.what == "all" else [args.what]
    with workload(args.records) as (dbs, sim):
        for what in todo:
            if what == "timers":
                run_timers(dbs, sim)
            elif what == "py-spy":
                run_spy(dbs, sim, args.out, args.native, args.top)
            elif what == "levers":
                run_levers(dbs, sim, args.repeat, args.only, args.compare_tree)
            else:
                run_micro(dbs, sim, 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
