"""Never stuck on the database: every wait on Postgres has a bound, and SIGTERM always ends
the process within 10 s with its summary line and ``worker_stopped``.

A silent database is modelled by :class:`tests.proxy.BlackHoleProxy`: the connection stays
open, nothing comes back, no RST, no FIN; the proxy's kernel even acknowledges what is sent,
so only a deadline kept by the worker itself ends its waits.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from tests.conftest import fetch_one, fetch_rows
from tests.crash.test_crash import (
    StreamIndex,
    Worker,
    assert_consistent,
    assert_exact_end_state,
    caught_up,
    lock_holders,
    worker_backends,
)
from tests.helpers import TOKEN, assert_table_matches, run_cli, wait_for, worker_env
from tests.integration.test_store import make_store
from tests.proxy import BlackHoleProxy, blackhole_proxy, server_address
from worker.model import ApplyResult, Batch
from worker.pg.connection import DbTimeouts
from worker.pg.lease import Lease
from worker.pg.locks import consumer_lock_key
from worker.pg.store import notify_payload
from worker.records import parse_page
from worker.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.crash

# A small SEQUIN_DB_TIMEOUT keeps these tests short; every bound below is derived from it.
T = 2.0
TIMEOUTS = DbTimeouts(wait=T, statement=30)


@pytest.fixture
def proxy(pg_server: str) -> Iterator[BlackHoleProxy]:
    with blackhole_proxy(server_address(pg_server)) as p:
        yield p


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.close()


def blocked_on_a_lock(db: str, application_name: str = "sequin-worker:default") -> bool:
    row = fetch_one(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND wait_event_type = 'Lock'",
        application_name,
    )
    return bool(row and row[0])


def summary(w: Worker) -> str:
    lines = w.stdout.strip().splitlines()
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- the lease


def test_lease_ping_notices_a_silent_server_and_release_returns(
    db: str, proxy: BlackHoleProxy
) -> None:
    """The leader's lock connection goes silent: ``lost`` is set within ping interval +
    round trip (+ slack), ``leader_lost`` says why in a string, ``release()`` returns within
    twice the round trip, and the server frees the lock within its idle_session_timeout
    (1.5 T) so that a standby can lead."""
    key = consumer_lock_key("sequin", "default")
    lease = Lease(proxy.dsn(db), key, name="default", retry_interval=0.2, timeouts=TIMEOUTS)
    with capture_logs() as logs:
        assert lease.try_acquire()
        time.sleep(2 * lease.ping_interval)  # a few healthy pings first
        assert not lease.lost.is_set()
        silent_at = time.monotonic()
        proxy.blackhole()
        assert lease.lost.wait(TIMEOUTS.ping_interval + TIMEOUTS.round_trip + 1.0), (
            "the ping did not notice the silent server"
        )
        lost = [e for e in logs if e["event"] == "leader_lost"]
        assert len(lost) == 1 and isinstance(lost[0]["reason"], str), lost
        started = time.monotonic()
        lease.release()
        assert time.monotonic() - started <= 2 * TIMEOUTS.round_trip + 0.5
    # The server ends the silent session (idle_session_timeout = 1.5 T) and its lock.
    with psycopg.connect(db, autocommit=True) as conn:
        wait_for(lambda: not lock_holders(conn, key), 1.5 * T + 2.0, "the server to free the lock")
        freed = time.monotonic() - silent_at
    assert freed <= 1.5 * T + 2.0


def test_release_of_a_held_lease_returns_when_the_server_is_silent(
    db: str, proxy: BlackHoleProxy
) -> None:
    """Shutdown while the lock connection is silent and the watchdog has not noticed yet:
    ``release()`` still returns within twice the round trip."""
    lease = Lease(
        proxy.dsn(db), consumer_lock_key("sequin", "x"), name="x", timeouts=DbTimeouts(60, 60)
    )
    assert lease.try_acquire()
    proxy.blackhole()
    started = time.monotonic()
    lease.release()
    assert time.monotonic() - started <= 2 * lease.timeouts.round_trip + 0.5
    assert not lease.is_leader


# --------------------------------------------------------------------------- partition


def test_a_leader_partitioned_mid_transaction_does_not_block_the_standby(
    db: str, proxy: BlackHoleProxy, workers: list[Worker]
) -> None:
    """The leader (through the proxy) is inside its batch transaction, holding the cursor
    row, when everything between it and the server goes silent. The server ends its data
    session (idle_in_transaction_session_timeout = T) and its lock session
    (idle_session_timeout = 1.5 T), so the standby leads within 1.5 T + its retry interval
    and commits the waiting record; the old leader notices by its ping deadline and stands
    by. Both stop on SIGTERM with 0 within 10 s and the table is exact."""
    with Simulator(token=TOKEN, seed=301, records=500, record_size=200) as sim:
        common = {"SEQUIN_DB_TIMEOUT": str(T), "SEQUIN_PAGE_SIZE": "100"}
        leader = Worker(["run"], worker_env(sim, proxy.dsn(db), **common), "leader")
        workers.append(leader)
        leader.wait_event("leader_acquired")
        standby = Worker(["run"], worker_env(sim, db, **common), "standby")
        workers.append(standby)
        standby.wait_event("standby")
        wait_for(lambda: caught_up(sim, db), 60, "the initial catch-up")

        key = ("stripe:customer", "after-the-partition")
        with psycopg.connect(db) as blocker:
            # The leader's next batch will wait for the cursor row inside its transaction.
            blocker.execute("SELECT 1 FROM sequin.cursors WHERE consumer = 'default' FOR UPDATE")
            sim.append([sim.make_record(*key, "2031-01-01T00:00:00Z", {"n": 1})])
            wait_for(lambda: blocked_on_a_lock(db), 30, "the leader's batch to wait on the row")
            proxy.blackhole()
            silent_at = time.monotonic()
        # The blocker is gone: the leader's fence got the row, its answer is lost in the
        # proxy, and its session sits idle in transaction holding the row.

        bound = 1.5 * T + 0.2  # idle_session_timeout + the standby's retry interval
        took_over = standby.wait_event("leader_acquired", timeout=bound + 10) - silent_at
        wait_for(lambda: key in fetch_rows(db), 15, "the standby to commit the new record")
        committed = time.monotonic() - silent_at
        assert took_over <= bound + 2.0, f"the standby led {took_over:.1f} s after the partition"
        assert committed <= bound + 5.0, f"first commit {committed:.1f} s after the partition"
        # The old leader noticed by itself (no RST ever came) and did not exit.
        leader.wait_event("leader_lost", timeout=10)
        assert leader.alive
        wait_for(lambda: caught_up(sim, db), 30, "the standby to catch up")

        proxy.close()  # the old leader's connections now fail for good
        for w in (standby, leader):
            rc, took = w.terminate()
            assert rc == 0, w.stderr
            assert took < 10
            assert w.named("worker_stopped")
            assert "Traceback" not in w.stderr
        assert_exact_end_state(db, sim)


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.parametrize("held", ["cursor row", "records row"])
def test_sigterm_with_a_batch_blocked_on_a_lock_exits_0_within_10_s(
    db: str, workers: list[Worker], held: str
) -> None:
    """A backfill's batch waits on a lock someone else holds and keeps holding (lock_timeout
    is set long, so only the shutdown can end the wait): SIGTERM cancels the statement,
    rolls back and exits 0 within 10 s, with the summary line and ``worker_stopped``; rows
    and cursor agree, and a later backfill finishes exactly."""
    faults = FaultConfig(latency=0.05)
    with Simulator(token=TOKEN, seed=302, records=1000, record_size=200, faults=faults) as sim:
        last = ("stripe:customer", "the-last-record")
        sim.append([sim.make_record(*last, "2031-01-01T00:00:00Z", {"n": 1})])
        idx = StreamIndex(sim)
        env = worker_env(
            sim,
            db,
            SEQUIN_PAGE_SIZE="100",
            SEQUIN_BATCH_MAX_RECORDS="100",
            SEQUIN_DB_TIMEOUT="60",
        )
        with psycopg.connect(db) as holder:
            if held == "records row":
                # An uncommitted row of the stream's last key: the last batch's upsert waits.
                holder.execute(
                    "INSERT INTO sequin.records (collection_id, upstream_id,"
                    " upstream_updated_at) VALUES (%s, %s, now())",
                    last,
                )
            w = Worker(["backfill"], env, "backfill")
            workers.append(w)
            w.wait_event("page_applied")
            if held == "cursor row":
                holder.execute("SELECT 1 FROM sequin.cursors WHERE consumer = 'default' FOR UPDATE")
            wait_for(lambda: blocked_on_a_lock(db), 60, "the batch to wait on the lock")
            rc, took = w.terminate(timeout=20)
            still_waiting = blocked_on_a_lock(db)
            holder.rollback()
        assert rc == 0, w.stderr
        assert took < 10, f"exit took {took:.1f} s"
        assert not still_waiting
        assert w.named("shutdown_requested") and w.named("worker_stopped")
        assert summary(w).startswith("backfill interrupted: "), w.stdout
        assert "Traceback" not in w.stderr
        wait_for(lambda: worker_backends(db) == 0, 15, "the worker's sessions to end")
        assert_consistent(db, idx)
        assert run_cli(["backfill"], env).returncode == 0
        assert_exact_end_state(db, sim)


def test_sigterm_while_the_database_is_silent_mid_batch_exits_0_within_10_s(
    db: str, proxy: BlackHoleProxy, workers: list[Worker]
) -> None:
    """The worker's batch is inside its transaction when the database goes silent (no RST,
    no FIN), the worker's own bounds set long: SIGTERM still exits 0 within 10 s, with
    ``worker_stopped``, and without needing the backstop: the cancel goes unanswered, so
    the connection is severed; the lease's unlock is abandoned after its round trip."""
    with Simulator(token=TOKEN, seed=305, records=300, record_size=200) as sim:
        env = worker_env(sim, proxy.dsn(db), SEQUIN_DB_TIMEOUT="60", SEQUIN_PAGE_SIZE="100")
        w = Worker(["run"], env, "run")
        workers.append(w)
        wait_for(lambda: caught_up(sim, db), 60, "the catch-up")
        with psycopg.connect(db) as blocker:
            blocker.execute("SELECT 1 FROM sequin.cursors WHERE consumer = 'default' FOR UPDATE")
            sim.append([sim.make_record("stripe:customer", "x", "2031-01-01T00:00:00Z", {})])
            wait_for(lambda: blocked_on_a_lock(db), 30, "the batch to wait on the row")
            proxy.blackhole()
            rc, took = w.terminate(timeout=20)
        assert rc == 0, w.stderr
        assert took < 10, f"exit took {took:.1f} s"
        assert w.named("db_call_cancelled") and w.named("worker_stopped")
        assert not w.named("shutdown_deadline_exceeded"), "only the backstop ended it"
        assert "Traceback" not in w.stderr


