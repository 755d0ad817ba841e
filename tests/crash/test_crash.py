"""Crash, fault and concurrency tests: real processes, real sockets, a real Postgres.

Every test here checks the exactly-once contract from the outside, after the damage:

* the stored cursor is a position of the stream, and the table equals the latest version of
  every key among the records up to that position (nothing after it, nothing missing);
* ``cursors.records_applied`` equals the number of records up to that position (a record
  applied twice would be counted twice: the counter moves in the same transaction as rows);
* at the end the cursor is the API's final cursor and the table equals
  ``sim.expected_state()``.

Timing varies from run to run (kills land at random moments, seeded); outcomes do not.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import psycopg
import pytest
import requests
from structlog.testing import capture_logs

from tests.helpers import (
    TOKEN,
    assert_table_matches,
    consumer_row,
    run_cli,
    settings,
    spawn_cli,
    stored_cursor,
    terminate_backends,
    wait_for,
    worker_env,
)
from worker.pg.locks import consumer_lock_key
from worker.service import Outcome, run_consumer
from worker.simulator import FaultConfig, Simulator
from worker.sync import LoopState

pytestmark = pytest.mark.crash

Key = tuple[str, str]
LogEvent = MutableMapping[str, Any]


# --------------------------------------------------------------------------- helpers


def dead_letter_count(db: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM sequin.dead_letters").fetchone()
    assert row is not None
    return int(row[0])


def worker_backends(db: str, pattern: str = "sequin-worker%") -> int:
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE %s",
            (pattern,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def lock_holders(conn: psycopg.Connection[Any], key: int) -> list[int]:
    """Backend pids holding the session advisory lock on ``key`` (a signed 64-bit key).

    In ``pg_locks`` an advisory lock on a bigint shows ``classid`` = high 32 bits, ``objid`` =
    low 32 bits and ``objsubid`` = 1.
    """
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    rows = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND classid::text::bigint = %s AND objid::text::bigint = %s AND objsubid = 1",
        (unsigned >> 32, unsigned & 0xFFFF_FFFF),
    ).fetchall()
    return [int(r[0]) for r in rows]


def api_final_cursor(sim: Simulator, cursor: str | None) -> str:
    """Ask the API over HTTP what follows ``cursor``: it must be nothing, handing it back."""
    resp = requests.get(
        sim.records_url,
        params={"after_cursor": cursor, "limit": 500},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["records"] == [], "the stored cursor is not the end of the stream"
    return str(body["cursor"])


class StreamIndex:
    """Every record of the simulator's stream in order, and where each cursor points.

    Built in-process (``sim.page``: no faults, no request log) one record per page, so that
    every position of the stream has its cursor: ``position[c]`` is the number of records up
    to and including the one that cursor ``c`` names.
    """

    def __init__(self, sim: Simulator) -> None:
        self.records: list[dict[str, Any]] = []
        self.position: dict[str, int] = {}
        cursor: str | None = None
        while True:
            body = json.loads(sim.page(cursor, 1))
            if not body["records"]:
                break
            cursor = str(body["cursor"])
            self.records.extend(body["records"])
            self.position[cursor] = len(self.records)
        self.final = cursor

    def count_upto(self, cursor: str | None) -> int:
        if cursor is None:
            return 0
        assert cursor in self.position, f"stored cursor {cursor!r} is not a stream position"
        return self.position[cursor]

    def state_upto(self, cursor: str | None) -> dict[Key, dict[str, Any]]:
        """The last version of every key among the records up to ``cursor`` (stream order)."""
        state: dict[Key, dict[str, Any]] = {}
        for record in self.records[: self.count_upto(cursor)]:
            state[(record["collection_id"], record["upstream_id"])] = record
        return state


def assert_consistent(db: str, idx: StreamIndex, mode: str = "soft") -> str | None:
    """Rows and cursor agree: everything up to the stored cursor applied once, nothing after.

    Call only while no worker of this database is alive (nothing moves under the reads).
    """
    row = consumer_row(db)
    cursor = None if row is None else row.cursor
    applied = 0 if row is None else row.records_applied
    assert applied == idx.count_upto(cursor), (
        f"records_applied {applied} but the cursor is after record {idx.count_upto(cursor)}"
    )
    assert_table_matches(db, idx.state_upto(cursor), mode=mode)
    assert dead_letter_count(db) == 0
    return cursor


def assert_exact_end_state(db: str, sim: Simulator, mode: str = "soft") -> None:
    """The table is the stream's final state, the cursor its end, every record counted once."""
    row = consumer_row(db)
    assert row is not None
    assert_table_matches(db, sim.expected_state(), mode=mode)
    assert api_final_cursor(sim, row.cursor) == row.cursor
    assert row.records_applied == sim.record_count()
    assert row.dead_letters == 0 and dead_letter_count(db) == 0


