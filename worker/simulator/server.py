"""The HTTP side: a ThreadingHTTPServer answering ``GET /v1/records`` from a Stream.

HTTP/1.1 with keep-alive.  Per request: the faults rolled on arrival
(:mod:`worker.simulator.injector`), then auth and parameter checks, then a page of the
stream (where page faults are rolled), then the answer, each request logged in the
:class:`RequestLog` just before its answer is sent (so a client that has an answer finds
its request logged).
"""

from __future__ import annotations

import contextlib
import email.utils
import hmac
import re
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, urlsplit

import orjson

from worker.simulator.cursors import InvalidCursor
from worker.simulator.injector import Faults
from worker.simulator.stream import DEFAULT_LIMIT, MAX_LIMIT, PageQuery, Stream

__all__ = ["RECORDS_PATH", "RequestLog", "RequestLogEntry", "Server"]

RECORDS_PATH = "/v1/records"
_LIMIT_RE = re.compile(r"[0-9]{1,9}")
_REQUEST_LOG_MAX = 100_000


class RequestLogEntry(NamedTuple):
    """One request as the server saw it.

    ``time`` is ``time.monotonic()`` when the request was received; ``params`` the
    query parameters (last value wins); ``status`` the HTTP status sent, or
    ``"drop"`` / ``"truncate"``, or (a 200 altered by a fault) ``"silent"`` /
    ``"trickle"`` / ``"short_page"`` / ``"cycle"`` / ``"rewind"``.
    ``retry_after`` is set for 429 answers only and counts from ``time``: a client
    honouring the ``Retry-After`` header cannot
    send its next request before ``time + retry_after``.  (It is at least the
    header's value; latency and the rounding of HTTP-dates make it larger.)
    """

    time: float
    params: dict[str, str]
    status: int | str
    retry_after: float | None


class RequestLog(list[RequestLogEntry]):
    """Every request in arrival order; a plain list to readers, bounded by :meth:`add`."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def add(self, entry: RequestLogEntry) -> None:
        with self._lock:
            if len(self) >= _REQUEST_LOG_MAX:
                # A long-running `simulate` must not grow without bound.
                del self[: _REQUEST_LOG_MAX // 2]
            self.append(entry)


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


class Server(ThreadingHTTPServer):
    """Serves ``stream`` to bearer ``token`` with ``faults``, logging into ``log``.

    Tracks connections so that :meth:`close_connections` can end idle keep-alives.
    Answers that wait (stalls) end when ``stopping`` is set.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        *,
        stream: Stream,
        token: str,
        faults: Faults,
        log: RequestLog,
        stopping: threading.Event,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.stream = stream
        self.token = token
        self.faults = faults
        self.log = log
        self.stopping = stopping
        self.accepted = 0
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
            self.accepted += 1
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    def close_connections(self) -> None:
        """Shut down every open connection (handler threads waiting for a request see EOF)."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients going away mid-response are normal (and provoked by our faults).
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)

    def records_body(
        self,
        params: dict[str, str],
        authorization: str | None,
        serve: Callable[[PageQuery], bytes],
    ) -> bytes:
        """The body of a 200 answer to GET /v1/records (``serve`` serves a valid query),
        or raise _HTTPError."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if not authorization:
            raise _HTTPError(401, "unauthorized", "missing Authorization: Bearer <token> header")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.token.encode()
        ):
            raise _HTTPError(401, "unauthorized", "invalid API token")

        raw_limit = params.get("limit")
        if raw_limit is None:
            limit = DEFAULT_LIMIT
        elif _LIMIT_RE.fullmatch(raw_limit) and 1 <= int(raw_limit) <= MAX_LIMIT:
            limit = int(raw_limit)
        else:
            raise _HTTPError(
                400, "invalid_parameter", f"limit must be an integer from 1 to {MAX_LIMIT}"
            )
        filters: dict[str, str | None] = {}
        for name in ("sync_id", "provider", "collection"):
            value = params.get(name)
            if value == "":
                raise _HTTPError(400, "invalid_parameter", f"{name} must not be empty")
            filters[name] = value
        flt = self.stream.make_filter(
            filters["sync_id"], filters["provider"], filters["collection"]
        )
        try:
            return self.stream.page(params.get("after_cursor"), limit, flt, serve)
        except InvalidCursor:
            raise _HTTPError(400, "invalid_cursor", "invalid cursor") from None


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests; also the :class:`~worker.simulator.faults.Reply`."""

    protocol_version = "HTTP/1.1"
    server_version = "sequin-simulator/1.0"
    sys_version = ""
    # Headers and body go out in one write; no Nagle delay on the last segment.
    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections are closed after this long

    received = 0.0
    _params: dict[str, str] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a test or benchmark server must not spam stderr

    def do_GET(self) -> None:
        self._dispatch()

    def _method_not_allowed(self) -> None:
        # We do not read a request body, so the connection cannot be reused.
        self.close_connection = True
        self.send_api_error(
            405, "method_not_allowed", "only GET is supported", extra={"Allow": "GET"}
        )

    do_POST = do_PUT = do_PATCH = do_DELETE = _method_not_allowed

    def _dispatch(self) -> None:
        self.received = time.monotonic()
        server = cast("Server", self.server)
        split = urlsplit(self.path)
        self._params = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        faults = server.faults.request()
        if faults.answer(self):
            return
        status: int
        if split.path != RECORDS_PATH:
            status, body = 404, _error_body("not_found", f"no route for {split.path}")
        else:
            authorization = self.headers.get("Authorization")
            try:
                body = server.records_body(self._params, authorization, faults.serve_page)
                status = 200
            except _HTTPError as exc:
                status, body = exc.status, _error_body(exc.code, exc.message)
            except Exception:
                # A simulator bug: say so loudly rather than pass as an injected fault.
                traceback.print_exc()
                status, body = 500, _error_body("simulator_bug", "unexpected error in simulator")
        extra = {"WWW-Authenticate": 'Bearer realm="sequin"'} if status == 401 else None
        faults.deliver(self, status, body, extra=extra)

    # ------------------------------------------------------------------ faults.Reply

    def log(self, status: int | str, retry_after: float | None = None) -> None:
        cast("Server", self.server).log.add(
            RequestLogEntry(self.received, self._params, status, retry_after)
        )

    def hang_up(self) -> None:
        self.close_connection = True

    def reason(self, status: int) -> str:
        return self.responses.get(status, ("Error",))[0]

    def send_api_error(
        self, status: int, code: str, message: str, *, extra: dict[str, str] | None = None
    ) -> None:
        self.send(status, _error_body(code, message), extra=extra)

    def head(
        self,
        status: int,
        length: int,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bytes:
        reason = self.responses.get(status, ("",))[0]
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Server: {self.server_version}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            f"Content-Type: {content_type}",
            f"Content-Length: {length}",
        ]
        lines.extend(f"{name}: {value}" for name, value in (extra or {}).items())
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)  # unbuffered: on the wire when this returns
        except OSError:
            self.close_connection = True  # the client went away; nothing to tell it
            return False
        return True

    def idle(self, seconds: float) -> bool:
        if cast("Server", self.server).stopping.wait(seconds):
            return False
        # Readable with nothing to read: the client closed (or reset) the connection.
        conn = self.connection
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            return not (readable and conn.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return False

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
        cut: int | None = None,
    ) -> None:
        head = self.head(status, len(body), content_type=content_type, extra=extra)
        self.write(head + (body if cut is None else body[:cut]))