def test_sigterm_during_an_api_retry_wait_writes_the_summary_and_worker_stopped(
    db: str, workers: list[Worker]
) -> None:
    """The API answers 503 to everything; SIGTERM while the client waits to retry: exit 0,
    the summary line ("interrupted") and ``worker_stopped`` are written."""
    faults = FaultConfig(rate_5xx=1.0)
    with Simulator(token=TOKEN, seed=303, records=100, faults=faults) as sim:
        w = Worker(["backfill"], worker_env(sim, db), "backfill")
        workers.append(w)
        w.wait_event("api_retry")
        rc, took = w.terminate()
        assert rc == 0, w.stderr
        assert took < 10
        assert w.named("worker_stopped"), w.stderr
        assert summary(w).startswith("backfill interrupted: 0 records"), w.stdout
        assert "Traceback" not in w.stderr


# --------------------------------------------------------------------------- our objects


def test_the_staging_table_is_ours_whatever_the_search_path(db: str) -> None:
    """A user's table ``public.sequin_stage`` comes first on the search_path: the worker's
    batches still go through its own temporary table, and the user's table is untouched."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.sequin_stage (collection_id text, upstream_id text, sync_id text,"
            " upstream_updated_at timestamptz, created_at timestamptz, deleted boolean,"
            " data jsonb)"
        )
        conn.execute(
            "INSERT INTO public.sequin_stage VALUES ('stripe:customer', 'not-in-the-stream',"
            " NULL, '2030-01-01', NULL, false, '{}')"
        )
        dbname = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{dbname}" SET search_path = public, pg_temp')
    with Simulator(token=TOKEN, seed=304, records=600, record_size=200) as sim:
        env = worker_env(sim, db, SEQUIN_PAGE_SIZE="100", SEQUIN_BATCH_MAX_RECORDS="100")
        proc = run_cli(["backfill"], env)
        assert proc.returncode == 0, proc.stderr
        assert_table_matches(db, sim.expected_state())
    row = fetch_one(db, "SELECT count(*) FROM public.sequin_stage")
    assert row == (1,)


def test_notify_payload_fits_even_with_a_cursor_longer_than_the_limit(db: str) -> None:
    """A cursor longer than NOTIFY's payload limit: the batch commits and the payload is
    truncated (``cursor`` null, ``truncated`` true) instead of failing the transaction."""
    long_cursor = "c" * 9000
    payload = json.loads(notify_payload("default", ApplyResult(cursor=long_cursor)))
    assert payload["truncated"] is True and payload["cursor"] is None

    store = make_store(db)
    store.notify_channel = "sequin_worker"
    got: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("LISTEN sequin_worker")
            ready.set()
            for n in conn.notifies(timeout=10, stop_after=1):
                got.append(n.payload)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(10)
    record: dict[str, Any] = {
        "sync_id": None,
        "collection_id": "stripe:customer",
        "upstream_id": "cus_1",
        "upstream_updated_at": "2024-01-01T00:00:00Z",
        "created_at": "2024-01-01T00:00:00Z",
        "deleted": False,
        "data": {"n": 1},
    }
    page = parse_page([record], cursor=long_cursor, after_cursor=None)
    result = store.apply(Batch(after_cursor=None, pages=[page]))
    store.close()
    assert result.upserted == 1
    listener.join(15)
    assert len(got) == 1
    doc = json.loads(got[0])
    assert doc["truncated"] is True and doc["cursor"] is None and doc["consumer"] == "default"
    assert fetch_one(db, "SELECT cursor FROM sequin.cursors WHERE consumer = 'default'") == (
        long_cursor,
    )


def test_migrate_waits_for_a_table_lock_at_most_the_db_timeout(db: str) -> None:
    """``migrate`` while someone holds a table of the schema locked: it gives up after
    lock_timeout (SEQUIN_DB_TIMEOUT) with exit 6 and says why, instead of queueing (and
    making everyone else queue behind it) for ever."""
    with psycopg.connect(db) as holder:
        holder.execute("LOCK TABLE sequin.schema_migrations IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEQUIN_")}
        env.update(DATABASE_URL=db, SEQUIN_DB_TIMEOUT=str(T), SEQUIN_LOG_FORMAT="json")
        proc = run_cli(["migrate"], env, timeout=60)
        took = time.monotonic() - started
        holder.rollback()
    assert proc.returncode == 6, proc.stderr
    assert "lock timeout" in proc.stderr and "Traceback" not in proc.stderr
    assert took < T + 10
