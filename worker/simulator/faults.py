"""Injected faults: what may go wrong with one request, how often, and what it looks like.

Everything about a fault mode is declared here, in one place:

* its knobs, as fields of :class:`FaultConfig` (a rate in [0, 1] plus any parameters);
* its command-line flags, as rows of :data:`FLAGS`;
* the mode itself, as a :class:`Fault` subclass listed in :data:`MODES`: the ``rate``
  field it is rolled with, ``decide`` (any further random choices, drawn from the fault
  RNG when the mode is rolled) and one or more hooks saying what it does to the answer:
  ``answer`` (answer instead of the server), ``shape_page`` (change the page query) or
  ``deliver`` (change how the real answer goes out).

The server (:mod:`worker.simulator.server`) only calls :meth:`Faults.roll` once per
request and then the hooks of the fault it got; it knows no mode by name.
"""

from __future__ import annotations

import argparse
import email.utils
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol

from worker.simulator.dataset import Pos

__all__ = [
    "FLAGS",
    "MODES",
    "Fault",
    "FaultConfig",
    "Faults",
    "Reply",
    "add_arguments",
    "config_from_args",
]


@dataclass
class FaultConfig:
    """Faults injected per request, decided by an RNG seeded with ``seed``.

    Rates are probabilities in [0, 1] and are tried in the order of :data:`MODES` from
    one draw: ``rate_drop``, ``rate_truncate``, ``rate_429``, ``rate_5xx`` (so their sum
    should not exceed 1).  Every field may be changed while the server runs.

    * ``latency``: seconds slept before answering every request (faulty or not).
    * ``rate_429``: answer 429 with ``Retry-After``.  The header carries
      ``retry_after`` seconds, except for a ``retry_after_http_date_share`` of
      them where it carries an HTTP-date (rounded up to the next whole second, so
      never earlier than ``retry_after``).  A non-integral ``retry_after`` is sent
      as a decimal (e.g. ``0.25``), which RFC 9110 does not allow but keeps tests
      fast; use whole seconds for strictly conforming headers.
    * ``rate_5xx``: answer 500, 502, 503 or 504; an ``html_share`` of them with
      an HTML body (as a proxy would), the others with the JSON error body.
    * ``rate_drop``: close the connection without sending anything.
    * ``rate_truncate``: send the real response's headers (full Content-Length)
      and only half of its body, then close the connection.
    """

    latency: float = 0.0
    rate_429: float = 0.0
    retry_after: float = 1.0
    retry_after_http_date_share: float = 0.25
    rate_5xx: float = 0.0
    html_share: float = 0.5
    rate_drop: float = 0.0
    rate_truncate: float = 0.0
    seed: int = 0

    # Fields that are probabilities, and fields that are durations.
    SHARES: ClassVar[tuple[str, ...]] = (
        "rate_429",
        "retry_after_http_date_share",
        "rate_5xx",
        "html_share",
        "rate_drop",
        "rate_truncate",
    )
    DURATIONS: ClassVar[tuple[str, ...]] = ("latency", "retry_after")

    def __post_init__(self) -> None:
        for name in self.SHARES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be within [0, 1], got {value!r}")
        for name in self.DURATIONS:
            if getattr(self, name) < 0:
                raise ValueError(f"FaultConfig.{name} must be >= 0")


class Reply(Protocol):
    """The server's side of one exchange, as a fault sees it (see server._Handler).

    ``log`` must be called before anything is sent, so that a client holding an
    answer always finds its request in the request log.
    """

    received: float  # time.monotonic() when the request arrived

    def log(self, status: int | str, retry_after: float | None = None) -> None:
        """Record the request with ``status`` (an HTTP status or a fault's name)."""

    def head(
        self,
        status: int,
        length: int,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bytes:
        """The status line and headers of an answer with ``Content-Length: length``."""

    def write(self, data: bytes) -> bool:
        """Put raw bytes on the wire now; False if the client has gone away."""

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
        cut: int | None = None,
    ) -> None:
        """``write(head(...) + body[:cut])``: a full Content-Length, maybe less body."""

    def send_api_error(
        self, status: int, code: str, message: str, *, extra: dict[str, str] | None = None
    ) -> None:
        """Send the API's JSON error body."""

    def hang_up(self) -> None:
        """Close the connection after this exchange (before ``send``: says so in a header)."""

    def reason(self, status: int) -> str:
        """The reason phrase of ``status`` (``"Service Unavailable"``)."""