def cursor_moved(db: str, start: str | None) -> Callable[[], bool]:
    return lambda: stored_cursor(db) != start


def has_session(db: str, pattern: str) -> Callable[[], bool]:
    return lambda: worker_backends(db, pattern) > 0


def caught_up(
    sim: Simulator, db: str, consumer: str = "default", provider: str | None = None
) -> bool:
    """The consumer's stored cursor is the end of its (filtered) stream."""
    cursor = stored_cursor(db, consumer)
    if cursor is None:
        return False
    return not json.loads(sim.page(cursor, 1, provider=provider))["records"]


class Worker:
    """A ``python -m worker`` subprocess whose JSON log lines are collected as they arrive."""

    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.proc = spawn_cli(args, env)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._err: list[str] = []
        self._out: list[str] = []
        assert self.proc.stderr is not None and self.proc.stdout is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: IO[str], sink: list[str]) -> None:
        for line in stream:
            now = time.monotonic()
            sink.append(line)
            if sink is self._err and line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.events.append((now, json.loads(line)))

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def named(self, event: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in list(self.events) if e.get("event") == event]

    def wait_event(self, event: str, timeout: float = 30) -> float:
        wait_for(
            lambda: self.named(event) or not self.alive,
            timeout,
            f"{self.name} to log {event!r}",
        )
        found = self.named(event)
        assert found, (
            f"{self.name} exited ({self.proc.returncode}) before {event!r}:\n{self.stderr}"
        )
        return found[0][0]

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait(10)

    def terminate(self, timeout: float = 15) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the exit took."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.wait(timeout)
        return rc, time.monotonic() - sent

    def close(self) -> None:
        if self.alive:
            self.kill()


Spawn = Callable[..., Worker]


