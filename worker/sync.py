"""The sync loop: prefetch pages, group them, apply each group in one transaction.

The loop sees the API and the database only through two small interfaces, :class:`Source`
and :class:`Sink`, so its rules are tested with in-memory fakes and its integration with the
real client and store.

Shape of a session (from one committed cursor):

* a prefetch thread fetches and validates pages, starting at the committed cursor; the next
  request needs only the previous response's cursor, so fetching overlaps writing. A bounded
  queue keeps memory flat.
* the applying thread takes the first waiting page and, while behind, the pages already
  waiting behind it (up to ``batch_max_records``), and applies them as one batch whose
  cursor is the last page's. While tailing that is one page per transaction.
* only an empty page means the stream is caught up (a short page may be followed by more,
  so the next is fetched at once): ``backfill`` ends there; ``run`` waits ``poll_interval``
  (±20% jitter) and polls again.
* every page is checked against the pagination contract (:class:`Paginator`) before it is
  queued, so a page that would loop or go back in the stream is never applied.
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
:mod:`worker.failures`, through :class:`FailureHandler`.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

import structlog

from worker.api import Page, Stopped
from worker.failures import Decision, FailureClass, RetryBudget, what_to_fix
from worker.failures import backoff_delay as backoff_delay  # its home is worker.failures
from worker.records import ParsedPage, parse_page
from worker.store import ApplyResult, Batch, CursorConflict, StoreFailure

log = structlog.get_logger("worker.sync")

Mode = Literal["run", "backfill"]


class Source(Protocol):
    """Where pages come from (the API client)."""

    def fetch_page(self, after_cursor: str | None) -> Page: ...

    def abort(self) -> None:
        """End a fetch in flight (called from another thread); later fetches end at once."""

    def close(self) -> None: ...


class Sink(Protocol):
    """Where batches go (the Postgres store)."""

    def connect(self) -> None: ...

    def open_consumer(self) -> str | None: ...

    def apply(self, batch: Batch) -> ApplyResult: ...

    def close(self) -> None: ...


class ProtocolViolation(Exception):
    """The API answered in a way that would make the loop spin or skip data."""


class DatabaseUnavailable(Exception):
    """The database kept failing through the retry budget."""


class DatabaseRefused(Exception):
    """A permanent database failure (a privilege, a missing table): retrying cannot help.
    The message says what to fix."""


def next_step(page: Page) -> Literal["more", "caught_up"]:
    """Pure pagination rule: what to do after ``page``.

    The API document says only an empty page means "no more records": after any other page,
    short ones included, fetch again at once. A non-empty page that hands back the cursor it
    was asked with would be fetched forever: refused.
    """
    if page.records and page.cursor == page.after_cursor:
        raise ProtocolViolation(
            f"the API returned {len(page.records)} records but did not advance the cursor"
        )
    return "more" if page.records else "caught_up"


class Paginator:
    """Owns the cursor of one session, and checks every page against the pagination
    contract before the page may be applied. Raises :class:`ProtocolViolation` for:

    * a non-empty page that hands back the cursor it was asked with (:func:`next_step`);
    * a cycle: a cursor already handed out in this session (among the last ``memory``);
      following it would apply records again while the stored cursor goes back;
    * a rewind: a page that starts with a record older than the last record of the
      previous non-empty page (the stream is ordered by ``upstream_updated_at``): the API
      went back to an earlier position, and following it would put the table ahead of the
      stored cursor. Only the page's first record is compared: a single mis-stamped record
      further on is a bad record, not a change of position (per key, the newer version
      still wins in the store), and must not stop the stream.
    """

    def __init__(self, start: str | None, *, memory: int = 1000) -> None:
        self.cursor = start
        self._memory = memory
        self._seen: dict[str, int] = {}  # cursor -> page number, oldest first
        self._pages = 0
        self._last: datetime | None = None
        if start is not None:
            self._remember(start)

    def advance(self, page: Page, parsed: ParsedPage) -> Literal["more", "caught_up"]:
        """Check ``page`` (and its parsed records), move the cursor, and say what comes next."""
        step = next_step(page)
        if page.cursor != page.after_cursor and page.cursor in self._seen:
            ago = self._pages - self._seen[page.cursor]
            raise ProtocolViolation(
                f"the API handed back a cursor it had already given {ago} page(s) earlier "
                "in this session: following it would apply records again"
            )
        if parsed.records:
            first = parsed.records[0].upstream_updated_at
            if self._last is not None and first < self._last:
                raise ProtocolViolation(
                    f"the API went back in the stream: a page starting with a record of "
                    f"{first.isoformat()} came after one ending with {self._last.isoformat()} "
                    "(records are ordered by upstream_updated_at)"
                )
            self._last = parsed.records[-1].upstream_updated_at
        self._pages += 1
        self._remember(page.cursor)
        self.cursor = page.cursor
        return step

    def _remember(self, cursor: str) -> None:
        self._seen.pop(cursor, None)
        self._seen[cursor] = self._pages
        if len(self._seen) > self._memory:
            del self._seen[next(iter(self._seen))]


def poll_delay(interval: float, rng: random.Random | None = None) -> float:
    """The wait after a caught-up page: ``interval`` with ±20% jitter, so that many workers
    polling one account do not fall into step."""
    r = rng.random() if rng else random.random()
    return interval * (0.8 + 0.4 * r)


@dataclass(slots=True)
class Fetched:
    page: ParsedPage
    caught_up: bool


@dataclass
class Totals:
    """Running counts of one process, for the summary line, logs and metrics."""

    received: int = 0
    upserted: int = 0
    deleted: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    pages: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, r: ApplyResult) -> None:
        self.received += r.received
        self.upserted += r.upserted
        self.deleted += r.deleted
        self.skipped += r.skipped
        self.dead_lettered += r.dead_lettered
        self.pages += r.pages

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


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


class Prefetcher:
    """Fetches and validates pages ahead of the writer on a daemon thread.

    Items on :attr:`queue` are :class:`Fetched` pages in stream order, or the exception that
    ended the thread. The queue is bounded by ``depth`` pages. The cursor and the checks of
    the pagination contract belong to a :class:`Paginator`; ``on_progress`` is called after
    each page fetched and during poll waits (the heartbeat).
    """

    def __init__(
        self,
        source: Source,
        start: str | None,
        *,
        mode: Mode,
        poll_interval: float,
        depth: int,
        stop: threading.Event,
        on_progress: Callable[[], object] | None = None,
    ) -> None:
        self.queue: queue.Queue[Fetched | BaseException] = queue.Queue(maxsize=depth)
        self._source = source
        self._start = start
        self._on_progress = on_progress
        self._mode = mode
        self._poll_interval = poll_interval
        self._stop = stop
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def halt(self) -> None:
        """Stop fetching at once: the request in flight or the retry wait is aborted and the
        thread exits. Its source is closed by the thread itself, never shared with a later
        prefetcher."""
        self._halt.set()
        self._source.abort()

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _beat(self) -> None:
        if self._on_progress is not None:
            self._on_progress()

    def _wait(self, seconds: float) -> bool:
        """A deliberate wait (beating); True if told to stop meanwhile."""
        end = time.monotonic() + seconds
        while not self._stopping():
            self._beat()
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._halt.wait(min(left, 0.25))
        return True

    def _stopping(self) -> bool:
        return self._halt.is_set() or self._stop.is_set()

    def _put(self, item: Fetched | BaseException) -> bool:
        while not self._stopping():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        paginator = Paginator(self._start)
        try:
            while not self._stopping():
                page = self._source.fetch_page(paginator.cursor)
                parsed = parse_page(
                    page.records,
                    cursor=page.cursor,
                    after_cursor=page.after_cursor,
                    raw_texts=page.raw_texts(),
                )
                step = paginator.advance(page, parsed)  # before the page can be applied
                self._beat()
                if not self._put(Fetched(parsed, caught_up=step == "caught_up")):
                    return
                if step == "caught_up":
                    if self._mode == "backfill":
                        return
                    if self._wait(poll_delay(self._poll_interval)):
                        return
        except Stopped:
            # The source was told to stop (the process's stop event may reach it before the
            # relay sets this session's): the writer sees its own stop; nothing to report.
            return
        except BaseException as exc:
            if not self._stopping():
                self._put(exc)
        finally:
            self._source.close()


class FailureHandler:
    """What happens after a database failure, for the loop and the migration step alike.

    :meth:`failed` classifies (the class comes with the :class:`StoreFailure`), spends the
    budget (:class:`worker.failures.RetryBudget`), logs ``db_retry``, reports the failure
    through ``on_failure(class, seconds_failing)``, then waits the backoff (cut short by
    ``stop``). It raises :class:`DatabaseRefused` for a permanent failure and
    :class:`DatabaseUnavailable` when the budget is spent. :meth:`recovered` ends the run of
    failures (after a commit, or when nothing is pending any more).
    """

    def __init__(
        self,
        max_retries: int | None,
        stop: threading.Event,
        state: LoopState,
        *,
        on_failure: Callable[[FailureClass, float], None] | None = None,
        backoff: float = 0.5,
    ) -> None:
        self.budget = RetryBudget(max_retries, initial=backoff)
        self._stop = stop
        self._state = state
        self._on_failure = on_failure

    def failed(self, exc: StoreFailure, *, pages: int = 0) -> Decision:
        cls = exc.failure_class
        decision = self.budget.decide(cls)
        now = time.monotonic()
        if self._state.failing_since is None:
            self._state.failing_since = now
        self._state.failure_class = cls
        failing = now - self._state.failing_since
        if self._on_failure is not None:
            self._on_failure(cls, failing)
        if decision.give_up:
            log.error(
                "db_gave_up",
                **{"class": cls},
                reason=str(exc),
                sqlstate=exc.sqlstate,
                attempt=decision.attempt,
                failing_s=round(failing, 3),
            )
            if decision.reason == "permanent":
                raise DatabaseRefused(f"{exc}; {what_to_fix(exc.sqlstate)}") from None
            raise DatabaseUnavailable(
                f"the database kept failing ({decision.attempt} attempts over "
                f"{failing:.0f} s, last: {cls}): {exc}"
            ) from None
        log.warning(
            "db_retry",
            **{"class": cls},
            reason=str(exc),
            sqlstate=exc.sqlstate,
            attempt=decision.attempt,
            wait_s=round(decision.wait, 3),
            failing_s=round(failing, 3),
            pages=pages,
        )
        self._state.beat("db_retry")
        self._stop.wait(decision.wait)
        return decision

    def recovered(self) -> None:
        self.budget.succeeded()
        self._state.failing_since = None
        self._state.failure_class = None


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
        poll_interval: float = 1.0,
        batch_max_records: int = 5000,
        prefetch_pages: int = 4,
        max_db_retries: int | None = 20,
        on_batch: Callable[[ApplyResult], None] | None = None,
        on_caught_up: Callable[[], None] | None = None,
        on_failure: Callable[[FailureClass, float], None] | None = None,
        state: LoopState | None = None,
        totals: Totals | None = None,
        batch_log_level: str = "info",
        db_backoff: float = 0.5,
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
                position = self._sink.open_consumer()
                if not self._resume_held(position):
                    self.failures.recovered()  # nothing pending: the failure is over
                if self._session(position):
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

    def _session(self, position: str | None) -> bool:
        """Sync from ``position`` until stopped (False) or, in backfill, caught up (True)."""
        self.state.cursor = position
        self.state.beat()
        start = self._held[-1].page.cursor if self._held else position
        log.info("session_started", cursor=position, mode=self.mode, held=len(self._held))
        prefetch: Prefetcher | None = None
        if not (self.mode == "backfill" and self._held and self._held[-1].caught_up):
            # (a backfill holding the stream's last page has nothing left to fetch)
            prefetch = Prefetcher(
                self._source_factory(),
                start,
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
                    position = self._apply(position, [f.page for f in fetched])
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
                        log.info("caught_up", cursor=position, **self._totals_fields())
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

    def _apply(self, position: str | None, pages: list[ParsedPage]) -> str | None:
        batch = Batch(after_cursor=position, pages=pages)
        if batch.received == 0 and batch.cursor == position:
            self.failures.recovered()
            return position  # an empty page handing back our cursor: nothing to commit
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
        return batch.cursor

    def _totals_fields(self) -> dict[str, int | float]:
        t = self.totals
        return {
            "records": t.received,
            "upserted": t.upserted,
            "deleted": t.deleted,
            "dead_lettered": t.dead_lettered,
        }
