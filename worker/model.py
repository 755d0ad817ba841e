"""The record model: what one record, page and batch are, and what applying a batch did.

Plain data with no I/O and no imports of ours: the API client builds :class:`Page`, the
rules (:mod:`worker.records`) turn it into a :class:`ParsedPage`, the loop groups those into a
:class:`Batch`, the store writes it and answers with an :class:`ApplyResult`. The one rule that
lives here is which version of a key wins (:func:`dedup`, :func:`versions_by_key`): it is what
a :class:`Batch` means, and both the store and the in-memory sink apply it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal


@dataclass(slots=True)
class Record:
    """A record that can be stored as a row. ``data_json`` is ``data`` serialised for jsonb."""

    collection_id: str
    upstream_id: str
    sync_id: str | None  # canonical UUID text (Postgres casts it)
    upstream_updated_at: datetime
    created_at: datetime | None
    deleted: bool
    data_json: str | bytes | None  # JSON text; bytes when passed through from the wire
    index: int = -1  # position in its page, to find its text from the wire again

    @property
    def key(self) -> tuple[str, str]:
        return (self.collection_id, self.upstream_id)


@dataclass(slots=True)
class Page:
    """One decoded response: the raw records (stream order) and the next cursor.

    ``raw_texts`` gives the text of each record as received (for dead letters), scanned from
    the body at most once (see :func:`worker.codec.raw_texts_once`); ``None`` when the page
    did not come from bytes (a fake). Whether the stream goes on after this page is the
    paginator's rule (:mod:`worker.paging`), not the page's.
    """

    after_cursor: str | None
    records: list[Any]
    cursor: str
    limit: int
    raw_texts: Callable[[], Sequence[str] | None] | None = None

    @property
    def is_full(self) -> bool:
        """Whether the page holds ``limit`` records. Informative only: the API document says
        only an empty page means "no more records", so the loop goes on after any other."""
        return len(self.records) >= self.limit


@dataclass(slots=True)
class DeadLetter:
    """A record kept verbatim because it could not be stored as received."""

    raw: str
    reason: str
    after_cursor: str | None
    collection_id: str | None = None
    upstream_id: str | None = None


@dataclass(slots=True)
class ParsedPage:
    """One API page after validation: rows to store and records to dead-letter."""

    after_cursor: str | None
    cursor: str
    received: int
    records: list[Record] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    newest: datetime | None = None
    raw_texts: Callable[[], Sequence[str] | None] | None = None

    def raw_text(self, record: Record) -> str:
        """The record's text as received; a lossless rebuild from its fields if the page's
        text is not at hand."""
        texts = self.raw_texts() if self.raw_texts is not None else None
        if texts is not None and 0 <= record.index < len(texts) and len(texts) == self.received:
            return texts[record.index]
        fields = {
            "collection_id": record.collection_id,
            "upstream_id": record.upstream_id,
            "sync_id": str(record.sync_id) if record.sync_id else None,
            "upstream_updated_at": record.upstream_updated_at.isoformat(),
            "created_at": record.created_at.isoformat() if record.created_at else None,
            "deleted": record.deleted,
        }
        data = record.data_json
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        return f'{json.dumps(fields)[:-1]}, "data": {text or "null"}}}'


@dataclass(slots=True)
class Batch:
    """Consecutive pages to apply together, fetched starting at ``after_cursor``."""

    after_cursor: str | None
    pages: list[ParsedPage]

    @property
    def cursor(self) -> str:
        return self.pages[-1].cursor

    @property
    def received(self) -> int:
        return sum(p.received for p in self.pages)

    def rows(self) -> list[Record]:
        """One version per key across all pages (see :func:`dedup`)."""
        return dedup(r for p in self.pages for r in p.records)

    def versions(self) -> list[list[Record]]:
        """Every version of each key, best first (see :func:`versions_by_key`)."""
        return versions_by_key(r for p in self.pages for r in p.records)

    @property
    def moves_nothing(self) -> bool:
        """An empty page handing back the cursor it was asked with: nothing to commit."""
        return self.received == 0 and self.cursor == self.after_cursor

    def dead_letters(self) -> list[DeadLetter]:
        return [d for p in self.pages for d in p.dead_letters]

    @property
    def valid(self) -> int:
        return sum(len(p.records) for p in self.pages)

    @property
    def newest(self) -> datetime | None:
        stamps = [p.newest for p in self.pages if p.newest is not None]
        return max(stamps) if stamps else None


@dataclass(slots=True)
class ApplyResult:
    """What applying batches did to the table: one committed batch (as the store returns
    it), or the running sum of many (:meth:`add`; the loop's totals, with ``started``)."""

    received: int = 0
    upserted: int = 0
    deleted: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    pages: int = 0
    cursor: str | None = None
    newest: datetime | None = None
    seconds: float = 0.0
    # Rows changed per (collection_id, deleted): what NOTIFY and the metrics report.
    changed: dict[tuple[str, bool], int] = field(default_factory=dict)
    dead_by_collection: dict[str, int] = field(default_factory=dict)

    @property
    def by_collection(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (collection, _), n in self.changed.items():
            out[collection] = out.get(collection, 0) + n
        return out

    def add(self, r: ApplyResult) -> None:
        """Add ``r``'s counts and time spent applying (not its cursor, newest stamp or
        per-collection maps)."""
        self.received += r.received
        self.upserted += r.upserted
        self.deleted += r.deleted
        self.skipped += r.skipped
        self.dead_lettered += r.dead_lettered
        self.pages += r.pages
        self.seconds += r.seconds


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """Who writes: the consumer name, its filters and delete mode."""

    name: str
    sync_id: str | None
    provider: str | None
    collection: str | None
    delete_mode: Literal["soft", "hard"]

    def filters(self) -> dict[str, str | None]:
        return api_filters(self.sync_id, self.provider, self.collection)


def api_filters(
    sync_id: str | None, provider: str | None, collection: str | None
) -> dict[str, str | None]:
    """The API's filter parameters, by name (``None``: not filtered on). The one spelling of
    them: the settings, the stored consumer and the client's query all come from here."""
    return {"sync_id": sync_id, "provider": provider, "collection": collection}


def dedup(records: Iterable[Record]) -> list[Record]:
    """Keep one version per key: the greatest by (upstream_updated_at, stream position).

    ``records`` must be in stream order. The result keeps the first-seen order of keys, which
    is irrelevant to correctness but makes writes deterministic.
    """
    latest: dict[tuple[str, str], Record] = {}
    for record in records:
        key = (record.collection_id, record.upstream_id)
        current = latest.get(key)
        if current is None or record.upstream_updated_at >= current.upstream_updated_at:
            latest[key] = record
    return list(latest.values())


def versions_by_key(records: Iterable[Record]) -> list[list[Record]]:
    """Every version of each key, ordered by :func:`dedup`'s rule: the first of each list is
    the version ``dedup`` keeps, then the next best, and so on.

    ``records`` must be in stream order. Keys come in first-seen order. Used when Postgres
    refuses a version: the next one is tried, so the key gets the newest version Postgres
    accepts however the pages were grouped.
    """
    by_key: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        by_key.setdefault((record.collection_id, record.upstream_id), []).append(record)
    # Later in the stream first, then a stable sort by timestamp: on equal timestamps the
    # later version stays ahead, as in dedup.
    return [
        sorted(reversed(versions), key=lambda r: r.upstream_updated_at, reverse=True)
        for versions in by_key.values()
    ]