def exited_or_committed(w: Worker, db: str, start: str | None) -> Callable[[], bool]:
    return lambda: not w.alive or stored_cursor(db) != start


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start worker subprocesses; any still running at the end of the test is SIGKILLed."""
    started: list[Worker] = []

    def start(args: list[str], env: dict[str, str], name: str = "worker") -> Worker:
        w = Worker(args, env, name)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


def ts(base: datetime, seconds: float) -> str:
    return (base + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


class Appender(threading.Thread):
    """Appends well-formed records (updates, new keys, deletes) to a running simulator."""

    def __init__(self, sim: Simulator, seed: int, *, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.sim = sim
        self.rng = random.Random(seed)
        self.interval = interval
        self.halt = threading.Event()
        self.count = 0
        self.base = datetime(2031, 1, 1, tzinfo=UTC)

    def append_one(self) -> None:
        coll = self.rng.choice(self.sim.collections)
        uid = f"live-{self.rng.randrange(40)}"
        deleted = self.rng.random() < 0.1
        data = None if deleted and self.rng.random() < 0.5 else {"n": self.count, "by": "live"}
        self.sim.append(
            [self.sim.make_record(coll, uid, ts(self.base, self.count), data, deleted=deleted)]
        )
        self.count += 1

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.append_one()

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def extend_stream(sim: Simulator, rng: random.Random, n: int, round_no: int) -> None:
    """Append ``n`` records after everything in the stream (updates, new keys, deletes)."""
    base = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(days=round_no)
    records = []
    for i in range(n):
        coll = rng.choice(sim.collections)
        deleted = rng.random() < 0.08
        records.append(
            sim.make_record(
                coll,
                f"ext-{rng.randrange(n // 4)}",
                ts(base, i),
                None if deleted else {"i": i, "round": round_no},
                deleted=deleted,
            )
        )
    sim.append(records)


# --------------------------------------------------------------------------- 1. SIGKILL


@pytest.mark.parametrize(("mode", "kills_wanted"), [("soft", 12), ("hard", 10)])
def test_sigkill_at_random_moments_of_a_backfill(
    db: str, spawn: Spawn, mode: str, kills_wanted: int
) -> None:
    """SIGKILL a backfill again and again, at seeded random moments (during start-up,
    migration, lock, fetch or commit); after every kill the rows and the cursor agree and
    ``records_applied`` counts each record up to the cursor exactly once; the final run
    finishes the stream exactly."""
    rng = random.Random(f"sigkill-{mode}")
    faults = FaultConfig(latency=0.04)
    with Simulator(token=TOKEN, seed=31, records=8000, record_size=300, faults=faults) as sim:
        env = worker_env(
            sim,
            db,
            SEQUIN_PAGE_SIZE="50",
            SEQUIN_BATCH_MAX_RECORDS="150",
            SEQUIN_DELETE_MODE=mode,
        )
        idx = StreamIndex(sim)
        assert any(r["deleted"] for r in idx.records)
        kills = mid_stream = extensions = 0
        resumed_from: list[str | None] = []
        while kills < kills_wanted:
            start = stored_cursor(db)
            w = spawn(["backfill"], env, f"backfill#{kills}")
            if kills % 2 == 0:
                # Anywhere, start-up included.
                time.sleep(rng.uniform(0.05, 1.5))
            else:
                # Somewhere after this incarnation's first commit.
                wait_for(exited_or_committed(w, db, start), 60, "a commit")
                time.sleep(rng.uniform(0.0, 0.4))
            if not w.alive:
                # It finished the whole stream before the kill: give it more to do.
                assert w.wait(10) == 0, w.stderr
                extensions += 1
                assert extensions <= 3, "the stream is consumed too fast for this test"
                extend_stream(sim, rng, 1500, extensions)
                idx = StreamIndex(sim)
                continue
            w.kill()
            kills += 1
            wait_for(lambda: worker_backends(db) == 0, 15, "the killed worker's sessions to end")
            cursor = assert_consistent(db, idx, mode)
            for _, e in w.named("session_started"):
                resumed_from.append(e.get("cursor"))
                assert e.get("cursor") == start, "a session did not start at the stored cursor"
            if cursor is not None and cursor != idx.final:
                mid_stream += 1
        assert mid_stream >= 3, f"only {mid_stream} of {kills} kills landed mid-stream"
        assert any(c is not None for c in resumed_from), "no incarnation resumed mid-stream"

        before = idx.count_upto(stored_cursor(db))
        proc = run_cli(["backfill"], env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        summary = proc.stdout.strip().splitlines()[-1]
        # The last run applies exactly what the killed ones did not.
        assert summary.startswith(f"backfill complete: {len(idx.records) - before} records ")
        assert_exact_end_state(db, sim, mode)


# --------------------------------------------------------------------------- 2. pg_terminate


def test_terminated_database_sessions_are_recovered_without_a_restart(
    db: str, spawn: Spawn
) -> None:
    """``pg_terminate_backend`` on the data connection, the lock connection, or both, again and
    again during ``run``: the process recovers on its own and ends exact; SIGTERM exits 0."""
    rng = random.Random("pg-terminate")
    faults = FaultConfig(latency=0.03)
    with Simulator(token=TOKEN, seed=41, records=6000, record_size=300, faults=faults) as sim:
        w = spawn(["run"], worker_env(sim, db, SEQUIN_PAGE_SIZE="50"), "run")
        appender = Appender(sim, seed=41, interval=0.1)
        appender.start()
        try:
            w.wait_event("page_applied")
            targets = [
                "sequin-worker:default",
                "sequin-worker-lock:default",
                "sequin-worker%",
                "sequin-worker:default",
                "sequin-worker-lock:default",
                "sequin-worker%",
            ]
            for target in targets:
                wait_for(has_session(db, target), 30, f"a session {target}")
                time.sleep(rng.uniform(0.0, 0.3))
                before = stored_cursor(db)
                assert terminate_backends(db, target) >= 1
                # It must make progress again by itself before the next blow.
                wait_for(cursor_moved(db, before), 30, f"progress after killing {target}")
                assert w.alive, w.stderr
        finally:
            appender.stop()
        wait_for(lambda: caught_up(sim, db), 60, "the worker to catch up")
        assert w.alive, w.stderr
        assert_exact_end_state(db, sim)
        assert appender.count > 0
        assert w.named("db_retry"), "terminated data sessions were not retried"
        assert w.named("leader_lost"), "terminated lock sessions were not noticed"
        assert len(w.named("leader_acquired")) >= 3
        rc, took = w.terminate()
    assert rc == 0, w.stderr
    assert took < 10
    assert w.named("worker_stopped")
    assert "Traceback" not in w.stderr


# --------------------------------------------------------------------------- 3. API faults


def test_backfill_through_api_faults_is_exact_and_honours_retry_after(
    db: str, spawn: Spawn
) -> None:
    """5xx (half HTML), 429 with Retry-After (seconds and HTTP-dates), dropped connections and
    truncated bodies: the backfill ends exact, and no request follows a 429 sooner than the
    server asked."""
    faults = FaultConfig(
        rate_5xx=0.10,
        html_share=0.5,
        rate_429=0.05,
        retry_after=0.3,
        retry_after_http_date_share=0.4,
        rate_drop=0.03,
        rate_truncate=0.03,
        seed=5,
    )
    with Simulator(token=TOKEN, seed=51, records=4000, record_size=300, faults=faults) as sim:
        w = spawn(["backfill"], worker_env(sim, db, SEQUIN_PAGE_SIZE="50"), "backfill")
        rc = w.wait(150)
        assert rc == 0, w.stderr
        log = sorted(sim.request_log, key=lambda e: e.time)
        sim.faults = FaultConfig()  # the checks below talk to the API too
        assert_exact_end_state(db, sim)

    statuses = [e.status for e in log]
    assert statuses.count(429) >= 2
    assert sum(1 for s in statuses if isinstance(s, int) and s >= 500) >= 4
    assert statuses.count("drop") >= 1 and statuses.count("truncate") >= 1
    for prev, nxt in itertools.pairwise(log):
        if prev.status == 429:
            assert prev.retry_after is not None
            early = prev.time + prev.retry_after - nxt.time
            assert early <= 0, f"a request came {early:.3f} s before Retry-After allowed it"
    # Every failed request was retried, and each retry was logged with its reason.
    failed = sum(1 for s in statuses if s != 200)
    retries = w.named("api_retry")
    assert len(retries) == failed
    reasons = " ".join(str(e.get("reason")) for _, e in retries)
    assert "HTTP 429" in reasons and "HTTP 50" in reasons
    assert "Traceback" not in w.stderr


# --------------------------------------------------------------------------- 4. leadership


class LockSampler(threading.Thread):
    """Samples, as often as it can, how many sessions hold a consumer's advisory lock."""

    def __init__(self, db: str, key: int) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.key = key
        self.halt = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.db, autocommit=True) as conn:
                while not self.halt.wait(0.02):
                    self.samples.append((time.monotonic(), len(lock_holders(conn, self.key))))
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert self.error is None, self.error


