"""The ordered stream: base records plus run-time extras, paged by cursor, with its oracle.

The stream is an ordered sequence of records sorted by ``(upstream_updated_at,
insertion sequence)``.  It has two parts, merged when paging:

* the *base* records ``0 .. records-1`` of a :class:`~worker.simulator.dataset.Dataset`,
  generated on demand; base record ``i`` has sequence number ``i``.
* the *extra* records added at run time (:meth:`Stream.append`, :meth:`Stream.append_raw`,
  :meth:`Stream.append_live`), kept in a sorted list.  They get sequence numbers
  ``records, records+1, ...`` in insertion order, so among records with equal timestamps
  base records come first, then extras in the order they were added.

Cursors (:mod:`~worker.simulator.cursors`) name positions in this order.

The oracle
----------
:meth:`Stream.expected_state` and :meth:`Stream.record_count` say what a correct
consumer must hold after draining the stream, computed from the stream itself, not
from anything a client sent.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import orjson

from worker.simulator.bodies import COLLECTIONS
from worker.simulator.cursors import START_CURSOR, InvalidCursor, decode_cursor, position_cursor
from worker.simulator.dataset import Dataset, Pos
from worker.simulator.timestamps import parse_ts

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "Filter", "PageQuery", "Stream"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 500

# ---------------------------------------------------------------------------- the stream


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


class Filter(NamedTuple):
    """The ``sync_id`` / ``provider`` / ``collection`` query filters (None = absent)."""

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


class Stream:
    """The records ``GET /v1/records`` pages through: a dataset's base plus extras.

    Thread-safe: appends and reads of the extras hold one lock; the base is immutable.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._lock = threading.Lock()
        # Extras: sorted positions and, at the same index, their records.
        self._ex_pos: list[Pos] = []
        self._ex_items: list[_Extra] = []
        self._ex_ts: dict[int, int] = {}  # seq -> ts, to validate cursors
        self._next_seq = dataset.n
        self._max_ts = dataset.max_ts()
        self._live_next_index = dataset.n

    # ------------------------------------------------------------------ appends

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
            sync_id = self.dataset.sync_ids.get(provider) or str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"sequin-simulator:{self.dataset.seed}:{provider}")
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

    def append_live(self, count: int) -> None:
        """Append ``count`` generated records (new versions of existing keys) stamped now."""
        dataset = self.dataset
        now_us = time.time_ns() // 1000
        with self._lock:
            # Never stamp earlier than what the stream already holds: live records
            # must stay visible to a consumer that has caught up.
            ts_us = max(now_us, self._max_ts)
            for _ in range(count):
                i = self._live_next_index
                self._live_next_index += 1
                coll = COLLECTIONS[dataset.coll(i)]
                extra = _Extra(
                    dataset.record_bytes(i, ts_us),
                    dataset.sync_ids[coll.provider],
                    coll.name,
                    True,
                )
                self._insert(ts_us, extra)

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

    # ------------------------------------------------------------------ paging

    def make_filter(
        self, sync_id: str | None, provider: str | None, collection: str | None
    ) -> Filter:
        """The filter for these query parameters (None = parameter absent)."""
        if sync_id is None and provider is None and collection is None:
            return Filter(None, None, None, None)
        sync_ids = self.dataset.sync_ids
        allowed = frozenset(
            idx
            for idx, coll in enumerate(COLLECTIONS)
            if (sync_id is None or sync_ids[coll.provider] == sync_id)
            and (provider is None or coll.provider == provider)
            and (collection is None or coll.name == collection)
        )
        return Filter(sync_id, provider, collection, allowed)

    def check_cursor(self, cursor: str) -> Pos | None:
        """The position ``cursor`` names (None: the start); InvalidCursor if it names none."""
        pos = decode_cursor(cursor)
        if pos is None or self.dataset.position_exists(pos):
            return pos
        with self._lock:
            if self._ex_ts.get(pos[1]) == pos[0]:
                return pos
        raise InvalidCursor("unknown position")

    def page(
        self,
        sent: str | None,
        limit: int,
        flt: Filter,
        serve: Callable[[PageQuery], bytes] | None = None,
    ) -> bytes:
        """The body of a 200 answer: up to ``limit`` records after cursor ``sent``.

        The cursor returned names the last record sent; a page with no record hands
        back the cursor sent (or the start cursor when none was).  Raises InvalidCursor
        for a cursor that names no position of this stream.  ``serve``, when given, is
        called with the checked query instead and returns the body (a fault's hook).
        """
        after = self.check_cursor(sent) if sent is not None else None
        query = PageQuery(self, flt, sent, after, limit)
        return serve(query) if serve is not None else query.answer()

    def items(self, after: Pos | None, limit: int, flt: Filter) -> tuple[list[bytes], Pos | None]:
        """Up to ``limit`` serialised records after ``after`` matching ``flt``.

        Returns them with the position of the last one (None if there are none).
        Merges the base sequence (located by bisection, generated on the fly)
        with the sorted extras; both are in (timestamp, seq) order.
        """
        dataset = self.dataset
        n = dataset.n
        i = 0 if after is None else dataset.first_after(after)
        allowed = flt.base_collections
        if allowed is not None and not allowed:
            i = n  # no base record can match: skip the base sequence entirely
        out: list[bytes] = []
        last: Pos | None = None
        with self._lock:
            ex_pos, ex_items = self._ex_pos, self._ex_items
            j = 0 if after is None else bisect.bisect_right(ex_pos, after)
            nx = len(ex_pos)
            base_ts = dataset.iter_base_ts(i)
            ts_i = next(base_ts) if i < n else 0
            record_bytes = dataset.record_bytes
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
                    if allowed is None or dataset.coll(i) in allowed:
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

    # ------------------------------------------------------------------ the oracle

    def expected_state(self, flt: Filter) -> dict[tuple[str, str], dict[str, Any]]:
        """The last version, in stream order, of every ``(collection_id, upstream_id)``.

        Covers the well-formed records (base, :meth:`append`, live) matching the
        filter, deleted ones included (check ``["deleted"]`` for soft vs hard
        delete modes).  Records added with :meth:`append_raw` are ignored.  Values
        are the records as served (parsed JSON).  O(records) time; the result
        holds one parsed record per key, so it is meant for test-sized datasets.
        """
        latest: dict[tuple[str, str], tuple[Pos, bytes]] = {}
        allowed = flt.base_collections
        if allowed is None or allowed:
            for key, pos, data in self.dataset.last_of_each_key(allowed):
                latest[key] = (pos, data)
        with self._lock:
            extras = list(zip(self._ex_pos, self._ex_items, strict=True))
        for pos, extra in extras:  # already in stream order, after nothing earlier
            if extra.well_formed and flt.matches(extra.sync_id, extra.collection_id):
                record = orjson.loads(extra.data)
                key = (record["collection_id"], record["upstream_id"])
                if key not in latest or latest[key][0] < pos:
                    latest[key] = (pos, extra.data)
        return {key: orjson.loads(data) for key, (_pos, data) in latest.items()}

    def record_count(self, flt: Filter, *, include_raw: bool = False) -> int:
        """How many records a full drain with this filter returns right now.

        Counts well-formed records only unless ``include_raw`` (raw fragments are
        then counted as a filtered consumer would receive them).
        """
        allowed = flt.base_collections
        if allowed is None:
            base = self.dataset.n
        elif not allowed:
            base = 0
        else:
            base = self.dataset.count(allowed)
        with self._lock:
            extras = sum(
                1
                for extra in self._ex_items
                if (include_raw or extra.well_formed)
                and flt.matches(extra.sync_id, extra.collection_id)
            )
        return base + extras


