"""A local fake of Sequin's ``GET /v1/records`` endpoint.

This module is an independent reading of the API document
(``shared/spec/sequin-records-api.txt``) and deliberately imports nothing from the
rest of the ``worker`` package: when the client and the simulator agree, it is
because both follow the document, not because they share code.  It is used by the
tests (over real sockets), the benchmarks, the demo and ``sequin-worker simulate``.

The stream
----------
The stream is an ordered sequence of records sorted by ``(upstream_updated_at,
insertion sequence)``.  It has two parts, merged when paging:

* the *base* records ``0 .. records-1``.  Record ``i`` is a pure function of
  ``(seed, i)`` and is generated on demand, so a million records cost no memory.
  Base record ``i`` has sequence number ``i``; its timestamp is non-decreasing in
  ``i``, so a position can be found by bisection without a stored list.
* the *extra* records added at run time (:meth:`Simulator.append`,
  :meth:`Simulator.append_raw`, live mode), kept in a sorted list.  They get
  sequence numbers ``records, records+1, ...`` in insertion order, so among
  records with equal timestamps base records come first, then extras in the
  order they were added.

The base dataset deliberately contains what a sync worker must get right:
equal timestamps across page boundaries (including runs longer than a page),
repeated updates of a key (sometimes two versions with the same timestamp, so
"newer wins" must mean "later in the stream"), deletes with and without
``data``, updates after a delete, and non-ASCII text.

Cursor format
-------------
A cursor is the unpadded URL-safe base64 of ``"<ts_micros>:<seq>"`` naming the
position of a record that exists in the stream; records strictly after that
position are returned.  The start of the stream is the base64 of ``"start"``
(``"c3RhcnQ"``).  Anything else (not canonical base64, another payload, or a
position where there is no record, e.g. a cursor of another seed) is answered
with ``400 invalid_cursor``.  Clients must treat cursors as opaque.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import contextlib
import datetime as dt
import email.utils
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, urlsplit

import orjson

__all__ = [
    "FaultConfig",
    "RequestLogEntry",
    "Simulator",
    "format_ts",
    "main",
    "parse_ts",
]

RECORDS_PATH = "/v1/records"
DEFAULT_LIMIT = 100
MAX_LIMIT = 500

# Base timeline: record i is stamped about i seconds after 2024-01-01T00:00:00Z.
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_ORDINAL = _EPOCH.date().toordinal()
_BASE_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z in microseconds
_STEP_US = 1_000_000
_US_PER_DAY = 86_400_000_000

# Timestamp clusters.  Besides ~10% of records sharing the timestamp of their
# predecessor, some chunks contain a "bulk" run of 300-799 records stamped with
# one timestamp (a mass update upstream), longer than the largest page, so that
# paging inside a single timestamp is exercised at limit=500 too.
_CHUNK_BITS = 10
_CHUNK_MASK = (1 << _CHUNK_BITS) - 1
_TIE_PERCENT = 10
_BULK_ONE_IN = 24
_DELETE_PERCENT = 6  # of updates; creations are never deletes -> ~5% overall
_POOL_SIZE = 64  # distinct data bodies per collection
_KEY_CACHE_MAX = 1 << 17

_M64 = (1 << 64) - 1
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_START_PAYLOAD = b"start"
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")
_POSITION_RE = re.compile(rb"(-?[0-9]{1,20}):([0-9]{1,20})")
_LIMIT_RE = re.compile(r"[0-9]{1,9}")
_REQUEST_LOG_MAX = 100_000

_Pos = tuple[int, int]  # (upstream_updated_at in microseconds, sequence number)


def _mix(x: int) -> int:
    """SplitMix64 finaliser: a fast, well-distributed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_B62_PAIRS = [a + b for a in _B62 for b in _B62]