def test_one_leader_at_a_time_and_a_standby_takes_over(db: str, spawn: Spawn) -> None:
    """Three ``run`` processes of one consumer: never more than one session holds its lock;
    SIGKILL the leader and a standby takes over within seconds, keeps syncing live records,
    and the table ends exact; the rest stop on SIGTERM with 0."""
    faults = FaultConfig(latency=0.01)
    with Simulator(token=TOKEN, seed=61, records=3000, record_size=300, faults=faults) as sim:
        env = worker_env(sim, db, SEQUIN_PAGE_SIZE="100")
        sampler = LockSampler(db, consumer_lock_key("sequin", "default"))
        sampler.start()
        appender = Appender(sim, seed=61)
        try:
            a = spawn(["run"], env, "A")
            b = spawn(["run"], env, "B")
            wait_for(
                lambda: a.named("leader_acquired") or b.named("leader_acquired"),
                30,
                "a leader",
            )
            leader, standby = (a, b) if a.named("leader_acquired") else (b, a)
            standby.wait_event("standby")
            wait_for(lambda: caught_up(sim, db), 60, "the initial catch-up")
            appender.start()
            c = spawn(["run"], env, "C")
            c.wait_event("standby")
            time.sleep(1.0)  # standbys retry every 0.2 s: give them chances to misbehave
            assert not standby.named("leader_acquired") and not c.named("leader_acquired")
            assert worker_backends(db, "sequin-worker-lock:default") == 3

            killed_at = time.monotonic()
            leader.kill()
            wait_for(
                lambda: standby.named("leader_acquired") or c.named("leader_acquired"),
                10,
                "a standby to take over",
            )
            new, other = (standby, c) if standby.named("leader_acquired") else (c, standby)
            took_over = new.named("leader_acquired")[0][0] - killed_at
            assert took_over <= 10
            # It keeps syncing what is appended live.
            seen = appender.count
            wait_for(lambda: appender.count >= seen + 20, 10, "more live records")
        finally:
            if appender.is_alive():
                appender.stop()
        wait_for(lambda: caught_up(sim, db), 60, "the new leader to catch up")
        sampler.stop()
        assert appender.count >= 20
        assert_exact_end_state(db, sim)

        most = max(n for _, n in sampler.samples)
        assert most <= 1, "two sessions held the consumer's lock at once"
        after = [n for t, n in sampler.samples if t > killed_at + took_over + 0.1]
        assert len(sampler.samples) > 100 and after and max(after) == 1
        assert not other.named("leader_acquired"), "two standbys took over"
        assert sum(len(w.named("leader_acquired")) for w in (a, b, c)) == 2
        for w in (new, other):
            rc, took = w.terminate()
            assert rc == 0, w.stderr
            assert took < 10
            assert "Traceback" not in w.stderr