class PageQuery:
    """A checked ``GET /v1/records`` query: the page it asks for, and what a fault may bend.

    ``sent`` is the cursor the client sent (None: none), ``after`` the position it names
    (None: the start of the stream), ``limit`` the page size asked for.
    """

    __slots__ = ("_flt", "_stream", "after", "limit", "sent")

    def __init__(
        self, stream: Stream, flt: Filter, sent: str | None, after: Pos | None, limit: int
    ) -> None:
        self._stream = stream
        self._flt = flt
        self.sent = sent
        self.after = after
        self.limit = limit

    def answer(self) -> bytes:
        """The true page."""
        items, last = self.records(self.after, self.limit)
        return self.body(items, last, self.sent)

    def records(self, after: Pos | None, limit: int) -> tuple[list[bytes], Pos | None]:
        """Up to ``limit`` records after ``after`` under this query's filters, and the
        position of the last one (None if there are none)."""
        return self._stream.items(after, limit, self._flt)

    def position(self, cursor: str) -> Pos | None:
        """The position ``cursor`` names; InvalidCursor if it names none of this stream."""
        return self._stream.check_cursor(cursor)

    @staticmethod
    def body(items: list[bytes], last: Pos | None, fallback: str | None) -> bytes:
        """A page of ``items`` whose cursor names ``last``; without ``last``, the cursor
        ``fallback`` (or the start cursor when that is None too)."""
        if last is not None:
            cursor = position_cursor(last)
        else:
            cursor = fallback if fallback is not None else START_CURSOR
        return b'{"records":[' + b",".join(items) + b'],"cursor":"' + cursor.encode() + b'"}'
