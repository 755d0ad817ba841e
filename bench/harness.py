"""Shared machinery of the benchmarks: the simulator process, databases, contender processes.

Every contender runs as its own process, as does the simulator, so that nothing shares a
GIL with the measurer. A contender's peak RSS and CPU time are its own: they come from
``os.wait4`` on its pid (``ru_maxrss`` of that child only; ``RUSAGE_CHILDREN`` would be the
maximum over every child reaped so far).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
TOKEN = "bench-token"  # the simulator's, not a secret
RECORD_SIZE = 800
SEED = 42

_SUMMARY = re.compile(r"complete: (\d+) records in ([0-9.]+) s")


# --------------------------------------------------------------------------- processes


@dataclass
class ProcResult:
    """One finished contender process."""

    name: str
    returncode: int
    wall: float  # spawn to exit, seconds
    cpu: float  # user + system seconds of the process (all its threads)
    peak_rss_mb: float
    stdout: str
    stderr: str
    started: float = 0.0  # time.monotonic() stamps
    ended: float = 0.0
    records: int = 0  # from the contender's summary line
    own_seconds: float = 0.0  # the contender's own timer (excludes interpreter start-up)

    @property
    def rate(self) -> float:
        """Records per second of wall time, start-up included (what a user waits for)."""
        return self.records / self.wall if self.wall > 0 else 0.0

    @property
    def own_rate(self) -> float:
        return self.records / self.own_seconds if self.own_seconds > 0 else 0.0


class Running:
    """A spawned contender; :meth:`result` reaps it with ``wait4`` (exact per-child rusage)."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self._dir = Path(tempfile.mkdtemp(prefix="sequin-bench-"))
        self._out = (self._dir / "stdout").open("w+b")
        self._err = (self._dir / "stderr").open("w+b")
        # cwd is an empty folder: no stray .env file is read by the worker's settings.
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv), env=env, cwd=self._dir, stdout=self._out, stderr=self._err
        )
        self._done = threading.Event()
        self._status = 0
        self._rusage: Any = None
        self._ended = 0.0
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        _, status, rusage = os.wait4(self.proc.pid, 0)
        self._ended = time.monotonic()
        self._status = os.waitstatus_to_exitcode(status)
        self._rusage = rusage
        self.proc.returncode = self._status  # so that Popen does not wait again
        self._done.set()

    def result(self, timeout: float | None = None) -> ProcResult:
        if not self._done.wait(timeout):
            self.proc.send_signal(signal.SIGKILL)
            self._done.wait()
            raise TimeoutError(f"{self.name} did not finish within {timeout} s")
        self._out.seek(0)
        self._err.seek(0)
        out = self._out.read().decode(errors="replace")
        err = self._err.read().decode(errors="replace")
        self._out.close()
        self._err.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        ru = self._rusage
        res = ProcResult(
            name=self.name,
            returncode=self._status,
            wall=self._ended - self.started,
            cpu=ru.ru_utime + ru.ru_stime,
            peak_rss_mb=ru.ru_maxrss / 1024.0,  # kilobytes on Linux
            stdout=out,
            stderr=err,
            started=self.started,
            ended=self._ended,
        )
        match = _SUMMARY.search(out)
        if match:
            res.records = int(match.group(1))
            res.own_seconds = float(match.group(2))
        if res.returncode != 0 or not match:
            tail = "\n".join((err or out).strip().splitlines()[-15:])
            raise RuntimeError(f"{self.name} failed (exit {res.returncode}):\n{tail}")
        return res


def base_env() -> dict[str, str]:
    """The harness's environment without anything that would configure a contender."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("SEQUIN_") and k != "DATABASE_URL"
    }


# --------------------------------------------------------------------------- simulator


class SimulatorProcess:
    """``sequin-worker simulate`` on a free loopback port, in its own process."""

    def __init__(
        self, records: int, keys: int, *, latency_ms: float = 0.0, seed: int = SEED
    ) -> None:
        self.records = records
        self.keys = keys
        self.latency_ms = latency_ms
        self._args = [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--token",
            TOKEN,
            "--seed",
            str(seed),
            "--records",
            str(records),
            "--keys",
            str(keys),
            "--record-size",
            str(RECORD_SIZE),
            "--latency-ms",
            str(latency_ms),
        ]
        self.base_url = ""
        self.command = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> SimulatorProcess:
        # The documented entry point first; `python -m worker.simulator` runs the same
        # simulator.main() and is the fallback for checkouts whose CLI did not yet forward
        # options to it (before 207e987).
        for module in (["worker", "simulate"], ["worker.simulator"]):
            url = self._start([PYTHON, "-m", *module, *self._args])
            if url:
                self.base_url = url
                self.command = "python -m " + " ".join(module)
                return self
        raise RuntimeError("the simulator did not start")

    def _start(self, argv: list[str]) -> str | None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        proc = subprocess.Popen(
            argv, env=base_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                match = re.search(rb"http://[0-9.]+:[0-9]+", line)
                if match:
                    self._proc = proc
                    return match.group(0).decode()
                if not line:  # EOF: it exited
                    break
            elif proc.poll() is not None:
                break
        proc.kill()
        proc.wait()
        return None

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        if self._log is not None:
            self._log.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def describe(self) -> str:
        return (
            f"{self.records} records over {self.keys} keys, ~{RECORD_SIZE} B data, "
            f"latency {self.latency_ms:g} ms"
        )


# --------------------------------------------------------------------------- databases


@contextlib.contextmanager
def database_server() -> Iterator[tuple[str, str]]:
    """``(admin DSN, description)``: ``DATABASE_URL`` if set, else a throwaway Postgres."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url, "DATABASE_URL"
        return
    from worker.embedded import throwaway_postgres

    with throwaway_postgres() as dsn:
        yield dsn, "embedded throwaway Postgres"