# --------------------------------------------------------------------------- 5. consumers


def test_backfill_waits_for_the_running_leader_and_other_consumers_run_in_parallel(
    db: str, spawn: Spawn
) -> None:
    """While ``run`` leads a consumer, ``backfill`` of it waits as a standby (and takes over
    once the leader stops), ``backfill --no-wait`` exits 7 saying why; other consumers lead
    their own streams at the same time."""
    with Simulator(token=TOKEN, seed=71, records=2000, record_size=300) as sim:

        def env(provider: str, **over: str) -> dict[str, str]:
            return worker_env(
                sim, db, SEQUIN_CONSUMER=f"by-{provider}", SEQUIN_PROVIDER=provider, **over
            )

        stripe = spawn(["run"], env("stripe"), "run stripe")
        hubspot = spawn(["run"], env("hubspot"), "run hubspot")
        stripe.wait_event("leader_acquired")
        hubspot.wait_event("leader_acquired")
        wait_for(lambda: caught_up(sim, db, "by-stripe", "stripe"), 60, "stripe to catch up")
        wait_for(lambda: caught_up(sim, db, "by-hubspot", "hubspot"), 60, "hubspot to catch up")
        assert not stripe.named("standby") and not hubspot.named("standby")
        with psycopg.connect(db, autocommit=True) as conn:
            for provider in ("stripe", "hubspot"):
                assert len(lock_holders(conn, consumer_lock_key("sequin", f"by-{provider}"))) == 1

        waiting = spawn(["backfill"], env("stripe"), "backfill stripe")
        waiting.wait_event("standby")
        time.sleep(1.0)
        assert waiting.alive and not waiting.named("leader_acquired")

        started = time.monotonic()
        busy = run_cli(["backfill", "--no-wait"], env("stripe"), timeout=60)
        assert busy.returncode == 7, busy.stderr
        assert time.monotonic() - started < 15
        assert "'by-stripe' is being synced by another process" in busy.stderr
        assert "Traceback" not in busy.stderr and "backfill complete" not in busy.stdout

        # A third consumer is not in anyone's way, --no-wait or not.
        other = run_cli(["backfill", "--no-wait"], env("salesforce"), timeout=60)
        assert other.returncode == 0, other.stderr
        events = [json.loads(x)["event"] for x in other.stderr.splitlines() if x.startswith("{")]
        assert "leader_acquired" in events and "standby" not in events
        assert other.stdout.strip().splitlines()[-1].startswith("backfill complete: ")

        # The waiting backfill takes over when the leader stops, and has nothing left to do.
        rc, took = stripe.terminate()
        assert rc == 0 and took < 10, stripe.stderr
        assert waiting.wait(30) == 0, waiting.stderr
        assert waiting.named("leader_acquired")
        assert waiting.stdout.strip().splitlines()[-1].startswith("backfill complete: 0 records")
        rc, took = hubspot.terminate()
        assert rc == 0 and took < 10, hubspot.stderr

        assert_table_matches(db, sim.expected_state())
        for provider in ("stripe", "hubspot", "salesforce"):
            row = consumer_row(db, f"by-{provider}")
            assert row is not None
            assert row.records_applied == sim.record_count(provider=provider)


