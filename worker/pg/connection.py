"""Connections to Postgres: :func:`connect` with every wait bounded, :func:`ping`, and the one
translation of psycopg errors into the domain's (:func:`failure`, :func:`translated`): every
module of :mod:`worker.pg` raises :class:`~worker.errors.StoreFailure` (or its subclass
:class:`~worker.errors.StoreUnavailable`), never a psycopg error, to code outside it.

Bounds on every wait on Postgres, and the means to end a wait that outlives its bound.

Two settings drive everything (see :class:`DbTimeouts`). The server enforces what it can
(``lock_timeout``, ``statement_timeout``, ``idle_in_transaction_session_timeout``, its own
TCP keepalives), libpq what the kernel can (``connect_timeout``, keepalives,
``tcp_user_timeout``). Neither helps when the peer is silent but its kernel still answers
(a frozen process, a stuck proxy): for those waits :func:`deadline` and :func:`sever` shut
the socket down from another thread, which ends the blocked call at once with
:class:`psycopg.OperationalError`.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from worker.config import Settings
from worker.errors import ConfigError, StoreFailure, StoreUnavailable
from worker.failures import classify
from worker.pg import sqlfiles

log = structlog.get_logger("worker.pg.connection")

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class DbTimeouts:
    """Every bound on a wait on Postgres, derived from two settings.

    ``wait`` (``SEQUIN_DB_TIMEOUT``, *T*) bounds what should be quick: opening a connection
    (``connect_timeout``); waiting for a row or table lock (``lock_timeout``: the cursor
    fence, every DDL); a transaction left open by a frozen or partitioned client
    (``idle_in_transaction_session_timeout``, enforced by the server); a peer that went
    silent (TCP keepalives on both ends, idle *T*/2 then 3 probes *T*/6 apart, and
    ``tcp_user_timeout`` *T*: noticed within about *T*).

    ``statement`` (``SEQUIN_DB_STATEMENT_TIMEOUT``) bounds one statement of a batch
    (``statement_timeout`` on the data connection) and a wait for another process's
    migrations.
    """

    wait: float
    statement: float

    @classmethod
    def from_settings(cls, settings: Settings) -> DbTimeouts:
        return cls(settings.db_timeout, settings.db_statement_timeout)

    @classmethod
    def default(cls) -> DbTimeouts:
        """The defaults of :class:`Settings` (its fields own them)."""
        fields = Settings.model_fields
        return cls(fields["db_timeout"].default, fields["db_statement_timeout"].default)

    @property
    def round_trip(self) -> float:
        """Bound on a trivial round trip (lease ping, try-lock, unlock, cancel request): a
        healthy server answers in milliseconds; capped at 2 s so that shutdown stays short
        whatever *T* is."""
        return min(2.0, self.wait / 2)

    @property
    def ping_interval(self) -> float:
        """Seconds between the leader's pings of its lock connection."""
        return min(2.0, self.wait / 5)

    def _keepalive(self) -> tuple[int, int, int]:
        idle = max(1, int(self.wait / 2))
        interval = max(1, int(self.wait / 6))
        return idle, interval, 3

    def client_params(self) -> dict[str, Any]:
        """libpq connection parameters."""
        idle, interval, count = self._keepalive()
        return {
            "connect_timeout": max(2, math.ceil(self.wait)),
            "keepalives": 1,
            "keepalives_idle": idle,
            "keepalives_interval": interval,
            "keepalives_count": count,
            "tcp_user_timeout": int(self.wait * 1000),
        }

    def server_settings(self, *, statement: bool) -> dict[str, str]:
        """Session settings for the server's side of one of our connections, each in its
        setting's base unit (seconds for keepalives, milliseconds for the rest)."""
        idle, interval, count = self._keepalive()
        ms = str(int(self.wait * 1000))
        out = {
            "tcp_keepalives_idle": str(idle),
            "tcp_keepalives_interval": str(interval),
            "tcp_keepalives_count": str(count),
            "tcp_user_timeout": ms,
            "idle_in_transaction_session_timeout": ms,
            "lock_timeout": ms,
        }
        if statement:
            out["statement_timeout"] = str(int(self.statement * 1000))
        return out


class DeadlineExceeded(psycopg.OperationalError):
    """A call on a connection outlived its :func:`deadline`; the connection was severed."""


def sever(conn: psycopg.Connection[Any]) -> None:
    """Shut down ``conn``'s socket (both directions) without closing its descriptor.

    Safe from another thread *if* the caller guarantees that ``conn`` is not closed
    meanwhile (its descriptor could be reused): callers hold the lock that guards closing.
    A call blocked on ``conn`` then fails at once with :class:`psycopg.OperationalError`.
    """
    with contextlib.suppress(psycopg.Error, OSError, ValueError):
        if conn.closed:
            return
        # fromfd() duplicates the descriptor; shutdown() acts on the socket both share.
        sock = socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