class Databases:
    """Hands out a fresh database per contender (or a fresh schema where the role may not
    ``CREATE DATABASE``), dropped afterwards."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin = admin_dsn
        self.can_create_db = True

    def _exec(self, query: sql.SQL | sql.Composed) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(query)

    @contextlib.contextmanager
    def fresh(self, label: str) -> Iterator[tuple[str, str]]:
        """Yield ``(dsn, schema)`` of an empty place to write."""
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        if self.can_create_db:
            try:
                self._exec(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.InsufficientPrivilege:
                self.can_create_db = False
        if self.can_create_db:
            try:
                self.checkpoint()
                yield make_conninfo(self.admin, dbname=name), "sequin"
            finally:
                self._exec(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            return
        try:
            self.checkpoint()
            yield self.admin, name
        finally:
            self._exec(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))

    def checkpoint(self) -> None:
        """Flush what earlier contenders left dirty, so that no one pays for another."""
        with contextlib.suppress(psycopg.Error):
            self._exec(sql.SQL("CHECKPOINT"))

    def server_info(self) -> dict[str, str]:
        names = ("server_version", "shared_buffers", "synchronous_commit", "max_wal_size")
        with psycopg.connect(self.admin, autocommit=True) as conn:
            shown = {n: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(n))) for n in names}
            return {n: str(row[0]) for n, cur in shown.items() if (row := cur.fetchone())}


# --------------------------------------------------------------------------- contenders


def contender_env(sim: SimulatorProcess, dsn: str, schema: str, **extra: str) -> dict[str, str]:
    """The environment of a worker (or baseline) that reads ``sim`` and writes ``dsn``."""
    env = base_env()
    env.update(
        {
            "SEQUIN_API_TOKEN": TOKEN,
            "SEQUIN_BASE_URL": sim.base_url,
            "DATABASE_URL": dsn,
            "SEQUIN_DB_SCHEMA": schema,
            "SEQUIN_LOG_LEVEL": "warning",
            "SEQUIN_HTTP_PORT": "0",
        }
    )
    env.update(extra)
    return env


def spawn_worker(
    sim: SimulatorProcess,
    dsn: str,
    schema: str,
    name: str = "worker",
    prelude: str | None = None,
    **extra: str,
) -> Running:
    """``sequin-worker backfill`` (extra: more SEQUIN_* settings, or PGOPTIONS).

    ``prelude``: Python run first in the same interpreter (e.g. GC settings), after which the
    CLI runs exactly as ``python -m worker backfill`` would.
    """
    argv = [PYTHON, "-m", "worker", "backfill"]
    if prelude is not None:
        code = f"{prelude}\nimport sys\nfrom worker.cli import main\nsys.exit(main(['backfill']))"
        argv = [PYTHON, "-c", code]
    return Running(name, argv, contender_env(sim, dsn, schema, **extra))


def spawn_baseline(sim: SimulatorProcess, dsn: str, schema: str) -> Running:
    return Running(
        "baseline", [PYTHON, str(BENCH / "baseline.py")], contender_env(sim, dsn, schema)
    )


def spawn_drain(sim: SimulatorProcess) -> Running:
    return Running("drain", [PYTHON, str(BENCH / "drain.py")], contender_env(sim, "", ""))


# --------------------------------------------------------------------------- machine

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a local process (all its threads), from /proc; None once
    it has exited (or on a system without /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_info() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


@contextlib.contextmanager
def workload(records: int) -> Iterator[tuple[Databases, SimulatorProcess]]:
    """The profiling tools' workload: a database server and the simulator with ``records``
    over ``records // 5`` keys, warmed by one drain; prints one line describing both."""
    with database_server() as (admin, where), SimulatorProcess(records, records // 5) as sim:
        dbs = Databases(admin)
        info = dbs.server_info()
        m = machine_info()
        print(
            f"machine: {m['nproc']} CPUs ({m['cpu']}); Python {m['python']}; Postgres "
            f"{info['server_version']} ({where}); workload: {sim.describe()}"
        )
        spawn_drain(sim).result(300)  # warms the simulator's caches; not counted
        yield dbs, sim


# --------------------------------------------------------------------------- output


def section(title: str) -> None:
    """A section header of a tool's report."""
    print(f"\n== {title}", flush=True)


@dataclass
class Table:
    """A small fixed-width table: left-aligned first columns, right-aligned numbers."""

    headers: list[str]
    left: int = 2
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [
            max(len(r[i]) for r in [self.headers, *self.rows]) for i in range(len(self.headers))
        ]

        def fmt(row: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < self.left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(self.headers), rule, *(fmt(r) for r in self.rows)])
