"""The sync loop: prefetch pages, group them, apply each group in one transaction.

The loop sees the API and the database only through two ports, :class:`worker.ports.Source`
and :class:`worker.ports.Sink`, and imports nothing but the domain (model, errors, rules,
paging, failures, config) and its own prefetch thread, so its rules are tested with the
in-memory fakes of :mod:`worker.testing` and its integration with the real client and store.

Shape of a session (from one committed cursor):

* a prefetch thread (:mod:`worker.prefetch`) fetches and validates pages, starting at the
  committed cursor; the next request needs only the previous response's cursor, so fetching
  overlaps writing. A bounded queue keeps memory flat.
* the applying thread takes the first waiting page and, while behind, the pages already
  waiting behind it (up to ``batch_max_records``), and applies them as one batch whose
  cursor is the last page's. While tailing that is one page per transaction.
* only an empty page means the stream is caught up (a short page may be followed by more,
  so the next is fetched at once): ``backfill`` ends there; ``run`` waits ``poll_interval``
  (±20% jitter) and polls again.
* every page is checked against the pagination contract (:class:`worker.paging.Paginator`,
  the one owner of the fetch cursor) before it is queued, so a page that would loop or go
  back in the stream is never applied.
* the loop's heartbeat (:class:`LoopState`) moves only with progress: a page fetched, a
  batch applied, a deliberate wait (polling, an API retry backoff, standing by). A fetch
  that hangs, or a writer stuck in the database, lets it go stale.

If a batch fails (the connection is lost, a deadlock, a statement timeout...) the session
ends, and a new one reconnects and reads the cursor the database holds. The pages already
fetched (the failed batch and those queued behind it) are kept and applied again when the
stored cursor is the one they were fetched from; otherwise (someone else moved the cursor)
they are dropped and fetched again from the stored cursor. Nothing is applied twice because
the cursor moves in the same transaction as the rows. What each failure class gets (retry,
a halved batch, or a stop) and how many failures are allowed is decided by
:mod:`worker.failures`, through its :class:`~worker.failures.FailureHandler`.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from worker.config import BATCH_MAX_RECORDS, MAX_RETRIES, POLL_INTERVAL, PREFETCH_PAGES
from worker.errors import CursorConflict, FailureClass, StoreFailure
from worker.failures import BACKOFF_INITIAL, FailureHandler
from worker.model import ApplyResult, Batch, ParsedPage
from worker.paging import Paginator
from worker.ports import Sink, Source
from worker.prefetch import Fetched, Prefetcher
from worker.prefetch import Mode as Mode  # "run" or "backfill"

log = structlog.get_logger("worker.sync")


@dataclass(slots=True)
class Totals(ApplyResult):
    """Running counts of one process (the sum of every :class:`ApplyResult`, see
    :meth:`ApplyResult.add`), for the summary line, logs and metrics, with the clock that
    gives the rate."""

    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        return self.received / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class LoopState:
    """What the loop is doing, read by health checks and metrics (written by the loop only).

    ``heartbeat`` is a ``time.monotonic()`` stamp refreshed whenever the pipeline makes
    progress (a page fetched, a batch applied) or is deliberately waiting (polling, an API
    retry backoff, standing by, reconnecting); never while merely waiting on another part.
    A stale heartbeat means the loop is stuck. One request is bounded by
    ``SEQUIN_REQUEST_TIMEOUT``, which the settings keep below ``SEQUIN_HEARTBEAT_TIMEOUT``.
    """

    status: str = "starting"
    heartbeat: float = field(default_factory=time.monotonic)
    migrated: bool = False
    leader: bool = False
    caught_up: bool = False
    last_commit: datetime | None = None
    newest_applied: datetime | None = None
    cursor: str | None = None
    # monotonic() of the first of the current run of database failures (None: not failing);
    # cleared by a commit. /healthz turns 503 when it is older than the heartbeat timeout.
    failing_since: float | None = None
    failure_class: str | None = None

    def beat(self, status: str | None = None) -> None:
        self.heartbeat = time.monotonic()
        if status is not None:
            self.status = status


class SyncLoop:
    """Drives one consumer: sessions of prefetch → group → apply, until told to stop.

    :meth:`run` returns normally when ``stop`` is set (``run`` mode) or when caught up
    (``backfill`` mode). It raises the API client's errors (token rejected, request
    rejected, API unavailable), :class:`ProtocolViolation`, :class:`DatabaseRefused` on a
    permanent database failure, and :class:`DatabaseUnavailable` after ``max_db_retries``
    consecutive database failures (``None``: never), counted across reconnects and reset
    only by progress. A :class:`CursorConflict` (another process wrote this consumer's
    cursor) is not an error here: the session restarts from the stored cursor after a short
    pause.
    """

    def __init__(
        self,
        source_factory: Callable[[], Source],
        sink: Sink,
        *,
        mode: Mode,
        stop: threading.Event,
        poll_interval: float = POLL_INTERVAL,
        batch_max_records: int = BATCH_MAX_RECORDS,
        prefetch_pages: int = PREFETCH_PAGES,
        max_db_retries: int | None = MAX_RETRIES,
        on_batch: Callable[[ApplyResult], None] | None = None,
        on_caught_up: Callable[[], None] | None = None,
        on_failure: Callable[[FailureClass, float], None] | None = None,
        state: LoopState | None = None,
        totals: Totals | None = None,
        batch_log_level: str = "info",
        db_backoff: float = BACKOFF_INITIAL,
    ) -> None:
        self._source_factory = source_factory
        self._sink = sink
        self.mode = mode
        self._stop = stop
        self._poll_interval = poll_interval
        self._batch_max = batch_max_records
        self._depth = prefetch_pages
        self._on_batch = on_batch
        self._on_caught_up = on_caught_up
        self._batch_log = getattr(log, batch_log_level)
        self.state = state or LoopState()
        self.totals = totals or Totals()
        self.failures = FailureHandler(
            max_db_retries, stop, self.state, on_failure=on_failure, backoff=db_backoff
        )
        # Pages fetched but not committed when a batch failed, in stream order: applied
        # again by the next session if the stored cursor is where one of them starts.
        self._held: list[Fetched] = []
        # The most pages per batch while re-applying held pages: the failed batch's (halved
        # after a resource failure).
        self._max_pages: int | None = None
        self._failed_pages = 0  # pages of the batch that failed (0: it failed outside one)

    def run(self) -> bool:
        """Sync until stopped (returns False) or, in backfill mode, caught up (True)."""
        try:
            return self._run()
        finally:
            # A process that goes on (standing by after losing the lead) is not failing.
            self.state.failing_since = None
            self.state.failure_class = None

    def _run(self) -> bool:
        done = False
        while not self._stop.is_set():
            self._failed_pages = 0
            try:
                self._sink.connect()
                # The committed cursor is the store's; the loop keeps only its last reading.
                self.state.cursor = self._sink.open_consumer()
                if not self._resume_held(self.state.cursor):
                    self.failures.recovered()  # nothing pending: the failure is over
                if self._session():
                    done = True
                    break
            except CursorConflict as exc:
                # Another writer moved the cursor (a late commit of a previous leader, or a
                # reset): nothing of ours was applied; start over from what is stored.
                log.warning("cursor_conflict", reason=str(exc))
                self.state.beat()
                # The other writer is usually a leader that has just lost its lock and will
                # notice within a ping; do not spin against it meanwhile.
                self._stop.wait(random.uniform(0.2, 0.5))
            except StoreFailure as exc:
                if self._stop.is_set():
                    break  # e.g. the statement cancelled on shutdown: not a failure
                self.failures.failed(exc, pages=self._failed_pages)
        self._sink.close()
        return done

    def _resume_held(self, position: str | None) -> bool:
        """Keep the held pages from the one that starts at ``position``; drop the rest (they
        committed, or someone else moved the cursor). True if pages are held."""
        for i, f in enumerate(self._held):
            if f.page.after_cursor == position:
                self._held = self._held[i:]
                if i > 0:
                    self.failures.recovered()  # its commit went through, unacknowledged
                return True
        if self._held:
            log.info("held_pages_dropped", pages=len(self._held), cursor=position)
        self._held = []
        self._max_pages = None
        return False

    def _next_batch(self, prefetch: Prefetcher | None) -> list[Fetched] | None:
        """The pages of the next batch: held pages first (at most ``_max_pages``), else
        the first page waiting and, while behind, the pages already waiting behind it, up to
        ``batch_max_records``. None if nothing came within 0.5 s."""
        if self._held:
            limit = self._max_pages or len(self._held)
            fetched = [self._held.pop(0)]
            while (
                self._held
                and len(fetched) < limit
                and not fetched[-1].caught_up
                and sum(f.page.received for f in fetched) < self._batch_max
            ):
                fetched.append(self._held.pop(0))
            if not self._held:
                self._max_pages = None
            return fetched
        assert prefetch is not None  # only a backfill ending within its held pages has none
        try:
            item = prefetch.queue.get(timeout=0.5)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        fetched = [item]
        while not fetched[-1].caught_up and (
            sum(f.page.received for f in fetched) < self._batch_max
        ):
            try:
                nxt = prefetch.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(nxt, BaseException):
                # Apply what we have first; the error surfaces on the next get.
                prefetch.queue.put(nxt)
                break
            fetched.append(nxt)
        return fetched

    def _hold(self, failed: list[Fetched], prefetch: Prefetcher | None) -> None:
        """Keep the failed batch, the held pages behind it and the pages the (halted)
        prefetcher queued, in stream order, for the next session."""
        queued: list[Fetched] = []
        while prefetch is not None:
            try:
                item = prefetch.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                break
            queued.append(item)
        # Bounded: the failed batch and at most a prefetch queue's worth behind it (the chain
        # stays contiguous; the next prefetcher starts where it ends).
        self._held = (failed + self._held + queued)[: len(failed) + self._depth]
        self._failed_pages = len(failed)

    def _session(self) -> bool:
        """Sync from the committed cursor (``state.cursor``) until stopped (False) or, in
        backfill, caught up (True)."""
        position = self.state.cursor
        self.state.beat()
        start = self._held[-1].page.cursor if self._held else position
        log.info("session_started", cursor=position, mode=self.mode, held=len(self._held))
        prefetch: Prefetcher | None = None
        if not (self.mode == "backfill" and self._held and self._held[-1].caught_up):
            # (a backfill holding the stream's last page has nothing left to fetch)
            prefetch = Prefetcher(
                self._source_factory(),
                Paginator(start),
                mode=self.mode,
                poll_interval=self._poll_interval,
                depth=self._depth,
                stop=self._stop,
                on_progress=self.state.beat,
            ).start()
        try:
            while not self._stop.is_set():
                # No heartbeat here: waiting on the prefetcher is not progress (it beats).
                fetched = self._next_batch(prefetch)
                if fetched is None:
                    continue
                try:
                    self._apply([f.page for f in fetched])
                except StoreFailure as exc:
                    if prefetch is not None:
                        prefetch.halt()
                    self._hold(fetched, prefetch)
                    # The retry takes the same pages, not more; after a resource failure
                    # (statement timeout, memory) half of them, since a smaller batch may fit.
                    resource = exc.failure_class == "resource"
                    self._max_pages = max(1, len(fetched) // 2) if resource else len(fetched)
                    raise
                if fetched[-1].caught_up:
                    if not self.state.caught_up:
                        log.info("caught_up", cursor=self.state.cursor, **self._totals_fields())
                        if self._on_caught_up is not None:
                            self._on_caught_up()
                    self.state.caught_up = True
                    self.state.beat("caught_up")
                    if self.mode == "backfill":
                        return True
                else:
                    self.state.caught_up = False
                    self.state.beat("syncing")
            return False
        finally:
            if prefetch is not None:
                prefetch.halt()
                if not prefetch.join(timeout=5):
                    log.warning("prefetch_thread_lingering")

    def _apply(self, pages: list[ParsedPage]) -> None:
        """Apply ``pages`` after the committed cursor; on commit, the cursor is theirs."""
        batch = Batch(after_cursor=self.state.cursor, pages=pages)
        if batch.moves_nothing:
            self.failures.recovered()
            return
        result = self._sink.apply(batch)
        self.failures.recovered()
        self.totals.add(result)
        now = datetime.now(UTC)
        self.state.last_commit = now
        if result.newest is not None:
            self.state.newest_applied = max(
                result.newest, self.state.newest_applied or result.newest
            )
        self.state.cursor = batch.cursor
        self._batch_log(
            "page_applied",
            pages=result.pages,
            records=result.received,
            upserted=result.upserted,
            deleted=result.deleted,
            skipped=result.skipped,
            dead_lettered=result.dead_lettered,
            cursor=batch.cursor,
            ms=round(result.seconds * 1000, 1),
        )
        if self._on_batch is not None:
            self._on_batch(result)

    def _totals_fields(self) -> dict[str, int | float]:
        t = self.totals
        return {
            "records": t.received,
            "upserted": t.upserted,
            "deleted": t.deleted,
            "dead_lettered": t.dead_lettered,
        }
