"""Bounds on every wait on Postgres, and the means to end a wait that outlives its bound.

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

from worker.config import Settings


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
