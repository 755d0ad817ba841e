"""The view keeper: keeps per-collection views current on a thread of its own, so that the
sync loop never waits for DDL (see :mod:`worker.pg.views` for what a refresh does)."""

from __future__ import annotations

import threading
import time

import psycopg
import structlog

from worker.errors import StoreFailure
from worker.model import ApplyResult
from worker.pg import views
from worker.pg.connection import DbTimeouts, connect

log = structlog.get_logger("worker.pg.viewkeeper")


class ViewKeeper:
    """Keeps per-collection views current (``SEQUIN_AUTO_VIEWS``) on a thread of its own.

    The sync loop only tells it what happened (:meth:`on_batch`: these collections changed;
    :meth:`on_caught_up`: the stream is caught up) and never waits for it: requests are
    merged into one pending set that a single background thread works off on its own
    connection. A view is created when a collection first appears, and every known view
    (the registry plus the collections of this session's batches; the records table is
    never scanned for them) is refreshed when the stream catches up. A view whose lock a
    reader holds is deferred (``view_refresh_deferred``) and retried at the next request,
    or after a backoff of ``RETRY_FIRST_S``..``RETRY_MAX_S`` when none comes. A failure is
    logged (``view_refresh_failed``) and retried the same way; it never stops the sync:
    views are a convenience, rows are the product.
    """

    RETRY_FIRST_S = 1.0
    RETRY_MAX_S = 60.0
    # close() lets queued work finish for at most this long (each view's DDL waits at most
    # views.LOCK_TIMEOUT_MS), then cancels whatever is still running.
    DRAIN_S = 15.0

    def __init__(self, dsn: str, schema: str, timeouts: DbTimeouts | None = None) -> None:
        self._dsn = dsn
        self._schema = schema
        self._timeouts = timeouts
        self._cond = threading.Condition()
        self._pending: set[str] = set()  # collections seen in batches, to create views for
        self._all = False  # refresh every known view
        self._retry: set[str] = set()  # deferred or failed, retried at the next round
        self._retry_all = False  # a refresh of every view failed before it began
        self._retry_wait = 0.0
        self._retry_at = 0.0
        self._seen: set[str] = set()  # every collection the batches of this session named
        self._known: set[str] | None = None  # collections with a view (registry), once read
        self._closing = False
        self._abandon = False
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._thread: threading.Thread | None = None

    # -- called from the sync loop: O(collections in the batch), never touches the database --

    def on_batch(self, result: ApplyResult) -> None:
        new = {coll for (coll, _) in result.changed}
        with self._cond:
            new -= self._seen
            if new:
                self._seen |= new
                self._pending |= new
                self._wake()

    def on_caught_up(self) -> None:
        with self._cond:
            self._all = True
            self._wake()

    # -- lifecycle --

    def close(self, timeout: float | None = None) -> None:
        """Finish queued work (bounded by ``timeout``, default ``DRAIN_S``) and stop the
        thread. Deferred views are not retried here: the next run's refresh does that."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return
        thread.join(self.DRAIN_S if timeout is None else timeout)
        if thread.is_alive():
            with self._cond:
                self._abandon = True
                conn = self._conn
            if conn is not None:
                conn.cancel_safe(timeout=2.0)
            thread.join(5.0)
            # A stop closes with no drain time: the idle thread just needed a moment to see
            # it. Only a thread still alive after the cancel is worth a warning.
            if thread.is_alive():
                log.warning("view_keeper_abandoned", alive=True)
            else:
                log.debug("view_keeper_stopped", cancelled=conn is not None)

    def _wake(self) -> None:
        # Called with the lock held.
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._main, name="view-keeper", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    # -- the keeper's thread --

    def _main(self) -> None:
        while True:
            with self._cond:
                while True:
                    retrying = bool(self._retry) or self._retry_all
                    due = retrying and time.monotonic() >= self._retry_at
                    if self._pending or self._all or due or self._closing:
                        break
                    self._cond.wait(self._retry_at - time.monotonic() if retrying else None)
                if self._closing and not (self._pending or self._all):
                    return
                # Whatever waits for a retry goes along with any round: "the next refresh".
                new, everything = self._pending, self._all or self._retry_all
                retry = self._retry
                self._pending, self._all, self._retry, self._retry_all = set(), False, set(), False
            self._round(new, everything, retry)

    def _round(self, new: set[str], everything: bool, retry: set[str]) -> None:
        todo = retry | new  # until the registry says which of ``new`` already have a view
        redo_all = everything
        try:
            with connect(
                self._dsn,
                autocommit=True,
                application_name="sequin-worker:views",
                timeouts=self._timeouts,
            ) as c:
                with self._cond:
                    self._conn = c
                if self._known is None or everything:
                    self._known = views.known_collections(c, self._schema)
                with self._cond:
                    seen = set(self._seen)
                todo = retry | (self._known | seen if everything else new - self._known)
                redo_all = False
                for collection in sorted(todo):
                    with self._cond:
                        if self._abandon:
                            return
                    (done,) = views.refresh_views(c, self._schema, [collection])
                    if done.action != "deferred":
                        todo.discard(collection)
                    if done.action not in ("deferred", "skipped"):
                        self._known.add(collection)
        except (psycopg.Error, StoreFailure) as exc:
            log.warning("view_refresh_failed", reason=str(exc).splitlines()[0] if str(exc) else "")
        finally:
            with self._cond:
                self._conn = None
        self._schedule_retry(todo, redo_all)

    def _schedule_retry(self, todo: set[str], redo_all: bool) -> None:
        with self._cond:
            if not todo and not redo_all:
                self._retry_wait = 0.0
                return
            self._retry |= todo
            self._retry_all = self._retry_all or redo_all
            self._retry_wait = min(self.RETRY_MAX_S, max(self.RETRY_FIRST_S, self._retry_wait * 2))
            self._retry_at = time.monotonic() + self._retry_wait
