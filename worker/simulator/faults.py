"""Injected faults: what may go wrong with one request, how often, and what it looks like.

Everything about a fault mode is declared here, in one place:

* its knobs, as fields of :class:`FaultConfig` (a rate in [0, 1], listed in ``SHARES``,
  plus any parameters; durations listed in ``DURATIONS``);
* its command-line flags, as rows of :data:`FLAGS`;
* the mode itself, as a :class:`~worker.simulator.hooks.Fault` subclass listed in a group
  of :data:`GROUPS`: the ``rate`` field it is rolled with, ``decide`` (any further random
  choices, drawn from the fault RNG when the mode is rolled) and one or more hooks saying
  what it does: ``answer`` (answer instead of the server), ``shape_page`` (serve another
  page) or ``deliver`` (change how the real answer goes out; :class:`Reply` has ``head``,
  ``write`` and ``idle`` to pace or split the bytes).

A mode joins, at its end, the group whose stage fits its hooks (see
:class:`~worker.simulator.hooks.Group`), or starts a new group at the end of :data:`GROUPS`;
either way the fault sequence of an existing seed stays the same while the new rate is 0.
The server
(:mod:`worker.simulator.server`) only asks :class:`~worker.simulator.injector.Faults` for
the faults of each request and calls their hooks; it knows no mode by name.

Items a client must isolate one by one are not faults of a request but records of the
stream: see :mod:`worker.simulator.hostile`.
"""

from __future__ import annotations

import argparse
import email.utils
import math
import random
import time
from dataclasses import dataclass
from typing import ClassVar

from worker.simulator.hooks import Fault, Flag, Group, Reply
from worker.simulator.stream import PageQuery

__all__ = ["FLAGS", "GROUPS", "FaultConfig", "non_negative"]


@dataclass
class FaultConfig:
    """Faults injected per request, decided by an RNG seeded with ``seed``.

    Rates are probabilities in [0, 1].  Each group of :data:`GROUPS` is drawn on its own,
    its rates tried in order from one draw (so their sum should not exceed 1; it must not,
    for every group but the first).  Every field may be changed while the server runs.

    Answers instead of the server (drawn for every request, in this order: ``rate_drop``,
    ``rate_truncate``, ``rate_429``, ``rate_5xx``):

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

    Stalls and pagination faults (each group drawn separately, only when one of its
    rates is set, so the sequences above do not change):

    * ``rate_silent``: answer nothing until the client gives up (or the server
      stops): after the real headers, or with ``silent_before_headers`` not even
      those.
    * ``rate_trickle``: send the real headers, then the body ``trickle_bytes`` at
      a time every ``trickle_interval`` seconds.
    * ``rate_short_page``: a page that would be full comes back with fewer records
      (1 to limit-1) though more follow; its cursor is that of its last record.
    * ``rate_cycle``: the right records, but the cursor handed back is one the
      client sent earlier (the one before the cursor of this request).
    * ``rate_rewind``: records from an earlier position (after the cursor the
      client sent before this request's, limit-1 of them) under a fresh cursor:
      records older than the previous page ended with.

    Stalls apply to 200 answers only.  Cycles and rewinds remember the cursors of
    recent requests across clients; they are meant for one client at a time.
    Raises ValueError for a value out of range.
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
    # Stalls.
    rate_silent: float = 0.0
    silent_before_headers: bool = False
    rate_trickle: float = 0.0
    trickle_bytes: int = 1
    trickle_interval: float = 2.0
    # Pagination faults.
    rate_short_page: float = 0.0
    rate_cycle: float = 0.0
    rate_rewind: float = 0.0

    # Fields that are probabilities, and fields that are durations.
    SHARES: ClassVar[tuple[str, ...]] = (
        "rate_429",
        "retry_after_http_date_share",
        "rate_5xx",
        "html_share",
        "rate_drop",
        "rate_truncate",
        "rate_silent",
        "rate_trickle",
        "rate_short_page",
        "rate_cycle",
        "rate_rewind",
    )
    DURATIONS: ClassVar[tuple[str, ...]] = ("latency", "retry_after", "trickle_interval")

    def __post_init__(self) -> None:
        for name in self.SHARES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be within [0, 1], got {value!r}")
        for name in self.DURATIONS:
            if getattr(self, name) < 0:
                raise ValueError(f"FaultConfig.{name} must be >= 0")
        # The first group's sum was never checked; keep accepting what it accepted.
        for group in GROUPS[1:]:
            rates = [mode.rate for mode in group.modes]
            if sum(getattr(self, name) for name in rates) > 1.0:
                raise ValueError(f"FaultConfig.{' + '.join(rates)} must not exceed 1")
        if self.trickle_bytes < 1:
            raise ValueError("FaultConfig.trickle_bytes must be >= 1")


# ------------------------------------------------------------------ answers instead of ours


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
    ) -> bool:
        reply.log("truncate")
        reply.hang_up()
        reply.send(status, body, content_type=content_type, extra=extra, cut=len(body) // 2)
        return True


class RateLimited(Fault):
    """429 with ``Retry-After`` in seconds or, for some, as an HTTP-date."""

    rate = "rate_429"

    def __init__(self, http_date: bool) -> None:
        self.http_date = http_date

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig, query: PageQuery | None) -> Fault:
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
    def decide(cls, rng: random.Random, config: FaultConfig, query: PageQuery | None) -> Fault:
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


# ------------------------------------------------------------------------------- stalls


class Silent(Fault):
    """A 200 that never comes: the headers then nothing, or nothing at all."""

    rate = "rate_silent"

    def __init__(self, before_headers: bool) -> None:
        self.before_headers = before_headers

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig, query: PageQuery | None) -> Fault:
        return cls(config.silent_before_headers)

    def deliver(
        self,
        reply: Reply,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bool:
        if status != 200:
            return False
        reply.log("silent")
        reply.hang_up()  # the client may give up mid-answer
        head = reply.head(status, len(body), content_type=content_type, extra=extra)
        if self.before_headers or reply.write(head):
            while reply.idle(0.05):
                pass  # until the client leaves or the server stops
        return True


class Trickle(Fault):
    """A 200 whose body comes ``trickle_bytes`` at a time every ``trickle_interval`` s."""

    rate = "rate_trickle"

    def __init__(self, step: int, interval: float) -> None:
        self.step = step
        self.interval = interval

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig, query: PageQuery | None) -> Fault:
        return cls(config.trickle_bytes, config.trickle_interval)

    def deliver(
        self,
        reply: Reply,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bool:
        if status != 200:
            return False
        reply.log("trickle")
        reply.hang_up()  # the client may give up mid-answer
        if not reply.write(reply.head(status, len(body), content_type=content_type, extra=extra)):
            return True
        for start in range(0, len(body), self.step):
            if not reply.idle(self.interval) or not reply.write(body[start : start + self.step]):
                return True
        return True


# --------------------------------------------------------------------- pagination faults


class ShortPage(Fault):
    """A page that would be full comes back with 1 to limit-1 records; more follow."""

    rate = "rate_short_page"
    label = "short_page"

    def __init__(self, size: int) -> None:
        self.size = size

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig, query: PageQuery | None) -> Fault:
        assert query is not None, "a page fault is rolled with its page"
        limit = query.limit
        return cls(rng.randint(1, limit - 1) if limit > 1 else limit)

    def shape_page(self, query: PageQuery, earlier: str | None) -> bytes | None:
        items, _ = query.records(query.after, query.limit)
        if len(items) < query.limit or self.size >= query.limit:
            return None  # not a full page: nothing to cut
        items, last = query.records(query.after, self.size)
        return query.body(items, last, query.sent)


class Cycle(Fault):
    """The right records, under a cursor a request sent before this one's."""

    rate = "rate_cycle"
    label = "cycle"

    def shape_page(self, query: PageQuery, earlier: str | None) -> bytes | None:
        if earlier is None:
            return None  # nothing to go back to yet
        items, _ = query.records(query.after, query.limit)
        return query.body(items, None, earlier)


