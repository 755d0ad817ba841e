"""The record model: what one record, page and batch are, and what applying a batch did.

Plain data with no I/O: the codec and the rules build these, the loop moves them, the
store writes them. See :mod:`worker.records` for the rules (validation, dedup).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal


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
        """One version per key across all pages (see :func:`worker.records.dedup`)."""
        from worker.records import dedup

        return dedup(r for p in self.pages for r in p.records)

    def versions(self) -> list[list[Record]]:
        """Every version of each key, best first (see :func:`worker.records.versions_by_key`)."""
        from worker.records import versions_by_key

        return versions_by_key(r for p in self.pages for r in p.records)

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
    """What one committed batch did to the table."""

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


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """Who writes: the consumer name, its filters and delete mode."""

    name: str
    sync_id: str | None
    provider: str | None
    collection: str | None
    delete_mode: Literal["soft", "hard"]

    def filters(self) -> dict[str, str | None]:
        return {"sync_id": self.sync_id, "provider": self.provider, "collection": self.collection}