# --------------------------------------------------------------------------- 6. SIGTERM


def test_sigterm_with_a_page_in_flight_exits_0_and_leaves_rows_and_cursor_agreeing(
    db: str, spawn: Spawn
) -> None:
    """SIGTERM while a slow page is in flight (at seeded random moments): exit 0 within
    seconds, the summary says "interrupted", and the table is exactly the stream up to the
    stored cursor; a later run finishes it."""
    rng = random.Random("sigterm")
    faults = FaultConfig(latency=0.3)
    with Simulator(token=TOKEN, seed=81, records=3000, record_size=300, faults=faults) as sim:
        env = worker_env(sim, db, SEQUIN_PAGE_SIZE="100")
        idx = StreamIndex(sim)
        for round_no in range(3):
            start = stored_cursor(db)
            w = spawn(["backfill"], env, f"backfill#{round_no}")
            wait_for(cursor_moved(db, start), 30, "a commit")
            time.sleep(rng.uniform(0.05, 0.3))
            assert w.alive
            rc, took = w.terminate()
            assert rc == 0, w.stderr
            assert took < 10
            assert w.named("shutdown_requested") and w.named("worker_stopped")
            assert w.stdout.strip().splitlines()[-1].startswith("backfill interrupted: ")
            assert "Traceback" not in w.stderr
            wait_for(lambda: worker_backends(db) == 0, 15, "the worker's sessions to end")
            cursor = assert_consistent(db, idx)
            assert cursor is not None and cursor != idx.final
        sim.faults = FaultConfig()
        assert run_cli(["backfill"], env).returncode == 0
        assert_exact_end_state(db, sim)


