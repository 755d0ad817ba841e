"""A total deadline for one HTTP request made with ``requests``, and a way to abort it.

Blocking socket calls cannot be interrupted from Python, so :class:`RequestGuard` keeps the
sockets the current request uses (see :class:`_GuardedConnection`) and shuts them down when
the deadline passes or :meth:`RequestGuard.abort` is called from another thread: the blocked
read then fails at once. Mount :class:`GuardedAdapter` on the session, and bracket each
request with :meth:`RequestGuard.start` / :meth:`RequestGuard.finish` inside
:func:`guarding`. Used by :mod:`worker.api`; knows nothing of Sequin.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class RequestGuard:
    """Ends the request in flight when its deadline passes, or when :meth:`abort` is called
    from another thread.

    Blocking socket calls cannot be interrupted from Python, so the guard keeps the sockets
    the current request uses (see :class:`_GuardedConnection`) and shuts them down: the
    blocked read then fails at once. It keeps the sockets, not the connections: a response
    with ``Connection: close`` takes the socket away from its connection. The watchdog is a
    timer thread per request, cancelled and joined when the request ends, so none outlives
    it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._fired: str | None = None  # "deadline" or "aborted", for the current request
        self._timer: threading.Timer | None = None
        self.aborted = threading.Event()

    def start(self, seconds: float) -> None:
        with self._lock:
            self._socks = []
            self._fired = "aborted" if self.aborted.is_set() else None
        timer = threading.Timer(seconds, self._fire, args=("deadline",))
        timer.name = "sequin-request-deadline"
        timer.daemon = True
        self._timer = timer
        timer.start()

    def finish(self) -> str | None:
        """End the current request's watch; returns why it fired, if it did."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            timer.join()
        with self._lock:
            self._socks = []
            return self._fired

    def attach(self, conn: HTTPConnection) -> None:
        sock = getattr(conn, "sock", None)  # None until connected
        if sock is None:
            return
        with self._lock:
            if sock not in self._socks:
                self._socks.append(sock)
            if self._fired is not None:
                _shutdown(sock)

    def abort(self) -> None:
        self.aborted.set()
        self._fire("aborted")

    def _fire(self, reason: str) -> None:
        with self._lock:
            if self._fired is None:
                self._fired = reason
            for sock in self._socks:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for a TLS socket: it wakes a blocked read (a
    # close would not), even after the connection let go of the socket.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


# The guard of the request the current thread is making (a client is used by one thread at
# a time, and urllib3 gives a connection no other way to find it).
_current = threading.local()


def _attach_current(conn: HTTPConnection) -> None:
    guard: RequestGuard | None = getattr(_current, "guard", None)
    if guard is not None:
        guard.attach(conn)


class _GuardedConnection(HTTPConnection):
    """Registers itself with the current request's guard when it connects or sends."""

    def connect(self) -> None:
        _attach_current(self)
        super().connect()
        _attach_current(self)  # a deadline passed while connecting ends the request here

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_current(self)
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        _attach_current(self)
        super().connect()
        _attach_current(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_current(self)
        super().request(*args, **kwargs)


class _GuardedPool(HTTPConnectionPool):
    ConnectionCls = _GuardedConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedPool, "https": _GuardedHTTPSPool}


@contextlib.contextmanager
def guarding(guard: RequestGuard) -> Iterator[None]:
    """Make ``guard`` the one the current thread's connections register with."""
    _current.guard = guard
    try:
        yield
    finally:
        _current.guard = None