class Rewind(Fault):
    """Records after a cursor a request sent before this one's, under a fresh cursor."""

    rate = "rate_rewind"
    label = "rewind"

    def shape_page(self, query: PageQuery, earlier: str | None) -> bytes | None:
        if earlier is None:
            return None  # nothing to go back to yet
        items, last = query.records(query.position(earlier), max(1, query.limit - 1))
        return query.body(items, last, earlier)


# The groups, each drawn on its own (see hooks.Group).  Append new modes at the end of a
# group, or a new group at the end: the fault sequence of an existing seed then stays the
# same while their rates are 0.
GROUPS: tuple[Group, ...] = (
    # Drawn for every request, as they were before there were groups.
    Group("arrival", (Drop, Truncate, RateLimited, ServerError), always=True),
    Group("arrival", (Silent, Trickle)),
    Group("page", (ShortPage, Cycle, Rewind)),
)


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


FLAGS: tuple[Flag, ...] = (
    Flag("--latency-ms", "latency", non_negative, "added to each request", per=1000.0),
    Flag("--fault-429", "rate_429", _rate, "share of 429 answers"),
    Flag("--retry-after", "retry_after", non_negative, "Retry-After seconds for 429s"),
    Flag("--fault-5xx", "rate_5xx", _rate, "share of 5xx answers"),
    Flag("--fault-drop", "rate_drop", _rate, "share of dropped connections"),
    Flag("--fault-truncate", "rate_truncate", _rate, "share of truncated bodies"),
    Flag("--fault-silent", "rate_silent", _rate, "share of answers that never come"),
    Flag(
        "--silent-before-headers",
        "silent_before_headers",
        None,
        "silent answers send nothing at all (default: the headers, then nothing)",
    ),
    Flag("--fault-trickle", "rate_trickle", _rate, "share of bodies sent a little at a time"),
    Flag("--trickle-bytes", "trickle_bytes", int, "bytes per trickled write (default 1)"),
    Flag(
        "--trickle-interval",
        "trickle_interval",
        non_negative,
        "seconds between trickled writes (default 2)",
    ),
    Flag(
        "--fault-short-page",
        "rate_short_page",
        _rate,
        "share of full pages cut short though more records follow",
    ),
    Flag("--fault-cycle", "rate_cycle", _rate, "share of pages whose cursor goes back"),
    Flag(
        "--fault-rewind",
        "rate_rewind",
        _rate,
        "share of pages serving records older than the previous page",
    ),
)
