"""In-memory :class:`~worker.ports.Source` and :class:`~worker.ports.Sink` for tests.

Shipped in the package (as procrastinate ships its ``InMemoryConnector``) so that the loop's
rules are tested without sockets or a database, and so that anyone driving
:class:`worker.sync.SyncLoop` has fakes that keep the ports' contracts:

* :class:`InMemorySource` serves a list of raw records; cursors are stream positions as
  strings; the page after the end is empty and hands back the cursor it was asked with.
* :class:`InMemorySink` keeps one row per key (the version :func:`worker.model.dedup` keeps,
  never older than the stored one), the dead letters and the cursor; it refuses a batch that
  does not start at its cursor (:class:`CursorConflict`), and returns real counts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from worker.errors import CursorConflict
from worker.model import ApplyResult, Batch, DeadLetter, Page, Record


class InMemorySource:
    """A stream of raw records served ``limit`` at a time; ``log`` gets each cursor asked for.

    ``fail_with`` (when set) is raised by every fetch."""

    def __init__(self, records: list[Any], limit: int, log: list[str | None] | None = None) -> None:
        self.records = records
        self.limit = limit
        self.log: list[str | None] = [] if log is None else log
        self.fail_with: BaseException | None = None

    def fetch_page(self, after_cursor: str | None) -> Page:
        self.log.append(after_cursor)
        if self.fail_with is not None:
            raise self.fail_with
        start = int(after_cursor) if after_cursor else 0
        chunk = self.records[start : start + self.limit]
        cursor = str(start + len(chunk)) if chunk else (after_cursor or "0")
        return Page(after_cursor=after_cursor, records=chunk, cursor=cursor, limit=self.limit)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class InMemorySink:
    """A table, a dead-letter list and a cursor in memory.

    ``rows`` maps each key to the record stored for it; ``batches`` lists
    ``(after_cursor, cursor, pages)`` of every batch applied; exceptions put on ``fail_next``
    are raised by the next applies, one each, before anything is applied.
    """

    def __init__(self, *, delete_mode: str = "soft") -> None:
        self.cursor: str | None = None
        self.rows: dict[tuple[str, str], Record] = {}
        self.dead_letters: list[DeadLetter] = []
        self.batches: list[tuple[str | None, str, int]] = []
        self.fail_next: list[BaseException] = []
        self.connects = 0
        self.delete_mode = delete_mode

    def connect(self) -> None:
        self.connects += 1

    def open_consumer(self) -> str | None:
        return self.cursor

    def apply(self, batch: Batch) -> ApplyResult:
        if self.fail_next:
            raise self.fail_next.pop(0)
        if batch.after_cursor != self.cursor:
            raise CursorConflict(
                f"the stored cursor is {self.cursor!r}, not {batch.after_cursor!r}"
            )
        result = ApplyResult(
            received=batch.received,
            pages=len(batch.pages),
            cursor=batch.cursor,
            newest=batch.newest,
        )
        for record in batch.rows():
            current = self.rows.get(record.key)
            if current is not None and current.upstream_updated_at > record.upstream_updated_at:
                result.skipped += 1  # an older version never replaces a newer one
                continue
            if record.deleted and self.delete_mode == "hard":
                if self.rows.pop(record.key, None) is not None:
                    result.deleted += 1
                    _count(result.changed, (record.collection_id, True))
                else:
                    result.skipped += 1
                continue
            if record.deleted:
                result.deleted += 1
            else:
                result.upserted += 1
            self.rows[record.key] = record
            _count(result.changed, (record.collection_id, record.deleted))
        for dead in batch.dead_letters():
            self.dead_letters.append(dead)
            result.dead_lettered += 1
            _count(result.dead_by_collection, dead.collection_id or "")
        self.batches.append((batch.after_cursor, batch.cursor, len(batch.pages)))
        self.cursor = batch.cursor
        return result

    def stamp(self, key: tuple[str, str]) -> datetime:
        """The ``upstream_updated_at`` of the row stored for ``key``."""
        return self.rows[key].upstream_updated_at

    def close(self) -> None:
        pass


def _count(counts: dict[Any, int], key: Any) -> None:
    counts[key] = counts.get(key, 0) + 1