def test_sigterm_while_a_batch_transaction_is_blocked_finishes_it_and_exits_0(
    db: str, spawn: Spawn
) -> None:
    """SIGTERM while the batch's transaction is open and waiting (the cursor row is locked by
    someone else): once the row is free the batch ends (commit or rollback), the process exits
    0, and rows and cursor agree."""
    faults = FaultConfig(latency=0.1)
    with Simulator(token=TOKEN, seed=82, records=3000, record_size=300, faults=faults) as sim:
        env = worker_env(sim, db, SEQUIN_PAGE_SIZE="100", SEQUIN_BATCH_MAX_RECORDS="100")
        idx = StreamIndex(sim)
        w = spawn(["backfill"], env, "backfill")
        w.wait_event("page_applied")
        with psycopg.connect(db) as blocker:
            blocker.execute("SELECT 1 FROM sequin.cursors WHERE consumer = 'default' FOR UPDATE")
            with psycopg.connect(db, autocommit=True) as probe:

                def blocked() -> bool:
                    row = probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'sequin-worker:default'"
                        " AND wait_event_type = 'Lock'"
                    ).fetchone()
                    return bool(row and row[0])

                wait_for(blocked, 30, "the worker's batch to wait on the row lock")
            w.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            time.sleep(1.0)
            blocker.rollback()
        rc = w.wait(15)
        assert rc == 0, w.stderr
        assert time.monotonic() - sent < 10
        assert "Traceback" not in w.stderr
        wait_for(lambda: worker_backends(db) == 0, 15, "the worker's sessions to end")
        assert_consistent(db, idx)
        sim.faults = FaultConfig()
        assert run_cli(["backfill"], env).returncode == 0
        assert_exact_end_state(db, sim)


# --------------------------------------------------------------------------- 7. lost lock


def _stamp(_logger: object, _name: str, event: LogEvent) -> LogEvent:
    event["t"] = time.monotonic()
    return event


class InProcess:
    """``run_consumer(..., "run")`` on a thread; what it does is read from captured logs."""

    def __init__(self, sim: Simulator, db: str, logs: list[LogEvent], **over: object) -> None:
        self.stop = threading.Event()
        self.state = LoopState()
        self.logs = logs
        self.outcome: list[Outcome] = []
        self.error: list[BaseException] = []
        self.settings = settings(sim, db, **over)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.outcome.append(run_consumer(self.settings, "run", self.stop, state=self.state))
        except BaseException as exc:
            self.error.append(exc)

    def timeline(self) -> list[tuple[float, str]]:
        return [(e["t"], str(e["event"])) for e in list(self.logs)]

    def times(self, event: str) -> list[float]:
        return [t for t, name in self.timeline() if name == event]

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "run_consumer did not return after stop"
        assert not self.error, self.error
        assert self.outcome and not self.outcome[0].caught_up

    def assert_stops_writing_when_the_lock_is_lost(self, grace: float = 1.0) -> None:
        """No commit while not leading; after ``leader_lost`` only the batch in flight (and
        whatever commits before the session notices, polled every 0.1 s) may still commit,
        all within ``grace`` seconds."""
        leading = False
        lost_at: float | None = None
        for t, name in self.timeline():
            if name == "leader_acquired":
                leading, lost_at = True, None
            elif name == "leader_lost":
                lost_at = t
            elif name in ("leadership_lost_resuming_standby", "leader_released"):
                leading, lost_at = False, None
            elif name == "page_applied":
                assert leading, "a batch was committed while not the leader"
                if lost_at is not None:
                    late = t - lost_at
                    assert late <= grace, f"a batch committed {late:.2f} s after leader_lost"


def new_leader(rival: Worker, worker: InProcess, leads: int) -> Callable[[], bool]:
    """The rival subprocess took the lock, or the in-process worker took it once more."""
    return lambda: (
        bool(rival.named("leader_acquired")) or (len(worker.times("leader_acquired")) > leads)
    )


