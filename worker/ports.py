"""The loop's two ports, typed by the domain only (:mod:`worker.model`, :mod:`worker.errors`).

The API client (:class:`worker.api.SequinClient`) is a :class:`Source`, the Postgres store a
:class:`Sink`; :mod:`worker.testing` ships in-memory versions of both for unit tests.
"""

from __future__ import annotations

from typing import Protocol

from worker.model import ApplyResult, Batch, Page


class Source(Protocol):
    """Where pages come from. ``fetch_page`` raises the :class:`worker.errors.ApiError`
    family (``Stopped`` once aborted)."""

    def fetch_page(self, after_cursor: str | None) -> Page: ...

    def abort(self) -> None:
        """End a fetch in flight (called from another thread); later fetches end at once."""

    def close(self) -> None: ...


class Sink(Protocol):
    """Where batches go. Failures are :class:`worker.errors.StoreFailure` (with their class)
    or :class:`worker.errors.CursorConflict` when ``batch.after_cursor`` is not the stored
    cursor (nothing applied)."""

    def connect(self) -> None: ...

    def open_consumer(self) -> str | None:
        """Make sure the consumer exists; return its committed cursor."""

    def apply(self, batch: Batch) -> ApplyResult:
        """Apply ``batch`` and move the cursor to ``batch.cursor`` in one transaction."""

    def close(self) -> None: ...