class Fault:
    """A fault decided for one request.  A mode overrides the hooks it needs."""

    rate: ClassVar[str]  # the FaultConfig field holding this mode's probability

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig) -> Fault:
        """This mode's fault for one request; draws its own choices from ``rng``."""
        return cls()

    def answer(self, reply: Reply, config: FaultConfig) -> bool:
        """Answer in place of the server and return True, or return False to go on."""
        return False

    def shape_page(self, after: Pos | None, limit: int) -> tuple[Pos | None, int]:
        """Change a ``GET /v1/records`` query (after a valid cursor was checked)."""
        return after, limit

    def deliver(
        self,
        reply: Reply,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        """Send the server's real answer (status and body); faults may mangle it."""
        reply.log(status)
        reply.send(status, body, content_type=content_type, extra=extra)


NO_FAULT = Fault()  # the hooks' defaults: a request answered as it should be


class Drop(Fault):
    """Close the connection without sending anything."""

    rate = "rate_drop"

    def answer(self, reply: Reply, config: FaultConfig) -> bool:
        reply.hang_up()
        reply.log("drop")
        return True


class Truncate(Fault):
    """Send the real headers (full Content-Length), half the body, then close."""

    rate = "rate_truncate"

    def deliver(
        self,
        reply: Reply,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        reply.log("truncate")
        reply.hang_up()
        reply.send(status, body, content_type=content_type, extra=extra, cut=len(body) // 2)


class RateLimited(Fault):
    """429 with ``Retry-After`` in seconds or, for some, as an HTTP-date."""

    rate = "rate_429"

    def __init__(self, http_date: bool) -> None:
        self.http_date = http_date

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig) -> Fault:
        return cls(http_date=rng.random() < config.retry_after_http_date_share)

    def answer(self, reply: Reply, config: FaultConfig) -> bool:
        if self.http_date:
            # HTTP-dates have whole-second resolution: round up, never promise less.
            deadline = math.ceil(time.time() + config.retry_after)
            header = email.utils.formatdate(deadline, usegmt=True)
            promise = time.monotonic() + (deadline - time.time()) - reply.received
        else:
            seconds = config.retry_after
            header = str(int(seconds)) if seconds == int(seconds) else format(seconds, "g")
            promise = time.monotonic() + seconds - reply.received
        reply.log(429, promise)
        message = f"too many requests; retry after {header}"
        reply.send_api_error(429, "rate_limited", message, extra={"Retry-After": header})
        return True


class ServerError(Fault):
    """500, 502, 503 or 504, with the API's JSON error body or a proxy's HTML page."""

    rate = "rate_5xx"

    def __init__(self, status: int, html: bool) -> None:
        self.status = status
        self.html = html

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig) -> Fault:
        status = rng.choice((500, 502, 503, 504))
        return cls(status, html=rng.random() < config.html_share)

    def answer(self, reply: Reply, config: FaultConfig) -> bool:
        status, reason = self.status, reply.reason(self.status)
        reply.log(status)
        if self.html:
            # What a proxy in front of the API would send.
            body = (
                f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
                f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
                "</body>\r\n</html>\r\n"
            ).encode()
            reply.send(status, body, content_type="text/html")
        else:
            code = reason.lower().replace(" ", "_")
            reply.send_api_error(status, code, f"upstream error ({status} {reason})")
        return True


# The modes, in the order their rates are tried from one draw.  Append new modes at the
# end: the fault sequence of an existing seed then stays the same while their rates are 0.
MODES: tuple[type[Fault], ...] = (Drop, Truncate, RateLimited, ServerError)


class Faults:
    """The live fault configuration and the RNG that rolls a fault per request.

    Thread-safe.  Replacing :attr:`config` restarts the RNG from the new seed, so a
    test that switches faults on gets the same sequence every run.
    """

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._config = config if config is not None else FaultConfig()
        self._rng = random.Random(self._config.seed)
        self._lock = threading.Lock()

    @property
    def config(self) -> FaultConfig:
        return self._config

    @config.setter
    def config(self, value: FaultConfig) -> None:
        with self._lock:
            self._config = value
            self._rng = random.Random(value.seed)

    def roll(self) -> tuple[Fault, FaultConfig]:
        """Sleep the configured latency, then decide this request's fault.

        Returns :data:`NO_FAULT` when no mode is rolled, and the configuration the
        fault's hooks are to read.
        """
        if self._config.latency > 0:
            time.sleep(self._config.latency)
        with self._lock:
            config, rng = self._config, self._rng
            u = rng.random()
            for mode in MODES:
                rate: float = getattr(config, mode.rate)
                if u < rate:
                    return mode.decide(rng, config), config
                u -= rate
            return NO_FAULT, config


# ---------------------------------------------------------------------------- CLI flags


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a float >= 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class Flag(NamedTuple):
    """A command-line flag setting one FaultConfig field to its value divided by ``per``."""

    flag: str
    field: str
    parse: Callable[[str], float]
    help: str
    per: float = 1.0  # flag units per field unit (1000 for a flag in ms of a field in s)


FLAGS: tuple[Flag, ...] = (
    Flag("--latency-ms", "latency", non_negative, "added to each request", per=1000.0),
    Flag("--fault-429", "rate_429", _rate, "share of 429 answers"),
    Flag("--retry-after", "retry_after", non_negative, "Retry-After seconds for 429s"),
    Flag("--fault-5xx", "rate_5xx", _rate, "share of 5xx answers"),
    Flag("--fault-drop", "rate_drop", _rate, "share of dropped connections"),
    Flag("--fault-truncate", "rate_truncate", _rate, "share of truncated bodies"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every fault flag of :data:`FLAGS`, defaulting to FaultConfig's defaults."""
    defaults = FaultConfig()
    for flag in FLAGS:
        default = getattr(defaults, flag.field) * flag.per
        parser.add_argument(
            flag.flag,
            dest=flag.field,
            metavar=flag.flag[2:].upper().replace("-", "_"),
            type=flag.parse,
            default=default,
            help=flag.help,
        )


def config_from_args(args: argparse.Namespace, seed: int) -> FaultConfig:
    """The FaultConfig the parsed flags ask for.  Raises ValueError if it is invalid."""
    values = {flag.field: getattr(args, flag.field) / flag.per for flag in FLAGS}
    return FaultConfig(seed=seed, **values)