def _b62(n: int, width: int) -> str:
    """``n`` in base 62, ``width`` digits (an even number), most significant first."""
    pairs = []
    for _ in range(width // 2):
        n, r = divmod(n, 3844)  # two digits per step
        pairs.append(_B62_PAIRS[r])
    return "".join(reversed(pairs))


_minute_cache: dict[int, bytes] = {}


def format_ts_bytes(us: int) -> bytes:
    """Format microseconds since the epoch like the API: ``2024-11-10T18:39:00.070453Z``."""
    # Hot path (twice per served record): the "YYYY-MM-DDTHH:MM:" prefix is cached.
    minute, rest = divmod(us, 60_000_000)
    prefix = _minute_cache.get(minute)
    if prefix is None:
        day, minute_of_day = divmod(minute, 1440)
        date = dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()
        prefix = f"{date}T{minute_of_day // 60:02d}:{minute_of_day % 60:02d}:".encode()
        if len(_minute_cache) >= 200_000:  # bounded: about 20 MB at most
            _minute_cache.clear()
        _minute_cache[minute] = prefix
    secs, frac = divmod(rest, 1_000_000)
    return b"%s%02d.%06dZ" % (prefix, secs, frac)


def format_ts(us: int) -> str:
    """Format microseconds since the epoch like the API: ``2024-11-10T18:39:00.070453Z``."""
    return format_ts_bytes(us).decode()


def parse_ts(value: str) -> int:
    """Parse an ISO-8601 timestamp with a UTC offset (``Z`` or ``+hh:mm``) to epoch micros.

    Raises ValueError for anything else, including timestamps without an offset.
    """
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp without a UTC offset: {value!r}")
    return (parsed - _EPOCH) // dt.timedelta(microseconds=1)


def _encode_cursor(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


_START_CURSOR = _encode_cursor(_START_PAYLOAD)


def _position_cursor(pos: _Pos) -> str:
    return _encode_cursor(f"{pos[0]}:{pos[1]}".encode("ascii"))


def _decode_cursor(cursor: str) -> _Pos | None:
    """Return the position a cursor names, ``None`` for the start cursor.

    Raises ValueError if the text is not a cursor this server could have issued
    (whether the position exists is checked by the caller).
    """
    if not _CURSOR_RE.fullmatch(cursor):
        raise ValueError("not base64url")
    try:
        payload = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    # Only the canonical spelling is accepted, so one position has one cursor.
    if _encode_cursor(payload) != cursor:
        raise ValueError("not canonical")
    if payload == _START_PAYLOAD:
        return None
    match = _POSITION_RE.fullmatch(payload)
    if match is None:
        raise ValueError("not a position")
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------- faults


@dataclass
class FaultConfig:
    """Faults injected per request, decided by an RNG seeded with ``seed``.

    Rates are probabilities in [0, 1] and are tried in this order from one draw:
    ``rate_drop``, ``rate_truncate``, ``rate_429``, ``rate_5xx`` (so their sum
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

    def __post_init__(self) -> None:
        for name in (
            "rate_429",
            "retry_after_http_date_share",
            "rate_5xx",
            "html_share",
            "rate_drop",
            "rate_truncate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be within [0, 1], got {value!r}")
        if self.latency < 0 or self.retry_after < 0:
            raise ValueError("FaultConfig.latency and retry_after must be >= 0")


class RequestLogEntry(NamedTuple):
    """One request as the server saw it.

    ``time`` is ``time.monotonic()`` when the request was received; ``params`` the
    query parameters (last value wins); ``status`` the HTTP status sent, or
    ``"drop"`` / ``"truncate"``.  ``retry_after`` is set for 429 answers only and
    counts from ``time``: a client honouring the ``Retry-After`` header cannot
    send its next request before ``time + retry_after``.  (It is at least the
    header's value; latency and the rounding of HTTP-dates make it larger.)
    """

    time: float
    params: dict[str, str]
    status: int | str
    retry_after: float | None


class _Fault(NamedTuple):
    kind: str  # "drop" | "truncate" | "429" | "5xx"
    status: int = 0
    html: bool = False
    http_date: bool = False


# --------------------------------------------------------------------------- data


class _Collection(NamedTuple):
    name: str
    provider: str
    weight: int  # percent of keys


_COLLECTIONS: tuple[_Collection, ...] = (
    _Collection("stripe:subscription", "stripe", 25),
    _Collection("stripe:customer", "stripe", 20),
    _Collection("salesforce:task", "salesforce", 25),
    _Collection("salesforce:contact", "salesforce", 15),
    _Collection("hubspot:deal", "hubspot", 15),
)
_PROVIDERS: tuple[str, ...] = ("stripe", "salesforce", "hubspot")
# _COLL_BY_PERCENT[h % 100] is the collection index of a key with hash h.
_COLL_BY_PERCENT: tuple[int, ...] = tuple(
    idx for idx, coll in enumerate(_COLLECTIONS) for _ in range(coll.weight)
)
assert len(_COLL_BY_PERCENT) == 100

_WORDS: tuple[str, ...] = (
    "account",
    "renewal",
    "follow",
    "up",
    "call",
    "with",
    "customer",
    "about",
    "the",
    "invoice",
    "schedule",
    "quarterly",
    "review",
    "pipeline",
    "migration",
    "onboarding",
    "contract",
    "signed",
    "pending",
    "approval",
    "budget",
    "forecast",
    "discount",
    "shipping",
    "warehouse",
    "priority",
    "escalation",
    "café",
    "Zürich",
    "naïve",
    "façade",
    "Øresund",
    "São",
    "Paulo",
    "東京",
    "Kraków",
    "résumé",
    "über",
    "👍",
    "✓",
)
_FIRST_NAMES = ("Ada", "Grace", "Linus", "Zoë", "José", "Mária", "Søren", "Ayşe", "Wei", "Olu")
_LAST_NAMES = ("Lovelace", "Hopper", "Müller", "O'Brien", "García", "Nguyễn", "Smith", "Kowalski")
_CITIES = ("Berlin", "Lisbon", "Austin", "Kyoto", "Montréal", "Lagos", "Zürich", "Reykjavík")


def _iso(rng: random.Random) -> str:
    # Some time in 2023, at microsecond precision like the API's own timestamps.
    return format_ts(1_672_531_200_000_000 + rng.randrange(365 * _US_PER_DAY))


def _date(rng: random.Random) -> str:
    return format_ts(1_672_531_200_000_000 + rng.randrange(365 * _US_PER_DAY))[:10]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _body_subscription(rng: random.Random) -> dict[str, Any]:
    amount = rng.choice((900, 1900, 4900, 9900, 24900))
    return {
        "object": "subscription",
        "status": rng.choice(("active", "trialing", "past_due", "canceled", "incomplete")),
        "customer": "cus_" + _b62(rng.getrandbits(80), 14),
        "currency": rng.choice(("usd", "eur", "gbp")),
        "billing": "charge_automatically",
        "cancel_at_period_end": rng.random() < 0.1,
        "current_period_start": rng.randrange(1_672_531_200, 1_704_067_200),
        "current_period_end": rng.randrange(1_704_067_200, 1_735_689_600),
        "trial_end": None,
        "discount": None if rng.random() < 0.7 else {"coupon": "SAVE" + str(rng.randrange(99))},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_" + _b62(rng.getrandbits(80), 14),
                    "price": {
                        "id": "price_" + _b62(rng.getrandbits(60), 10),
                        "unit_amount": amount,
                    },
                    "quantity": rng.randrange(1, 20),
                }
                for _ in range(rng.randrange(1, 3))
            ],
            "has_more": False,
        },
        "metadata": {"plan": rng.choice(("starter", "growth", "enterprise"))},
        "tax_percent": rng.choice((None, 7.5, 19.0, 20.0)),
    }


def _body_customer(rng: random.Random) -> dict[str, Any]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    return {
        "object": "customer",
        "name": f"{first} {last}",
        "email": f"{first}.{last}@example.com".lower().replace("'", ""),
        "balance": rng.randrange(-5000, 5000),
        "delinquent": rng.random() < 0.05,
        "livemode": False,
        "address": {
            "line1": f"{rng.randrange(1, 999)} Main St",
            "city": rng.choice(_CITIES),
            "postal_code": str(rng.randrange(10000, 99999)),
            "country": rng.choice(("US", "DE", "PT", "JP", "CA")),
        },
        "preferred_locales": rng.sample(["en", "de", "pt", "ja", "fr"], rng.randrange(0, 3)),
        "invoice_prefix": _b62(rng.getrandbits(40), 8).upper(),
        "metadata": {},
        "created_at_source": _iso(rng),
    }


def _body_task(rng: random.Random) -> dict[str, Any]:
    return {
        "attributes": {"type": "Task"},
        "subject": rng.choice(("Call", "Email", "Send Quote", "Follow up")),
        "status": rng.choice(("Not Started", "In Progress", "Completed")),
        "priority": rng.choice(("High", "Normal", "Low")),
        "activity_date": _date(rng),
        "is_closed": rng.random() < 0.4,
        "is_high_priority": rng.random() < 0.2,
        "owner_id": "0058b00000" + _b62(rng.getrandbits(48), 8),
        "who_id": None if rng.random() < 0.3 else "0038b00000" + _b62(rng.getrandbits(48), 8),
        "call_duration_in_seconds": rng.choice((None, rng.randrange(0, 3600))),
        "created_date": _iso(rng),
        "reminder_date_time": None,
    }


def _body_contact(rng: random.Random) -> dict[str, Any]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    return {
        "attributes": {"type": "Contact"},
        "first_name": first,
        "last_name": last,
        "email": f"{first}.{last}@example.org".lower().replace("'", ""),
        "phone": f"+1-555-{rng.randrange(1000, 9999)}",
        "mailing_address": {
            "street": f"{rng.randrange(1, 999)} Elm Road",
            "city": rng.choice(_CITIES),
            "country": rng.choice(("United States", "Deutschland", "日本")),
            "latitude": round(rng.uniform(-80, 80), 6),
            "longitude": round(rng.uniform(-180, 180), 6),
        },
        "has_opted_out_of_email": rng.random() < 0.1,
        "lead_source": rng.choice(("Web", "Partner", "Trade Show", None)),
        "birthdate": _date(rng) if rng.random() < 0.5 else None,
        "last_activity_date": _date(rng),
    }


def _body_deal(rng: random.Random) -> dict[str, Any]:
    return {
        "properties": {
            "amount": f"{rng.randrange(100, 100000)}.00",
            "dealname": _sentence(rng, 3).title(),
            "dealstage": rng.choice(("appointmentscheduled", "qualifiedtobuy", "closedwon")),
            "pipeline": "default",
            "closedate": _iso(rng),
            "hs_is_closed": rng.random() < 0.3,
        },
        "associations": {
            "companies": [str(rng.randrange(10**9, 10**10)) for _ in range(rng.randrange(0, 3))],
        },
        "archived": False,
        "probability": round(rng.random(), 2),
    }


_BODY_MAKERS = (_body_subscription, _body_customer, _body_task, _body_contact, _body_deal)
# Per collection: the head of `data`, spliced per record around a pooled body.
# Arguments: upstream_id, created_at, upstream_updated_at.
_DATA_HEADS: tuple[bytes, ...] = (
    b'{"id":"%s","created":"%s","updated":"%s",',
    b'{"id":"%s","created":"%s","updated":"%s",',
    b'{"id":"%s","created_date":"%s","system_modstamp":"%s",',
    b'{"id":"%s","created_date":"%s","system_modstamp":"%s",',
    b'{"hs_object_id":"%s","createdate":"%s","hs_lastmodifieddate":"%s",',
)
# Multipliers for the id permutations; coprime with 62 (odd, not divisible by 31)
# and with 10 and 3, so `(k * M + salt) % modulus` is a bijection on key numbers.
_ID_MULT = 0x9E3779B97F4A7C1594D049BB133111EB  # 128 bits: spreads small keys too
assert all(_ID_MULT % p for p in (2, 3, 5, 31))


class _Extra:
    """A record added at run time: its serialised bytes plus what filters need."""

    __slots__ = ("collection_id", "data", "sync_id", "well_formed")

    def __init__(
        self, data: bytes, sync_id: str | None, collection_id: str | None, well_formed: bool
    ) -> None:
        self.data = data
        self.sync_id = sync_id
        self.collection_id = collection_id
        self.well_formed = well_formed


class _Filter(NamedTuple):
    sync_id: str | None
    provider: str | None
    collection: str | None
    # Indexes of the base collections that can match; None means "no filter".
    base_collections: frozenset[int] | None

    def matches(self, sync_id: str | None, collection_id: str | None) -> bool:
        """Whether an extra record matches.  Fields it lacks do not exclude it."""
        if self.sync_id is not None and sync_id is not None and sync_id != self.sync_id:
            return False
        if collection_id is None:
            return True
        if self.provider is not None and collection_id.partition(":")[0] != self.provider:
            return False
        return self.collection is None or collection_id == self.collection


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


# --------------------------------------------------------------------------- simulator


class Simulator:
    """A local Sequin ``GET /v1/records`` server with a deterministic dataset.

    Base dataset (all a pure function of ``seed``): ``records`` records over
    ``keys`` distinct ``(collection_id, upstream_id)`` pairs (default
    ``records // 5``, so each key is updated about five times).  Key ``k`` is
    created by record ``ceil(k * records / keys)`` and updated at random later;
    ~5% of the updates are deletes (``deleted: true``, ``data`` then either
    ``null`` or a full object), and a deleted key may be updated again later.
    Collections: stripe:subscription, stripe:customer, salesforce:task,
    salesforce:contact, hubspot:deal; one ``sync_id`` per provider.
    Timestamps start at 2024-01-01T00:00:00Z, about one second apart; ~10% of
    records share their predecessor's timestamp and a few runs of 300-799
    records share one timestamp.  ``data`` is an object of roughly
    ``record_size`` bytes.

    ``faults`` may be replaced or mutated while serving; ``request_log`` lists
    every request, appended just before its answer is sent (so a client that
    has an answer finds its request logged).  The server is a
    ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive.
    """

    def __init__(
        self,
        *,
        token: str = "dev-token",  # noqa: S107 -- a local development token, by design
        seed: int = 0,
        records: int = 1000,
        keys: int | None = None,
        record_size: int = 800,
        faults: FaultConfig | None = None,
        append_rate: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not token:
            raise ValueError("token must not be empty")
        if records < 0:
            raise ValueError("records must be >= 0")
        if keys is not None and keys < 1:
            raise ValueError("keys must be >= 1")
        if append_rate < 0:
            raise ValueError("append_rate must be >= 0")
        self.token = token
        self.seed = seed
        self.host = host
        self.port = port
        self.append_rate = append_rate
        self.record_size = record_size
        self._n = records
        default_keys = max(1, records // 5)
        # There cannot be more keys than records that create them.
        self._keys = min(keys if keys is not None else default_keys, max(1, records))

        s = _mix(seed & _M64)
        self._s_ts = _mix(s ^ 0x1)
        self._s_bulk = _mix(s ^ 0x3)
        self._s_rec = _mix(s ^ 0x4)
        self._s_key = _mix(s ^ 0x5)
        self._s_id = (_mix(s ^ 0x6) << 64) | _mix(s ^ 0x7)
        self._sync_ids: dict[str, str] = {}
        for p_idx, provider in enumerate(_PROVIDERS):
            hi, lo = _mix(s ^ (0x100 + p_idx)), _mix(s ^ (0x200 + p_idx))
            self._sync_ids[provider] = str(uuid.UUID(int=(hi << 64) | lo, version=4))
        # Per collection: the whole record as one bytes template.
        heads = [
            b'{"sync_id":"%s","collection_id":"%s","upstream_id":"'
            % (self._sync_ids[c.provider].encode(), c.name.encode())
            for c in _COLLECTIONS
        ]
        self._tmpl_data: tuple[bytes, ...] = tuple(
            head
            + b'%s","upstream_updated_at":"%s","data":'
            + _DATA_HEADS[idx]
            + b'%s,"deleted":%s,"created_at":"%s"}'
            for idx, head in enumerate(heads)
        )
        self._tmpl_null: tuple[bytes, ...] = tuple(
            head + b'%s","upstream_updated_at":"%s","data":null,"deleted":true,"created_at":"%s"}'
            for head in heads
        )
        self._key_cache: dict[int, tuple[int, bytes, bytes]] = {}
        self._bulk_cache: dict[int, tuple[int, int]] = {}
        # Data bodies per collection, filled lazily (b"" = not generated yet).
        self._pool: list[list[bytes]] = [[b""] * _POOL_SIZE for _ in _COLLECTIONS]

        # Extras: sorted positions and, at the same index, their records.
        self._lock = threading.Lock()
        self._ex_pos: list[_Pos] = []
        self._ex_items: list[_Extra] = []
        self._ex_ts: dict[int, int] = {}  # seq -> ts, to validate cursors
        self._next_seq = records
        self._max_ts = self._base_ts(records - 1) if records else _BASE_US
        self._live_next_index = records
        self._base_count_cache: dict[frozenset[int], int] = {}

        self._faults = faults if faults is not None else FaultConfig()
        self._fault_rng = random.Random(self._faults.seed)
        self._fault_lock = threading.Lock()
        self.request_log: list[RequestLogEntry] = []
        self._log_lock = threading.Lock()

        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._live_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Simulator:
        """Bind and serve in a background thread (and start live mode if enabled)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="sequin-simulator",
            daemon=True,
        )
        self._serve_thread.start()
        if self.append_rate > 0:
            self._live_thread = threading.Thread(
                target=self._live_loop, name="sequin-simulator-live", daemon=True
            )
            self._live_thread.start()
        return self

    def stop(self) -> None:
        """Stop live mode and the server, closing open keep-alive connections.

        Idempotent.  Records added so far are kept (the object stays queryable).
        """
        self._stopping.set()
        if self._live_thread is not None:
            self._live_thread.join()
            self._live_thread = None
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join()
            self._serve_thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server (without ``/v1/records``)."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        if ":" in host_text:  # IPv6 literal
            host_text = f"[{host_text}]"
        return f"http://{host_text}:{port}"

    @property
    def records_url(self) -> str:
        """The full endpoint URL, ``base_url + "/v1/records"``."""
        return self.base_url + RECORDS_PATH

    @property
    def connection_count(self) -> int:
        """TCP connections accepted so far (to check that clients keep them alive)."""
        return self._server.accepted if self._server is not None else 0

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    @faults.setter
    def faults(self, value: FaultConfig) -> None:
        # A new configuration restarts the fault RNG from its seed, so a test that
        # switches faults on gets the same sequence every run.
        with self._fault_lock:
            self._faults = value
            self._fault_rng = random.Random(value.seed)

    @property
    def sync_ids(self) -> dict[str, str]:
        """The base dataset's ``sync_id`` per provider slug."""
        return dict(self._sync_ids)

    @property
    def collections(self) -> list[str]:
        """The base dataset's collection ids."""
        return [c.name for c in _COLLECTIONS]

    # ------------------------------------------------------------------ base dataset

    def _bulk_run(self, chunk: int) -> tuple[int, int]:
        """The bulk run ``[start, end)`` of a chunk; ``(0, 0)`` if it has none."""
        run = self._bulk_cache.get(chunk)
        if run is None:
            h = _mix((self._s_bulk + chunk) & _M64)
            run = (0, 0)
            if h % _BULK_ONE_IN == 0:
                start = (chunk << _CHUNK_BITS) + (h >> 8) % 200
                run = (start, start + 300 + (h >> 20) % 500)
            self._bulk_cache[chunk] = run
        return run

    def _ts_normal(self, i: int) -> int:
        """The stamp of ``i`` ignoring bulk runs: the raw stamp of the last untied j <= i.

        One hash per record decides both whether it is tied (low bits) and the
        jitter of its raw stamp within its one-second slot (high bits).
        """
        s_ts = self._s_ts
        t = _mix((s_ts + i) & _M64)
        while i & _CHUNK_MASK and t % 100 < _TIE_PERCENT:
            i -= 1
            t = _mix((s_ts + i) & _M64)
        return _BASE_US + i * _STEP_US + (t >> 16) % _STEP_US

    def _base_ts(self, i: int) -> int:
        """Timestamp (micros) of base record ``i``; non-decreasing in ``i``.

        Each record has a raw stamp inside its own one-second slot, so raw stamps
        strictly increase.  A "tied" record (~10%) takes the stamp of the previous
        untied one (ties never cross a chunk start, which bounds the walk back),
        and records in a bulk run take the stamp of the run's first record.  Both
        keep the sequence non-decreasing.
        """
        start, end = self._bulk_run(i >> _CHUNK_BITS)
        return self._ts_normal(start if start <= i < end else i)

    def _iter_base_ts(self, i: int) -> Iterator[int]:
        """``_base_ts(i), _base_ts(i + 1), ...`` computed incrementally (for paging)."""
        s_ts = self._s_ts
        while True:
            chunk_end = ((i >> _CHUNK_BITS) + 1) << _CHUNK_BITS
            start, end = self._bulk_run(i >> _CHUNK_BITS)
            run_ts = self._ts_normal(start) if end else 0
            ts_normal = self._ts_normal(i)
            while True:
                yield run_ts if start <= i < end else ts_normal
                i += 1
                if i == chunk_end:
                    break
                x = (s_ts + i + 0x9E3779B97F4A7C15) & _M64  # _mix, inlined
                x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
                x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
                t = x ^ (x >> 31)
                if t % 100 >= _TIE_PERCENT:  # untied: its own raw stamp
                    ts_normal = _BASE_US + i * _STEP_US + (t >> 16) % _STEP_US

    def _key_of(self, i: int, h: int) -> tuple[int, bool]:
        """(key number, is this the key's creation) of record ``i`` with hash ``h``."""
        n, keys = self._n, self._keys
        if i < n:
            here = i * keys // n
            if i == 0 or here != (i - 1) * keys // n:
                return here, True
            return h % (here + 1), False
        return h % keys, False

    def _coll_of_key(self, k: int) -> int:
        return _COLL_BY_PERCENT[_mix((self._s_key + k) & _M64) % 100]

    def _upstream_id(self, k: int, coll: int) -> str:
        # An affine map modulo the id space is a bijection, so distinct keys get
        # distinct ids that still look random.
        m, salt = _ID_MULT, self._s_id
        if coll == 0:
            return "sub_" + _b62((k * m + salt) % 62**14, 14)
        if coll == 1:
            return "cus_" + _b62((k * m + salt) % 62**14, 14)
        if coll == 2:
            return "00T8b00000" + _b62((k * m + salt) % 62**8, 8)
        if coll == 3:
            return "0038b00000" + _b62((k * m + salt) % 62**8, 8)
        return str(10**9 + (k * m + salt) % (9 * 10**9))

    def _created_us(self, k: int) -> int:
        """When key ``k`` first appeared: the timestamp of the record creating it."""
        if self._n == 0:
            return _BASE_US
        return self._base_ts(-(-k * self._n // self._keys))

    def _pool_body(self, coll: int, idx: int) -> bytes:
        """Pooled ``data`` body (JSON object text without its opening brace).

        Generated on first use (a pure function of seed, collection and index).
        """
        body = self._pool[coll][idx]
        if body:
            return body
        rng = random.Random(_mix(self._s_rec ^ (coll << 32) ^ idx))
        fields = _BODY_MAKERS[coll](rng)
        # Pad with free text to land near record_size; the spliced head is ~100 bytes.
        target = int(self.record_size * rng.uniform(0.8, 1.2)) - 100
        text = ""
        size = len(orjson.dumps(fields))
        while size + len(text.encode()) + 20 < target:
            text += _sentence(rng, 8) + ". "
        fields["description" if coll != 4 else "notes"] = text.strip() or None
        body = orjson.dumps(fields)[1:]
        self._pool[coll][idx] = body  # racing threads compute the same bytes
        return body

    def _key_info(self, k: int) -> tuple[int, bytes, bytes]:
        """(collection index, upstream_id, created_at) of key ``k``, cached."""
        info = self._key_cache.get(k)
        if info is None:
            coll = self._coll_of_key(k)
            info = (
                coll,
                self._upstream_id(k, coll).encode(),
                format_ts_bytes(self._created_us(k)),
            )
            if len(self._key_cache) >= _KEY_CACHE_MAX:
                self._key_cache.clear()  # crude but bounded: memory over hit rate
            self._key_cache[k] = info
        return info

    def _record_bytes(self, i: int, ts_us: int) -> bytes:
        """Serialised record ``i`` of the generator, stamped ``ts_us``.

        This is the hot path that lets a client drain the stream fast: one
        bytes-formatting per record around a pooled body, with the hash, the key
        choice and the timestamp formatting inlined (at a few microseconds per
        record, each function call avoided is a measurable share).
        """
        x = (self._s_rec + i + 0x9E3779B97F4A7C15) & _M64  # _mix, inlined
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
        h = x ^ (x >> 31)
        n, keys = self._n, self._keys
        if i < n:  # _key_of, inlined
            k = i * keys // n
            created = i == 0 or k != (i - 1) * keys // n
            if not created:
                k = h % (k + 1)
        else:
            k, created = h % keys, False
        info = self._key_cache.get(k) or self._key_info(k)
        coll = info[0]
        minute, rest = divmod(ts_us, 60_000_000)  # format_ts_bytes, inlined
        prefix = _minute_cache.get(minute)
        if prefix is None:
            ts = format_ts_bytes(ts_us)
        else:
            secs, frac = divmod(rest, 1_000_000)
            ts = b"%s%02d.%06dZ" % (prefix, secs, frac)
        body = self._pool[coll][(h >> 48) % _POOL_SIZE] or self._pool_body(
            coll, (h >> 48) % _POOL_SIZE
        )
        if created:
            return self._tmpl_data[coll] % (info[1], ts, info[1], ts, ts, body, b"false", ts)
        if (h >> 24) % 100 < _DELETE_PERCENT:  # a delete, half of them without data
            if (h >> 40) & 1:
                return self._tmpl_null[coll] % (info[1], ts, info[2])
            deleted = b"true"
        else:
            deleted = b"false"
        return self._tmpl_data[coll] % (info[1], ts, info[1], info[2], ts, body, deleted, info[2])

    def _base_coll(self, i: int) -> int:
        """Collection index of base record ``i`` (what filters look at)."""
        k = self._key_of(i, _mix((self._s_rec + i) & _M64))[0]
        info = self._key_cache.get(k)
        return info[0] if info is not None else self._coll_of_key(k)

    def _first_base_after(self, pos: _Pos) -> int:
        """Index of the first base record strictly after ``pos`` (by bisection)."""
        return bisect.bisect_right(range(self._n), pos, key=lambda j: (self._base_ts(j), j))

    # ------------------------------------------------------------------ extras

    def make_record(
        self,
        collection_id: str,
        upstream_id: str,
        upstream_updated_at: str,
        data: Mapping[str, Any] | None = None,
        *,
        deleted: bool = False,
        sync_id: str | None = None,
        created_at: str | None = None,
    ) -> dict[str, Any]:
        """Build a well-formed record for :meth:`append` (a convenience for tests).

        ``sync_id`` defaults to this dataset's sync of the collection's provider
        (or a UUID derived from the provider name), ``created_at`` to
        ``upstream_updated_at``.
        """
        provider = collection_id.partition(":")[0]
        if sync_id is None:
            sync_id = self._sync_ids.get(provider) or str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"sequin-simulator:{self.seed}:{provider}")
            )
        return {
            "sync_id": sync_id,
            "collection_id": collection_id,
            "upstream_id": upstream_id,
            "upstream_updated_at": upstream_updated_at,
            "data": None if data is None else dict(data),
            "deleted": deleted,
            "created_at": created_at if created_at is not None else upstream_updated_at,
        }

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Add well-formed records to the stream, each placed by its upstream_updated_at.

        A record goes after every record already in the stream with the same
        timestamp, so one older than a consumer's cursor is never seen by that
        consumer (as with a real ordered stream).  All records are validated
        before any is added; ValueError names the first bad one.  Fields beyond
        the seven of the spec are kept and served.
        """
        prepared: list[tuple[int, _Extra]] = []
        for n, record in enumerate(records):
            try:
                prepared.append(self._prepare(record))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"record {n} is not well-formed: {exc}") from exc
        with self._lock:
            for ts_us, extra in prepared:
                self._insert(ts_us, extra)

    @staticmethod
    def _prepare(record: Mapping[str, Any]) -> tuple[int, _Extra]:
        for name in (
            "sync_id",
            "collection_id",
            "upstream_id",
            "upstream_updated_at",
            "created_at",
        ):
            if not isinstance(record.get(name), str):
                raise ValueError(f"{name} must be a string")
        if not isinstance(record.get("deleted"), bool):
            raise ValueError("deleted must be a bool")
        if "data" not in record or not (record["data"] is None or isinstance(record["data"], dict)):
            raise ValueError("data must be an object or null")
        ts_us = parse_ts(record["upstream_updated_at"])
        parse_ts(record["created_at"])
        try:
            data = orjson.dumps(dict(record))
        except orjson.JSONEncodeError as exc:
            # e.g. lone surrogates: not representable as UTF-8 JSON; use append_raw.
            raise ValueError(f"not serialisable as JSON ({exc}); use append_raw") from exc
        return ts_us, _Extra(data, record["sync_id"], record["collection_id"], True)

    def append_raw(self, fragment: str | bytes, sort_ts: str | None = None) -> None:
        """Add a raw JSON text fragment, emitted verbatim as one item of ``records``.

        For injecting malformed records: missing fields, wrong types, ``\\u0000``
        or lone-surrogate escapes, non-object items.  The fragment is not
        checked; it must not break the surrounding array unless that is the
        point.  A ``str`` is encoded as UTF-8 with surrogates passed through, so
        an actual lone surrogate character yields invalid UTF-8 on the wire.

        Placed at ``sort_ts`` (an ISO timestamp) if given, else at the end of the
        stream.  Filters see the fragment's ``sync_id`` / ``collection_id`` when
        it parses as an object carrying them as strings; a fragment without them
        passes every filter.  Raw fragments never count in :meth:`expected_state`.
        """
        data = (
            fragment if isinstance(fragment, bytes) else fragment.encode("utf-8", "surrogatepass")
        )
        sync_id: str | None = None
        collection_id: str | None = None
        try:
            # The stdlib parser accepts lone surrogate escapes, unlike orjson.
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            if isinstance(parsed.get("sync_id"), str):
                sync_id = parsed["sync_id"]
            if isinstance(parsed.get("collection_id"), str):
                collection_id = parsed["collection_id"]
        ts_us = parse_ts(sort_ts) if sort_ts is not None else None
        with self._lock:
            self._insert(
                self._max_ts if ts_us is None else ts_us,
                _Extra(data, sync_id, collection_id, False),
            )

    def _insert(self, ts_us: int, extra: _Extra) -> None:
        # Caller holds self._lock.  A new seq is larger than every existing one, so
        # the record sorts after all records already at this timestamp.
        pos = (ts_us, self._next_seq)
        self._next_seq += 1
        idx = bisect.bisect_right(self._ex_pos, pos)
        self._ex_pos.insert(idx, pos)
        self._ex_items.insert(idx, extra)
        self._ex_ts[pos[1]] = ts_us
        self._max_ts = max(self._max_ts, ts_us)

    def _live_loop(self) -> None:
        """Append ``append_rate`` records/second stamped "now" until stopped."""
        rate = self.append_rate
        interval = min(0.1, max(0.005, 1.0 / rate))
        owed = 0.0
        last = time.monotonic()
        while not self._stopping.wait(interval):
            now = time.monotonic()
            owed += (now - last) * rate
            last = now
            count = int(owed)
            owed -= count
            if count:
                self._append_live(count)

    def _append_live(self, count: int) -> None:
        now_us = time.time_ns() // 1000
        with self._lock:
            # Never stamp earlier than what the stream already holds: live records
            # must stay visible to a consumer that has caught up.
            ts_us = max(now_us, self._max_ts)
            for _ in range(count):
                i = self._live_next_index
                self._live_next_index += 1
                data = self._record_bytes(i, ts_us)
                h = _mix((self._s_rec + i) & _M64)
                coll = self._coll_of_key(self._key_of(i, h)[0])
                extra = _Extra(
                    data, self._sync_ids[_COLLECTIONS[coll].provider], _COLLECTIONS[coll].name, True
                )
                self._insert(ts_us, extra)

    # ------------------------------------------------------------------ queries

    def _make_filter(
        self, sync_id: str | None, provider: str | None, collection: str | None
    ) -> _Filter:
        if sync_id is None and provider is None and collection is None:
            return _Filter(None, None, None, None)
        allowed = frozenset(
            idx
            for idx, coll in enumerate(_COLLECTIONS)
            if (sync_id is None or self._sync_ids[coll.provider] == sync_id)
            and (provider is None or coll.provider == provider)
            and (collection is None or coll.name == collection)
        )
        return _Filter(sync_id, provider, collection, allowed)

    def _position_exists(self, pos: _Pos) -> bool:
        ts_us, seq = pos
        if seq < self._n:
            return self._base_ts(seq) == ts_us
        with self._lock:
            return self._ex_ts.get(seq) == ts_us

    def _page(
        self, after: _Pos | None, limit: int, flt: _Filter
    ) -> tuple[list[bytes], _Pos | None]:
        """Up to ``limit`` serialised records after ``after`` matching ``flt``.

        Returns them with the position of the last one (None if there are none).
        Merges the base sequence (located by bisection, generated on the fly)
        with the sorted extras; both are in (timestamp, seq) order.
        """
        n = self._n
        i = 0 if after is None else self._first_base_after(after)
        allowed = flt.base_collections
        if allowed is not None and not allowed:
            i = n  # no base record can match: skip the base sequence entirely
        out: list[bytes] = []
        last: _Pos | None = None
        with self._lock:
            ex_pos, ex_items = self._ex_pos, self._ex_items
            j = 0 if after is None else bisect.bisect_right(ex_pos, after)
            nx = len(ex_pos)
            base_ts = self._iter_base_ts(i)
            ts_i = next(base_ts) if i < n else 0
            record_bytes = self._record_bytes
            while len(out) < limit:
                if allowed is None and i < n and (j >= nx or (ts_i, i) < ex_pos[j]):
                    # Fast path: a run of base records with no extra in between.
                    stop = min(n, i + limit - len(out))
                    for i2 in range(i, stop):
                        out.append(record_bytes(i2, ts_i))
                        last = (ts_i, i2)
                        ts_i = next(base_ts)
                        if j < nx and (ts_i, i2 + 1) > ex_pos[j]:
                            i = i2 + 1
                            break
                    else:
                        i = stop
                elif i < n and (j >= nx or (ts_i, i) < ex_pos[j]):
                    if allowed is None or self._base_coll(i) in allowed:
                        out.append(record_bytes(i, ts_i))
                        last = (ts_i, i)
                    i += 1
                    ts_i = next(base_ts)
                elif j < nx:
                    extra = ex_items[j]
                    if allowed is None or flt.matches(extra.sync_id, extra.collection_id):
                        out.append(extra.data)
                        last = ex_pos[j]
                    j += 1
                else:
                    break
        return out, last

    def page(
        self,
        after_cursor: str | None = None,
        limit: int = DEFAULT_LIMIT,
        *,
        sync_id: str | None = None,
        provider: str | None = None,
        collection: str | None = None,
    ) -> bytes:
        """The response body ``GET /v1/records`` would send for these parameters.

        In-process access for benchmarks and debugging (no HTTP, no faults, no
        auth).  Raises ValueError for an invalid cursor or limit.
        """
        after = self._check_cursor(after_cursor) if after_cursor is not None else None
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        items, last = self._page(after, limit, self._make_filter(sync_id, provider, collection))
        return self._render(items, last, after_cursor)

    def _check_cursor(self, cursor: str) -> _Pos | None:
        pos = _decode_cursor(cursor)
        if pos is not None and not self._position_exists(pos):
            raise ValueError("unknown position")
        return pos

    @staticmethod
    def _render(items: list[bytes], last: _Pos | None, sent: str | None) -> bytes:
        if last is not None:
            cursor = _position_cursor(last)
        else:
            # Nothing new: the same cursor back, or the start of the stream.
            cursor = sent if sent is not None else _START_CURSOR
        return b'{"records":[' + b",".join(items) + b'],"cursor":"' + cursor.encode() + b'"}'

    def _iter_well_formed(self, flt: _Filter) -> Iterator[tuple[_Pos, bytes]]:
        allowed = flt.base_collections
        if allowed is None or allowed:
            for i in range(self._n):
                if allowed is None or self._base_coll(i) in allowed:
                    ts_us = self._base_ts(i)
                    yield (ts_us, i), self._record_bytes(i, ts_us)
        with self._lock:
            extras = list(zip(self._ex_pos, self._ex_items, strict=True))
        for pos, extra in extras:
            if extra.well_formed and flt.matches(extra.sync_id, extra.collection_id):
                yield pos, extra.data

    def expected_state(
        self,
        sync_id: str | None = None,
        provider: str | None = None,
        collection: str | None = None,
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The last version, in stream order, of every ``(collection_id, upstream_id)``.

        Covers the well-formed records (base, :meth:`append`, live) matching the
        filters, deleted ones included (check ``["deleted"]`` for soft vs hard
        delete modes).  Records added with :meth:`append_raw` are ignored.  Values
        are the records as served (parsed JSON).  O(records) time; the result
        holds one parsed record per key, so it is meant for test-sized datasets.
        """
        flt = self._make_filter(sync_id, provider, collection)
        latest: dict[tuple[str, str], tuple[_Pos, bytes]] = {}
        # Base records: find each key's last record from cheap metadata first and
        # serialise only the winners.
        allowed = flt.base_collections
        last_of_key: dict[int, int] = {}
        if allowed is None or allowed:
            s_rec = self._s_rec
            for i in range(self._n):
                k = self._key_of(i, _mix((s_rec + i) & _M64))[0]
                if allowed is None or self._coll_of_key(k) in allowed:
                    last_of_key[k] = i
        for k, i in last_of_key.items():
            coll = self._coll_of_key(k)
            ts_us = self._base_ts(i)
            latest[(_COLLECTIONS[coll].name, self._upstream_id(k, coll))] = (
                (ts_us, i),
                self._record_bytes(i, ts_us),
            )
        with self._lock:
            extras = list(zip(self._ex_pos, self._ex_items, strict=True))
        for pos, extra in extras:  # already in stream order, after nothing earlier
            if extra.well_formed and flt.matches(extra.sync_id, extra.collection_id):
                record = orjson.loads(extra.data)
                key = (record["collection_id"], record["upstream_id"])
                if key not in latest or latest[key][0] < pos:
                    latest[key] = (pos, extra.data)
        return {key: orjson.loads(data) for key, (_pos, data) in latest.items()}

    def record_count(
        self,
        sync_id: str | None = None,
        provider: str | None = None,
        collection: str | None = None,
        *,
        include_raw: bool = False,
    ) -> int:
        """How many records a full drain with these filters returns right now.

        Counts well-formed records only unless ``include_raw`` (raw fragments are
        then counted as a filtered consumer would receive them).
        """
        flt = self._make_filter(sync_id, provider, collection)
        allowed = flt.base_collections
        if allowed is None:
            base = self._n
        elif not allowed:
            base = 0
        else:
            cached = self._base_count_cache.get(allowed)
            if cached is None:
                cached = sum(1 for i in range(self._n) if self._base_coll(i) in allowed)
                self._base_count_cache[allowed] = cached
            base = cached
        with self._lock:
            extras = sum(
                1
                for extra in self._ex_items
                if (include_raw or extra.well_formed)
                and flt.matches(extra.sync_id, extra.collection_id)
            )
        return base + extras

    # ------------------------------------------------------------------ HTTP

    def _roll_fault(self) -> _Fault | None:
        with self._fault_lock:
            f, rng = self._faults, self._fault_rng
            u = rng.random()
            if u < f.rate_drop:
                return _Fault("drop")
            u -= f.rate_drop
            if u < f.rate_truncate:
                return _Fault("truncate")
            u -= f.rate_truncate
            if u < f.rate_429:
                return _Fault("429", 429, http_date=rng.random() < f.retry_after_http_date_share)
            u -= f.rate_429
            if u < f.rate_5xx:
                return _Fault(
                    "5xx", rng.choice((500, 502, 503, 504)), html=rng.random() < f.html_share
                )
            return None

    def _log(self, entry: RequestLogEntry) -> None:
        with self._log_lock:
            if len(self.request_log) >= _REQUEST_LOG_MAX:
                # A long-running `simulate` must not grow without bound.
                del self.request_log[: _REQUEST_LOG_MAX // 2]
            self.request_log.append(entry)

    def _handle_records(self, params: dict[str, str], authorization: str | None) -> bytes:
        """The body of a 200 answer to GET /v1/records, or raise _HTTPError."""
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
        sent = params.get("after_cursor")
        try:
            after = self._check_cursor(sent) if sent is not None else None
        except ValueError:
            raise _HTTPError(400, "invalid_cursor", "invalid cursor") from None
        flt = self._make_filter(filters["sync_id"], filters["provider"], filters["collection"])
        items, last = self._page(after, limit, flt)
        return self._render(items, last, sent)


class _Server(ThreadingHTTPServer):
    """The HTTP server; tracks connections so that stop() can close idle keep-alives."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sim: Simulator) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.sim = sim
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
        # Handler threads blocked reading the next keep-alive request see EOF.
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sequin-simulator/1.0"
    sys_version = ""
    # Headers and body go out in one write; no Nagle delay on the last segment.
    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections are closed after this long

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a test or benchmark server must not spam stderr

    def do_GET(self) -> None:
        self._dispatch()

    def _method_not_allowed(self) -> None:
        # We do not read a request body, so the connection cannot be reused.
        self.close_connection = True
        self._send(
            405, _error_body("method_not_allowed", "only GET is supported"), extra={"Allow": "GET"}
        )

    do_POST = do_PUT = do_PATCH = do_DELETE = _method_not_allowed

    def _dispatch(self) -> None:
        received = time.monotonic()
        sim = cast("_Server", self.server).sim
        split = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        latency = sim.faults.latency
        if latency > 0:
            time.sleep(latency)
        fault = sim._roll_fault()
        # Each branch logs *before* sending, so that a client that has its answer
        # always finds the request in the log.
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            sim._log(RequestLogEntry(received, params, "drop", None))
            return
        if fault is not None and fault.kind == "429":
            if fault.http_date:
                # HTTP-dates have whole-second resolution: round up, never promise less.
                deadline = math.ceil(time.time() + sim.faults.retry_after)
                header = email.utils.formatdate(deadline, usegmt=True)
                promise = time.monotonic() + (deadline - time.time()) - received
            else:
                seconds = sim.faults.retry_after
                header = str(int(seconds)) if seconds == int(seconds) else format(seconds, "g")
                promise = time.monotonic() + seconds - received
            sim._log(RequestLogEntry(received, params, 429, promise))
            body = _error_body("rate_limited", f"too many requests; retry after {header}")
            self._send(429, body, extra={"Retry-After": header})
            return
        if fault is not None and fault.kind == "5xx":
            sim._log(RequestLogEntry(received, params, fault.status, None))
            self._send_5xx(fault.status, fault.html)
            return

        status: int
        if split.path != RECORDS_PATH:
            status, body = 404, _error_body("not_found", f"no route for {split.path}")
        else:
            try:
                status, body = 200, sim._handle_records(params, self.headers.get("Authorization"))
            except _HTTPError as exc:
                status, body = exc.status, _error_body(exc.code, exc.message)
            except Exception:
                # A simulator bug: say so loudly rather than pass as an injected fault.
                traceback.print_exc()
                status, body = 500, _error_body("simulator_bug", "unexpected error in simulator")
        extra = {"WWW-Authenticate": 'Bearer realm="sequin"'} if status == 401 else None
        truncate = fault is not None and fault.kind == "truncate"
        sim._log(RequestLogEntry(received, params, "truncate" if truncate else status, None))
        if truncate:
            self.close_connection = True
        self._send(status, body, extra=extra, truncate=truncate)

    def _send_5xx(self, status: int, html: bool) -> None:
        reason = self.responses.get(status, ("Error",))[0]
        if html:
            # What a proxy in front of the API would send.
            body = (
                f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
                f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
                "</body>\r\n</html>\r\n"
            ).encode()
            self._send(status, body, content_type="text/html")
        else:
            code = reason.lower().replace(" ", "_")
            self._send(status, _error_body(code, f"upstream error ({status} {reason})"))

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
        truncate: bool = False,
    ) -> None:
        reason = self.responses.get(status, ("",))[0]
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Server: {self.server_version}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in (extra or {}).items())
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + (body[: len(body) // 2] if truncate else body))
        except OSError:
            self.close_connection = True  # the client went away; nothing to tell it


# --------------------------------------------------------------------------- CLI


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sequin-worker simulate",
        description="Serve a local fake of Sequin's GET /v1/records with a deterministic dataset.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free)")
    parser.add_argument(
        "--token",
        default=os.environ.get("SEQUIN_API_TOKEN") or "dev-token",
        help="bearer token to accept (default: $SEQUIN_API_TOKEN, else dev-token)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset and fault seed (default 0)")
    parser.add_argument("--records", type=int, default=1000, help="base records (default 1000)")
    parser.add_argument("--keys", type=int, default=None, help="distinct keys (default records/5)")
    parser.add_argument("--record-size", type=int, default=800, help="approx. bytes of data")
    parser.add_argument(
        "--append-rate", type=_non_negative, default=0.0, help="live records per second (default 0)"
    )
    parser.add_argument(
        "--latency-ms", type=_non_negative, default=0.0, help="added to each request"
    )
    parser.add_argument("--fault-429", type=_rate, default=0.0, help="share of 429 answers")
    parser.add_argument(
        "--retry-after", type=_non_negative, default=1.0, help="Retry-After seconds for 429s"
    )
    parser.add_argument("--fault-5xx", type=_rate, default=0.0, help="share of 5xx answers")
    parser.add_argument(
        "--fault-drop", type=_rate, default=0.0, help="share of dropped connections"
    )
    parser.add_argument(
        "--fault-truncate", type=_rate, default=0.0, help="share of truncated bodies"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``sequin-worker simulate``: serve until SIGTERM or SIGINT, then return 0."""
    args = _build_parser().parse_args(argv)
    try:
        faults = FaultConfig(
            latency=args.latency_ms / 1000.0,
            rate_429=args.fault_429,
            retry_after=args.retry_after,
            rate_5xx=args.fault_5xx,
            rate_drop=args.fault_drop,
            rate_truncate=args.fault_truncate,
            seed=args.seed,
        )
        sim = Simulator(
            token=args.token,
            seed=args.seed,
            records=args.records,
            keys=args.keys,
            record_size=args.record_size,
            faults=faults,
            append_rate=args.append_rate,
            host=args.host,
            port=args.port,
        )
    except ValueError as exc:
        print(f"sequin-worker simulate: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:
        pass  # not the main thread: stop with KeyboardInterrupt instead
    try:
        try:
            sim.start()
        except OSError as exc:
            print(
                f"sequin-worker simulate: cannot listen on {args.host}:{args.port}: {exc}",
                file=sys.stderr,
            )
            return 1
        print(
            f"Sequin simulator serving {sim.base_url}{RECORDS_PATH} "
            f"({args.records} records, seed {args.seed}); "
            f"use base URL {sim.base_url} with token {args.token!r} "
            f"(Authorization: Bearer {args.token})",
            flush=True,
        )
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0