def test_a_leader_that_loses_its_lock_connection_stops_and_leads_again(db: str) -> None:
    """Terminate only the leader's lock session: it logs ``leader_lost``, stops writing within
    the ping interval, takes the lock again and finishes exactly."""
    faults = FaultConfig(latency=0.03)
    with (
        Simulator(token=TOKEN, seed=91, records=5000, record_size=300, faults=faults) as sim,
        capture_logs(processors=[_stamp]) as logs,
    ):
        worker = InProcess(sim, db, logs, SEQUIN_PAGE_SIZE=50)
        worker.thread.start()
        try:
            wait_for(lambda: len(worker.times("page_applied")) >= 3, 30, "a few batches")
            assert worker_backends(db, "sequin-worker-lock:%") == 1
            killed_at = time.monotonic()
            assert terminate_backends(db, "sequin-worker-lock:%") == 1
            wait_for(lambda: len(worker.times("leader_acquired")) >= 2, 15, "the lock again")
            assert worker.state.leader
            wait_for(lambda: caught_up(sim, db), 60, "the worker to catch up")
            # Still syncing afterwards.
            key = ("stripe:customer", "after-lost-lock")
            sim.append([sim.make_record(*key, "2031-01-01T00:00:00Z", {"n": 1})])
            wait_for(lambda: caught_up(sim, db), 30, "the new record")
        finally:
            worker.finish()
        events = [e for e in logs if e["event"] in ("leader_lost", "leader_acquired")]
        assert [e["event"] for e in events] == ["leader_acquired", "leader_lost", "leader_acquired"]
        lost = events[1]
        assert lost["log_level"] == "error"
        assert lost["t"] - killed_at < 5, "the lost lock was noticed late"
        standby = worker.times("leadership_lost_resuming_standby")
        assert standby and standby[0] - lost["t"] < 2, "the session went on after the loss"
        worker.assert_stops_writing_when_the_lock_is_lost()
        assert_exact_end_state(db, sim)


def test_a_rival_taking_the_lost_lock_never_causes_double_application(
    db: str, spawn: Spawn
) -> None:
    """The dangerous window: the leader's lock session dies while a standby waits, so the
    standby leads at once while the old leader has not noticed yet (up to the ping interval).
    The cursor fence keeps every batch applied exactly once; the old leader steps down, then
    leads again once the rival's backfill is done, and the end state is exact."""
    faults = FaultConfig(latency=0.03)
    with (
        Simulator(token=TOKEN, seed=92, records=6000, record_size=300, faults=faults) as sim,
        capture_logs(processors=[_stamp]) as logs,
    ):
        worker = InProcess(sim, db, logs, SEQUIN_PAGE_SIZE=50)
        worker.thread.start()
        try:
            wait_for(lambda: len(worker.times("page_applied")) >= 3, 30, "a few batches")
            rival = spawn(["backfill"], worker_env(sim, db, SEQUIN_PAGE_SIZE="50"), "rival")
            rival.wait_event("standby")
            # Kill the leader's lock session (only it: the rival's idle one stays). The rival
            # retries every 0.2 s, the old leader notices within its 2 s ping; should the old
            # leader still win the race for the lock, do it again.
            key = consumer_lock_key("sequin", "default")
            with psycopg.connect(db, autocommit=True) as conn:
                for _attempt in range(5):
                    leads = len(worker.times("leader_acquired"))
                    holders = lock_holders(conn, key)
                    assert len(holders) == 1
                    conn.execute("SELECT pg_terminate_backend(%s)", (holders[0],))
                    wait_for(new_leader(rival, worker, leads), 15, "a new leader")
                    if rival.named("leader_acquired"):
                        break
                else:
                    pytest.fail("the rival never took the lock")
            assert rival.wait(60) == 0, rival.stderr
            wait_for(lambda: worker.state.leader, 15, "the old leader to lead again")
            sim.append([sim.make_record("hubspot:deal", "after-rival", "2031-01-01T00:00:00Z", {})])
            wait_for(lambda: caught_up(sim, db), 60, "the worker to catch up")
        finally:
            worker.finish()
        assert worker.times("leader_lost")
        worker.assert_stops_writing_when_the_lock_is_lost()
        assert_exact_end_state(db, sim)
