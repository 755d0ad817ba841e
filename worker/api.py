"""The Sequin records API client: the only module that speaks HTTP to Sequin.

:meth:`SequinClient.fetch_page` returns one decoded page or raises:

* :class:`TokenRejected`: 401/403. Retrying cannot help; the operator must fix the token.
* :class:`RequestRejected`: any other 4xx (e.g. a cursor the API does not accept), with the
  server's own message.
* :class:`InvalidRequest`: the request cannot even be sent (e.g. a header value with a line
  break, an invalid URL). No retry can fix it.
* :class:`ApiUnavailable`: the retry budget (``max_retries`` consecutive failures) ran out on
  transient failures. ``max_retries=None`` retries for ever (the ``run`` service).
* :class:`Stopped`: :meth:`SequinClient.abort` was called, or the ``stop`` event set.

Every request has a total deadline, ``request_timeout`` seconds from its start to its last
body byte, whatever the server does (trickling a byte at a time, sending headers and then
nothing): a watchdog (:mod:`worker.http_deadline`) shuts the socket down when it passes, and
the attempt counts as a ``timeout`` failure. ``connect_timeout`` and ``read_timeout`` still
bound each single wait on the socket inside it (a server silent for ``read_timeout`` fails
sooner).

Transient failures are retried with the one backoff (:func:`worker.failures.backoff_delay`,
exponential with jitter): connection errors, timeouts, 429 (waiting at least
``Retry-After``), 500/502/503/504, and bodies whose envelope cannot be read as the
documented ``{"records": [...], "cursor": "..."}`` (see :mod:`worker.codec`: a bad *item*
does not make the body bad; it is dead-lettered). Each retry is
logged as ``api_retry`` with its reason.

A retry wait is a deliberate wait: it calls ``on_wait`` about every 0.1 s (the loop's
heartbeat), and it ends at once on ``stop`` or :meth:`SequinClient.abort`.

The token is sent only in the ``Authorization`` header, never logged, never part of an
exception message, and never sent over plain ``http://`` to a non-loopback host. Redirects
are not followed (they could carry the header elsewhere).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests
import structlog
import tenacity

from worker.codec import decode_page, raw_texts_once
from worker.config import (
    CONNECT_TIMEOUT,
    MAX_RETRIES,
    PAGE_SIZE,
    READ_TIMEOUT,
    REQUEST_TIMEOUT,
    Settings,
    is_loopback_host,
)
from worker.errors import (
    ApiUnavailable,
    InvalidRequest,
    RequestRejected,
    Stopped,
    TokenRejected,
)
from worker.failures import BACKOFF_CAP, BACKOFF_INITIAL, backoff_delay
from worker.http_deadline import GuardedAdapter, RequestGuard, guarding
from worker.model import Page

log = structlog.get_logger("worker.api")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 900.0  # a server asking for more than 15 min is clamped (and logged)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# Failures a retry may cure: the network, the server, a body cut short or garbled on the way.
_TRANSIENT = (
    requests.Timeout,
    requests.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
_HINTS = {
    "InvalidHeader": "a header value has a line break or surrounding whitespace: check "
    "SEQUIN_API_TOKEN",
    "UnicodeEncodeError": "a header value is not plain text: check SEQUIN_API_TOKEN",
    "InvalidURL": "check SEQUIN_BASE_URL",
    "MissingSchema": "check SEQUIN_BASE_URL",
    "InvalidSchema": "check SEQUIN_BASE_URL",
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def server_message(resp: requests.Response) -> str:
    """The error message a server put in its body, in any of the usual shapes."""
    try:
        doc = resp.json()
    except ValueError:
        text = resp.text.strip()
        return _short(text) if text else resp.reason or "no message"
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _short(err["message"])
        for key in ("message", "summary", "detail"):
            if isinstance(doc.get(key), str):
                return _short(doc[key])
        if isinstance(err, str):
            return _short(err)
    return _short(json.dumps(doc))


def _short(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SequinClient:
    """Fetches pages of ``GET {base_url}/v1/records`` for fixed filters.

    Thread-safe for one caller at a time (the prefetch thread). ``stop`` is an optional event:
    when set, waits between retries end early with :class:`Stopped`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        filters: dict[str, str | None] | None = None,
        page_size: int = PAGE_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        max_retries: int | None = MAX_RETRIES,
        allow_insecure_http: bool = False,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_CAP,
        stop: threading.Event | None = None,
        on_request: Callable[[int | str, float], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        on_wait: Callable[[], object] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            if not allow_insecure_http:
                raise ValueError(
                    "refusing to send the API token over plain http:// to a non-loopback host"
                )
        elif parts.scheme not in ("http", "https"):
            raise ValueError("base URL must be http(s)")
        self.url = base_url.rstrip("/") + "/v1/records"
        self._params = {k: v for k, v in (filters or {}).items() if v is not None}
        self.page_size = page_size
        self._timeout = (connect_timeout, min(read_timeout, request_timeout))
        self._request_timeout = request_timeout
        self._guard = RequestGuard()
        self._on_wait = on_wait
        self._max_retries = max_retries
        self._backoff = (backoff_initial, backoff_max)
        self._stop = stop or threading.Event()
        self._on_request = on_request
        self._on_retry = on_retry
        self._session = requests.Session()
        for prefix in ("http://", "https://"):
            self._session.mount(prefix, GuardedAdapter())
        self._session.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "sequin-worker/0.1",
            }
        )
        # Requests would fall back to ~/.netrc credentials when none were given; ours are.
        self._session.trust_env = False

    def close(self) -> None:
        self._session.close()

    def abort(self) -> None:
        """End the request in flight and any retry wait, from any thread: the fetch raises
        :class:`Stopped`, and so does every later one."""
        self._guard.abort()

    def fetch_page(self, after_cursor: str | None) -> Page:
        """Fetch the page after ``after_cursor`` (``None``: the start of the stream)."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retryable),
            stop=(
                tenacity.stop_never
                if self._max_retries is None
                else tenacity.stop_after_attempt(self._max_retries + 1)
            ),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(self._fetch_once, after_cursor)
        except _Retryable as exc:
            attempts = _attempts((self._max_retries or 0) + 1)
            raise ApiUnavailable(
                f"the Sequin API kept failing ({attempts}); last error: {exc.reason}"
            ) from None

    def _fetch_once(self, after_cursor: str | None) -> Page:
        params: dict[str, str | int] = {**self._params, "limit": self.page_size}
        if after_cursor is not None:
            params["after_cursor"] = after_cursor
        if self._guard.aborted.is_set():
            raise Stopped("stopping")
        started = time.perf_counter()
        failure: BaseException | None = None
        self._guard.start(self._request_timeout)
        try:
            with guarding(self._guard):
                resp = self._session.get(
                    self.url, params=params, timeout=self._timeout, allow_redirects=False
                )
                body = resp.content  # read inside the try: a truncated body raises here
        except (requests.RequestException, ValueError) as exc:
            failure = exc
        finally:
            fired = self._guard.finish()
        # Whatever the read returned once the watchdog fired (an error, or a body cut short
        # at a close), it is not a whole response.
        if fired == "aborted":
            raise Stopped("stopping")
        if fired == "deadline":
            self._observe("timeout", started)
            raise _Retryable(
                f"timeout: no complete response within {self._request_timeout:g} s "
                "(SEQUIN_REQUEST_TIMEOUT)"
            )
        # A read timeout in the body comes as a ConnectionError from requests: still a timeout.
        if isinstance(failure, requests.Timeout) or (
            isinstance(failure, requests.ConnectionError)
            and _connection_reason(failure) == "timed out"
        ):
            self._observe("timeout", started)
            raise _Retryable("timeout") from None
        if isinstance(failure, requests.ConnectionError):
            self._observe("connection_error", started)
            raise _Retryable(f"connection error: {_connection_reason(failure)}") from None
        if isinstance(failure, _TRANSIENT):
            self._observe("error", started)
            raise _Retryable(f"request failed: {type(failure).__name__}") from None
        if failure is not None:
            # The request could not be built or sent as configured: retrying repeats it.
            # Only the error's type is shown: some messages quote header values (the token).
            self._observe("error", started)
            name = type(failure).__name__
            hint = _HINTS.get(name, "the request is invalid")
            raise InvalidRequest(f"cannot send the request to the Sequin API ({name}): {hint}")
        status = resp.status_code
        self._observe(status, started)
        if status == 200:
            try:
                records, cursor = decode_page(body)
            except ValueError as exc:
                raise _Retryable(f"bad body: {exc}") from None
            return Page(
                after_cursor=after_cursor,
                records=records,
                cursor=cursor,
                limit=self.page_size,
                raw_texts=raw_texts_once(body),
            )
        if status in (401, 403):
            raise TokenRejected(status, server_message(resp))
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise _Retryable(f"HTTP {status}", retry_after=retry_after)
        if 300 <= status < 400:
            raise RequestRejected(
                status, f"unexpected redirect to {resp.headers.get('Location', '?')}"
            )
        if 400 <= status < 500:
            raise RequestRejected(status, server_message(resp))
        raise _Retryable(f"HTTP {status}")

    def _observe(self, status: int | str, started: float) -> None:
        if self._on_request is not None:
            self._on_request(status, time.perf_counter() - started)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        # The one backoff (0.5 s doubling to 30 s by default, with jitter), but never less
        # than what the server asked for with Retry-After.
        initial, cap = self._backoff
        delay = backoff_delay(state.attempt_number, initial, cap)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            asked = exc.retry_after
            if asked > MAX_RETRY_AFTER:
                log.warning("retry_after_clamped", asked=asked, waiting=MAX_RETRY_AFTER)
                asked = MAX_RETRY_AFTER
            # A small margin: the server measures from when it sent the response.
            delay = max(delay, asked + 0.05)
        return delay

    def _sleep(self, seconds: float) -> None:
        # A deliberate wait: the caller is alive (on_wait) and can be stopped at any time.
        end = time.monotonic() + seconds
        while True:
            if self._stop.is_set() or self._guard.aborted.is_set():
                raise Stopped("stopping")
            if self._on_wait is not None:
                self._on_wait()
            left = end - time.monotonic()
            if left <= 0:
                return
            self._guard.aborted.wait(min(left, 0.1))

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = exc.reason if isinstance(exc, _Retryable) else repr(exc)
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "api_retry",
            reason=reason,
            attempt=state.attempt_number,
            wait_s=round(wait, 3),
        )
        if self._on_retry is not None:
            self._on_retry(reason.split(":", 1)[0])


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def _connection_reason(exc: requests.ConnectionError) -> str:
    # The text of urllib3's errors names host and port, never headers; keep it short.
    text = str(exc)
    for marker in (
        "Connection refused",
        "Connection reset",
        "Connection aborted",
        "RemoteDisconnected",
        "IncompleteRead",
        "Name or service not known",
        "timed out",
        "ProtocolError",
    ):
        if marker in text:
            return marker
    return _short(type(exc).__name__)


def client_from_settings(
    settings: Settings,
    *,
    max_retries: int | None,
    page_size: int | None = None,
    request_timeout: float | None = None,
    stop: threading.Event | None = None,
    on_request: Callable[[int | str, float], None] | None = None,
    on_retry: Callable[[str], None] | None = None,
    on_wait: Callable[[], object] | None = None,
) -> SequinClient:
    """The one construction of a client from the settings (the sync service and ``check``).
    ``request_timeout`` caps the settings' (``check`` answers within 30 s); the read timeout
    is capped with it."""
    assert settings.api_token is not None  # load_settings(require=("api_token", ...))
    timeout = settings.request_timeout
    read = settings.read_timeout
    if request_timeout is not None:
        timeout, read = min(timeout, request_timeout), min(read, request_timeout)
    return SequinClient(
        settings.base_url,
        settings.api_token.get_secret_value(),
        filters=settings.filters,
        page_size=settings.page_size if page_size is None else page_size,
        connect_timeout=settings.connect_timeout,
        read_timeout=read,
        request_timeout=timeout,
        max_retries=max_retries,
        allow_insecure_http=settings.allow_insecure_http,
        stop=stop,
        on_request=on_request,
        on_retry=on_retry,
        on_wait=on_wait,
    )
