"""Leadership of a consumer: a session-level advisory lock on a dedicated connection.

Contract: at most one process holds a consumer's lock at a time; the holder is the leader
and is the only one that applies batches. Others wait as hot standbys, retrying every
``retry_interval`` seconds. A leader that dies releases the lock with its connection (at
once when the process exits; within ``idle_session_timeout`` when it is partitioned away
or frozen, because it stops pinging and the server ends its session: 1.5 times SEQUIN_DB_TIMEOUT,
at least three standby retry intervals).

Every call on the lock connection (try-lock, ping, unlock) is bounded by
:attr:`DbTimeouts.round_trip` on our side too: a server that stops answering without closing
the connection (a partition, a stuck proxy) is noticed as a lost connection.

Failure mode: when the lock connection fails or stops answering, :attr:`Lease.lost` is set
within ``ping_interval + round_trip`` seconds and the leader must stop writing at once. The
window between
the loss and the leader noticing is covered by the store's cursor fence (a batch commits
only if the cursor is still where this process left it), so even then nothing is applied
twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import psycopg
import structlog

from worker.errors import StoreUnavailable
from worker.pg import sqlfiles
from worker.pg.connection import Conn, DbTimeouts, connect, deadline, describe, failure

log = structlog.get_logger("worker.pg.lease")


class Lease:
    """Advisory-lock leadership for one consumer. Use from one thread (plus its watchdog)."""

    def __init__(
        self,
        dsn: str,
        key: int,
        *,
        name: str,
        retry_interval: float = 3.0,
        timeouts: DbTimeouts | None = None,
    ) -> None:
        self._dsn = dsn
        self.key = key
        self.name = name
        self.retry_interval = retry_interval
        self.timeouts = timeouts or DbTimeouts.default()
        self.ping_interval = self.timeouts.ping_interval
        self.lost = threading.Event()
        self._conn: Conn | None = None
        # Held to close the connection and, by a deadline's timer, to sever it.
        self._guard = threading.Lock()
        # One call at a time on the connection (the watchdog's ping, release's unlock).
        self._calls = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._released = threading.Event()
        self.is_leader = False

    def _connect(self) -> Conn:
        # Server-side keepalives and an idle timeout make the server notice a dead leader.
        # The timeout outlasts a standby's pause between attempts, so standbys keep theirs.
        conn = connect(
            self._dsn,
            autocommit=True,
            application_name=f"sequin-worker-lock:{self.name}",
            timeouts=self.timeouts,
        )
        idle_ms = int(max(self.timeouts.wait * 1.5, self.retry_interval * 3) * 1000)
        try:
            with deadline(conn, self.timeouts.round_trip, self._guard):
                conn.execute(
                    sqlfiles.statement("set_idle_session_timeout"), {"timeout": str(idle_ms)}
                )
        except psycopg.OperationalError:
            with self._guard:  # never while a deadline's timer may be severing it
                conn.close()
            raise
        except psycopg.Error as exc:
            # Postgres before 14 has no idle_session_timeout: a dead leader's lock is then
            # released when the server's TCP keepalives give up.
            log.warning("lock_session_settings_unavailable", reason=describe(exc))
        return conn

    def try_acquire(self) -> bool:
        """One attempt. Raises :class:`StoreUnavailable` if the database cannot be reached."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            row = self._call("try_advisory_lock", {"key": self.key})
        except psycopg.OperationalError as exc:
            self._drop()
            raise StoreUnavailable(describe(exc)) from None
        except psycopg.Error as exc:
            self._drop()
            raise failure(exc) from None
        if not row or not row[0]:
            return False
        self.is_leader = True
        self.lost.clear()
        self._released.clear()
        self._watchdog = threading.Thread(target=self._watch, name="lease-watchdog", daemon=True)
        self._watchdog.start()
        log.info("leader_acquired", consumer=self.name)
        return True

    def acquire(
        self,
        stop: threading.Event,
        *,
        wait: bool = True,
        on_wait: Callable[[], object] | None = None,
    ) -> bool:
        """Become the leader. Blocks as a standby while another process leads.

        Returns False if ``stop`` is set first, or at once if ``wait`` is False and another
        process holds the lock.
        """
        announced = False
        while not stop.is_set():
            try:
                if self.try_acquire():
                    return True
                if not wait:
                    return False
                if not announced:
                    log.info("standby", consumer=self.name, retry_s=self.retry_interval)
                    announced = True
            except StoreUnavailable as exc:
                log.warning("lock_db_unavailable", consumer=self.name, reason=str(exc))
            if on_wait is not None:
                on_wait()  # a standby is alive: keep the heartbeat fresh
            stop.wait(self.retry_interval)
        return False

    def _call(
        self, name: str, params: dict[str, object] | None = None
    ) -> tuple[object, ...] | None:
        """Named query ``name`` on the lock connection, bounded by ``round_trip`` seconds (then
        :class:`~worker.pg.connection.DeadlineExceeded`, an :class:`psycopg.OperationalError`)."""
        bound = self.timeouts.round_trip
        if not self._calls.acquire(timeout=bound):
            raise psycopg.OperationalError(f"lock connection busy for {bound:g} s")
        try:
            conn = self._conn
            if conn is None or conn.closed:
                raise psycopg.OperationalError("no connection")
            with deadline(conn, bound, self._guard):
                return conn.execute(sqlfiles.statement(name), params).fetchone()
        finally:
            self._calls.release()

    def _watch(self) -> None:
        while not self._released.wait(self.ping_interval):
            try:
                self._call("ping")
            except psycopg.Error as exc:
                if self._released.is_set():
                    return
                log.error("leader_lost", consumer=self.name, reason=describe(exc))
                self.is_leader = False
                self.lost.set()
                self._drop()
                return

    def release(self) -> None:
        """Give up leadership (and the lock connection). Returns within about twice
        ``round_trip`` seconds whatever the server does: a silent one has its connection
        dropped (the server then ends the session, and the lock with it, by its
        ``idle_session_timeout`` or keepalives)."""
        was_leader = self.is_leader
        self._released.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=self.timeouts.round_trip)
            self._watchdog = None
        if was_leader:
            with contextlib.suppress(psycopg.Error):
                self._call("advisory_unlock", {"key": self.key})
        self._drop()
        self.is_leader = False
        if was_leader:
            log.info("leader_released", consumer=self.name)

    def _drop(self) -> None:
        with self._guard:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None
