"""A measurement aid for bench/timers.py, not part of the worker: timing wrappers around
public functions and methods of the worker and of psycopg, installed in one process.

What is wrapped is listed once, in :data:`TARGETS` (stage -> dotted path). Only public names
are wrapped (and psycopg's documented context-manager protocol); nothing private is replaced
or read. When a path no longer resolves (a module moved), :func:`install` skips it and
returns its name, so the report shows that stage as missing instead of failing: fix the path
here, in one place. Wrappers run per page, per batch or per statement, never per record, so
their own cost stays small.

The evidence without any wrapper is bench/spy.py (sampling the unchanged
``python -m worker backfill``); prefer it when the two disagree.
"""

from __future__ import annotations

import functools
import importlib
import queue
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

# stage -> the public function or method that bounds it. The worker's modules are being
# reorganised; when one moves, change its path here (and nowhere else).
TARGETS: dict[str, str] = {
    "fetch": "worker.api.SequinClient.fetch_page",  # HTTP, retries and decoding of one page
    "decode": "worker.codec.decode_page",  # bytes -> items + cursor (msgspec, exact fallback)
    "validate": "worker.records.parse_page",  # items -> rows and dead letters
    "prefetch": "worker.sync.Prefetcher.start",  # to time its (public) queue
    "loop": "worker.sync.SyncLoop.run",  # the applying thread, whole
    "connect": "worker.pg.store.PgStore.connect",  # to learn the backend's pid
    "apply": "worker.pg.store.PgStore.apply",  # one batch, one transaction
    "dedup": "worker.model.Batch.rows",  # the newest version of each key
    # psycopg's public API: the statements, the COPY block and the transaction's end.
    "execute": "psycopg.Cursor.execute",
    "copy": "psycopg.Cursor.copy",
    "copy finish": "psycopg.Copy.__exit__",
    "transaction end": "psycopg.Transaction.__exit__",
}


def resolve(path: str) -> tuple[Any, str, Any]:
    """``(owner, attribute, value)`` for a dotted path; ``LookupError`` if it does not exist."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:-1]:
                owner = getattr(owner, name)
            return owner, parts[-1], getattr(owner, parts[-1])
        except AttributeError:
            break
    raise LookupError(path)


class Timers:
    """Wall and thread-CPU seconds and calls per (thread name, stage)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        self.threads: dict[str, tuple[float, float]] = {}  # name -> (wall, CPU) so far
        self.started: dict[str, float] = {}
        self.batch_pages: Counter[int] = Counter()
        self.backend_pids: list[int] = []
        self._lock = threading.Lock()

    def add(self, label: str, wall: float, cpu: float) -> None:
        key = (threading.current_thread().name, label)
        with self._lock:
            slot = self.data[key]
            slot[0] += wall
            slot[1] += cpu
            slot[2] += 1

    def get(self, thread: str, label: str) -> tuple[float, float, int]:
        wall, cpu, calls = self.data.get((thread, label), (0.0, 0.0, 0.0))
        return wall, cpu, int(calls)

    def timed(self, label: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its wall and thread CPU time added under ``label`` (or label(*args))."""

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                name = label if isinstance(label, str) else label(*args, **kwargs)
                self.add(name, time.perf_counter() - w0, time.thread_time() - c0)

        return inner


class TimedQueue(queue.Queue[Any]):
    """The prefetch queue: times blocking gets (the writer waiting for a page) and puts (the
    prefetch thread blocked on a full queue), and after each put notes the putting thread's
    wall time since :meth:`Prefetcher.start` and its CPU time."""

    def __init__(self, maxsize: int, timers: Timers) -> None:
        super().__init__(maxsize)
        self.timers = timers

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not block:
            return super().get(block, timeout)
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return super().get(block, timeout)
        finally:
            self.timers.add("wait for a page", time.perf_counter() - w0, time.thread_time() - c0)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            super().put(item, block, timeout)
        finally:
            now, cpu = time.perf_counter(), time.thread_time()
            self.timers.add("put (blocked: queue full)", now - w0, cpu - c0)
            name = threading.current_thread().name
            if name in self.timers.started:
                self.timers.threads[name] = (now - self.timers.started[name], cpu)


def install(timers: Timers) -> list[str]:
    """Install every wrapper of :data:`TARGETS` in this process; return the stages whose
    path did not resolve (they are skipped)."""
    inside = threading.local()  # per thread: in apply? COPY started when?

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(store: Any, batch: Any) -> Any:
            timers.batch_pages[len(batch.pages)] += 1
            inside.apply, inside.copied = True, False
            try:
                return fn(store, batch)
            finally:
                inside.apply = False

        return timers.timed("apply (one transaction)", inner)

    def connect(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(store: Any) -> None:
            fn(store)
            timers.backend_pids.append(store.conn.info.backend_pid)

        return inner

    def prefetch_start(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(prefetcher: Any) -> Any:
            prefetcher.queue = TimedQueue(prefetcher.queue.maxsize, timers)
            timers.started["prefetch"] = time.perf_counter()
            return fn(prefetcher)

        return inner

    def execute_label(*args: Any, **kwargs: Any) -> str:
        if not getattr(inside, "apply", False):
            return "execute (outside apply)"
        # The cursor fence is the first statement of every apply (a documented contract).
        return "after COPY (upsert, deletes, notify)" if inside.copied else "cursor fence"

    def copy(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            inside.copy_started = time.perf_counter(), time.thread_time()
            return fn(*args, **kwargs)

        return inner

    def copy_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                w0, c0 = getattr(inside, "copy_started", (time.perf_counter(), time.thread_time()))
                timers.add("COPY block", time.perf_counter() - w0, time.thread_time() - c0)
                inside.copied = True

        return timers.timed("COPY finish (server ack)", inner)

    def commit_label(*args: Any) -> str:
        return "commit" if getattr(inside, "apply", False) else "commit (outside apply)"

    wrappers: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        "fetch": functools.partial(timers.timed, "fetch_page (HTTP + decode)"),
        "decode": functools.partial(timers.timed, "decode (codec.decode_page)"),
        "validate": functools.partial(timers.timed, "validate (parse_page)"),
        "prefetch": prefetch_start,
        "loop": functools.partial(timers.timed, "loop (SyncLoop.run)"),
        "connect": connect,
        "apply": apply,
        "dedup": functools.partial(timers.timed, "dedup (Batch.rows)"),
        "execute": functools.partial(timers.timed, execute_label),
        "copy": copy,
        "copy finish": copy_exit,
        "transaction end": functools.partial(timers.timed, commit_label),
    }
    importlib.import_module("worker.cli")  # so that every `from x import f` is bound already
    missing = []
    for stage, path in TARGETS.items():
        try:
            owner, attr, original = resolve(path)
        except LookupError:
            missing.append(f"{stage} ({path})")
            continue
        wrapped = functools.wraps(original)(wrappers[stage](original))
        setattr(owner, attr, wrapped)
        if not isinstance(owner, type):  # a module function: also where it was imported by name
            for module in list(sys.modules.values()):
                name = getattr(module, "__name__", "")
                if name.startswith("worker") and getattr(module, attr, None) is original:
                    setattr(module, attr, wrapped)
    return missing