@contextmanager
def deadline(
    conn: psycopg.Connection[Any], seconds: float, guard: threading.Lock
) -> Iterator[None]:
    """Bound the calls on ``conn`` inside the block to ``seconds``.

    If the block has not finished by then, ``conn`` is severed (under ``guard``, the lock
    its owner holds to close it) and the call in flight fails; the block then raises
    :class:`DeadlineExceeded`. The connection is unusable afterwards: close it.
    """
    fired = threading.Event()

    def expire() -> None:
        with guard:
            fired.set()
            sever(conn)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except psycopg.Error as exc:
        if fired.is_set():
            raise DeadlineExceeded(f"no answer within {seconds:g} s") from exc
        raise
    finally:
        # Should the timer fire as the answer arrives, the result stands and the severed
        # connection fails on its next use (callers reconnect then).
        timer.cancel()


def describe(exc: psycopg.Error) -> str:
    # libpq messages name host and port but never the password; keep the first line.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def failure(exc: psycopg.Error) -> StoreFailure:
    """The domain error for ``exc``, classified by its SQLSTATE; the message is Postgres'
    first line (never the DSN), with the SQLSTATE when there is one."""
    cls = classify(exc.sqlstate)
    text = describe(exc)
    if exc.sqlstate:
        text = f"{text} (SQLSTATE {exc.sqlstate})"
    if cls == "connection_lost":
        return StoreUnavailable(text, sqlstate=exc.sqlstate)
    return StoreFailure(text, failure_class=cls, sqlstate=exc.sqlstate)


def connect(
    dsn: str,
    *,
    autocommit: bool = False,
    application_name: str = "sequin-worker",
    timeouts: DbTimeouts | None = None,
    statement_timeout: bool = False,
) -> Conn:
    """Open a connection whose every wait is bounded (see :class:`DbTimeouts`): libpq's
    connect timeout, keepalives and ``tcp_user_timeout`` on our side; keepalives,
    ``tcp_user_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout`` on
    the server's side, plus ``statement_timeout`` if ``statement_timeout`` is true. A
    stricter value configured on the role or database is kept.

    Raises :class:`StoreUnavailable` (never with the DSN in the message: it may hold a
    password).
    """
    t = timeouts or DbTimeouts.default()
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            application_name=application_name[:63],
            **t.client_params(),
        )
    except psycopg.ProgrammingError:
        # libpq could not even parse the DSN (a typo, another scheme, an unknown parameter):
        # no retry can fix that. Its message may quote the DSN, password included: not shown.
        raise ConfigError(
            [
                "DATABASE_URL: not a valid PostgreSQL connection string (expected "
                "postgresql://user:password@host:port/dbname or key=value pairs)"
            ]
        ) from None
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(describe(exc)) from None
    server = t.server_settings(statement=statement_timeout)
    guard = threading.Lock()
    try:
        # Session settings (not startup options: those would replace any `options` in the
        # DSN, and poolers refuse them). Ours are ceilings: a stricter value set on the role
        # or database stays. One round trip, itself bounded.
        with deadline(conn, t.wait, guard):
            conn.execute(
                sqlfiles.statement("session_settings"),
                {"names": list(server), "values": list(server.values())},
            )
            if not autocommit:
                conn.commit()
    except psycopg.OperationalError as exc:
        with guard:
            conn.close()
        raise StoreUnavailable(describe(exc)) from None
    except psycopg.Error as exc:
        # A server too old for one of them (tcp_user_timeout: Postgres 12): keep the
        # connection; the client-side bounds still hold.
        log.warning("db_session_settings_unavailable", reason=describe(exc))
        conn.rollback()
    return conn


@contextmanager
def translated() -> Iterator[None]:
    """The one translation of psycopg errors at the adapter boundary: any
    :class:`psycopg.Error` raised inside the block leaves it as :func:`failure` of it (a
    :class:`StoreFailure`, :class:`StoreUnavailable` when the connection is lost), so no
    caller outside :mod:`worker.pg` needs ``except psycopg.Error``."""
    try:
        yield
    except psycopg.Error as exc:
        raise failure(exc) from None


def ping(dsn: str, timeout: float = 2.0) -> bool:
    """True if the database answers a query within about ``timeout`` seconds (connecting,
    then the query, each bounded by it)."""
    try:
        with (
            psycopg.connect(
                dsn,
                autocommit=True,
                connect_timeout=max(2, int(timeout)),
                tcp_user_timeout=int(timeout * 1000),
            ) as conn,
            deadline(conn, timeout, threading.Lock()),
        ):
            conn.execute(sqlfiles.statement("ping"))
        return True
    except psycopg.Error:
        return False
