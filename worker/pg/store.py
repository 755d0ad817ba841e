"""The Postgres store: with :mod:`worker.pg.rows` (the COPY and the row-by-row fallback),
the only code that writes the data tables.

Contract of :meth:`PgStore.apply`: one batch (one or more consecutive pages) is applied in
**one transaction** that also moves the consumer's cursor from the position the batch was
fetched at to the cursor of its last page. Either all of it commits or none of it does, so
after a crash at any point the stored cursor and the stored rows agree, and the worker
resumes from exactly where the data stands.

Failure modes:

* :class:`StoreFailure`: Postgres refused or failed a statement; its ``failure_class``
  (see :mod:`worker.failures`) says what to do about it. The transaction in flight rolled
  back. The subclass :class:`StoreUnavailable` is the class ``connection_lost``: the
  connection failed or was lost (network, restart, ``pg_terminate_backend``) and the commit
  in flight may or may not have happened; callers reconnect and re-read the cursor, which
  tells which.
* :class:`CursorConflict`: the stored cursor is not where this process expected it: another
  process of the same consumer wrote in between. Nothing was applied.
* :class:`ConsumerMismatch`: the consumer exists with other filters (its cursor belongs to
  another stream). Raised by :meth:`PgStore.open_consumer`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
import structlog

from worker.errors import ConsumerMismatch, CursorConflict, StoreFailure, StoreUnavailable
from worker.model import ApplyResult, Batch, ConsumerConfig, DeadLetter, Record
from worker.pg import migrations, sqlfiles
from worker.pg.connection import (
    Conn,
    DbTimeouts,
    connect,
    describe,
    failure,
    sever,
    translated,
)
from worker.pg.rows import REFUSALS, write_rows, write_rows_one_by_one

log = structlog.get_logger("worker.pg.store")

_IDLE = (psycopg.pq.TransactionStatus.IDLE,)


class PgStore:
    """Writes batches for one consumer through one connection.

    Not thread-safe: one thread applies batches. Call :meth:`connect` (and
    :meth:`open_consumer`) before :meth:`apply`; after :class:`StoreUnavailable`, call
    :meth:`connect` again and re-read the position with :meth:`open_consumer`.
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        consumer: ConsumerConfig,
        *,
        notify_channel: str | None = None,
        timeouts: DbTimeouts | None = None,
    ) -> None:
        self._dsn = dsn
        self.timeouts = timeouts or DbTimeouts.default()
        # Held to close the connection, and by another thread to sever it: never both.
        self._guard = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self.notify_channel = notify_channel
        self.schema = schema
        self.consumer = consumer
        self._conn: Conn | None = None
        self._q = {
            name: sqlfiles.query(name, schema)
            for name in (
                "create_stage",
                "copy_stage",
                "upsert_rows",
                "apply_hard_deletes",
                "advance_cursor",
                "insert_dead_letter",
                "ensure_consumer",
                "get_consumer",
                "set_delete_mode",
                "notify",
                "adjust_counts",
                "clear_stage",
            )
        }

    # -- connection -----------------------------------------------------------------------

    def connect(self) -> None:
        """(Re)open the connection and prepare the per-session staging table."""
        self.close()
        conn = connect(
            self._dsn,
            application_name=f"sequin-worker:{self.consumer.name}",
            timeouts=self.timeouts,
            statement_timeout=True,
        )
        self._conn = conn  # from here on, interrupt() can end a wait on it
        try:
            with self._busy(), conn.transaction():
                conn.execute(self._q["create_stage"])
        except psycopg.Error as exc:
            self.close()
            raise failure(exc) from None

    def close(self) -> None:
        with self._guard:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    @contextmanager
    def _busy(self) -> Iterator[None]:
        # Marks a call on the connection in flight, for interrupt().
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    def interrupt(self) -> bool:
        """From another thread: end the call in flight on the connection, if any.

        Asks the server to cancel the statement (the transaction then rolls back and the
        call fails with :class:`psycopg.errors.QueryCanceled`); if the call has not ended
        within :attr:`DbTimeouts.round_trip` seconds (a silent server), severs the
        connection so that it fails at once. Returns within about twice that bound; True
        if a call was in flight.
        """
        with self._guard:
            conn = self._conn
        if conn is None or self._idle.is_set():
            return False
        bound = self.timeouts.round_trip
        log.info("db_call_cancelled", consumer=self.consumer.name)

        def cancel() -> None:
            try:
                conn.cancel_safe(timeout=bound)
            except psycopg.Error as exc:
                log.warning("db_cancel_failed", reason=describe(exc))

        # The cancel request needs a connection of its own, which a silent server does not
        # answer either: wait for the call to end, not for the cancel.
        threading.Thread(target=cancel, name="db-cancel", daemon=True).start()
        if not self._idle.wait(bound):
            with self._guard:
                if self._conn is conn:
                    sever(conn)
            self._idle.wait(bound)
        return True

    @property
    def conn(self) -> Conn:
        if self._conn is None or self._conn.closed:
            raise StoreUnavailable("not connected")
        return self._conn

    @contextmanager
    def _translate(self, *, refusals: bool = False) -> Iterator[None]:
        """Turn psycopg errors into :class:`StoreFailure`. With ``refusals``, Postgres
        refusing the data (:data:`REFUSALS`) passes through untouched for the row-by-row
        fallback of :meth:`apply`."""
        try:
            yield
        except psycopg.Error as exc:
            if refusals and isinstance(exc, REFUSALS):
                raise
            raise self._failed(exc) from None

    def _failed(self, exc: psycopg.Error) -> StoreFailure:
        error = failure(exc)
        conn = self._conn
        broken = conn is None or conn.closed or conn.info.transaction_status not in _IDLE
        if error.failure_class == "connection_lost" or broken:
            # Lost or unusable connection: drop it; the caller reconnects. Otherwise the
            # transaction rolled back and the connection serves the retry.
            self.close()
        return error

    def migrate(self) -> list[int]:
        """Apply pending migrations (see :mod:`worker.pg.migrations`) on a side connection."""
        with (
            self._translate(),
            connect(self._dsn, autocommit=True, timeouts=self.timeouts) as conn,
        ):
            return migrations.migrate(conn, self.schema, self.timeouts)

    # -- consumer -------------------------------------------------------------------------

    def open_consumer(self) -> str | None:
        """Create the consumer's row if new, check its filters, return the stored cursor.

        Raises :class:`ConsumerMismatch` when the row exists with other filters.
        """
        c = self.consumer
        params = {"consumer": c.name, "delete_mode": c.delete_mode, **c.filters()}
        with self._busy(), self._translate(), self.conn.transaction():
            self.conn.execute(self._q["ensure_consumer"], params)
            row = self.conn.execute(self._q["get_consumer"], {"consumer": c.name}).fetchone()
            assert row is not None
            _, cursor, sync_id, provider, collection, delete_mode = row
            stored = {"sync_id": sync_id, "provider": provider, "collection": collection}
            mismatch = filters_mismatch(c.name, stored, c.filters())
            if mismatch is not None:
                raise mismatch
            if delete_mode != c.delete_mode:
                log.warning(
                    "delete_mode_changed",
                    consumer=c.name,
                    stored=delete_mode,
                    configured=c.delete_mode,
                )
                self.conn.execute(
                    self._q["set_delete_mode"],
                    {"consumer": c.name, "delete_mode": c.delete_mode},
                )
        return cursor  # type: ignore[no-any-return]

    # -- apply ----------------------------------------------------------------------------

    def apply(self, batch: Batch) -> ApplyResult:
        """Apply ``batch`` and move the cursor to ``batch.cursor``, in one transaction.

        The update of the cursor row is the first statement and succeeds only while the stored
        cursor is ``batch.after_cursor`` (the fence against a second writer, in SQL: the store
        keeps no cursor of its own); otherwise :class:`CursorConflict` and nothing applied.
        """
        started = time.perf_counter()
        rows = batch.rows()
        dead = batch.dead_letters()

        def fresh() -> ApplyResult:
            return ApplyResult(
                received=batch.received,
                dead_lettered=len(dead),
                pages=len(batch.pages),
                cursor=batch.cursor,
                newest=batch.newest,
            )

        result = fresh()
        try:
            self._apply(batch, rows, dead, result, isolate=False)
        except REFUSALS as exc:
            # Postgres refused something validation let through (it should not happen).
            # Rather than fail this batch on every restart, apply it again row by row and
            # dead-letter the rows it refuses, with Postgres' reason.
            log.warning("batch_refused_applying_row_by_row", reason=describe(exc), rows=len(rows))
            result = fresh()
            self._apply(batch, rows, list(dead), result, isolate=True)
        result.seconds = time.perf_counter() - started
        return result

    def _apply(
        self,
        batch: Batch,
        rows: list[Record],
        dead: list[DeadLetter],
        result: ApplyResult,
        *,
        isolate: bool,
    ) -> None:
        conn = self.conn
        c = self.consumer
        hard = c.delete_mode == "hard"
        with (
            self._busy(),
            self._translate(refusals=not isolate),
            conn.transaction(),
            conn.cursor() as cur,
        ):
            cur.execute(
                self._q["advance_cursor"],
                {
                    "consumer": c.name,
                    "cursor": batch.cursor,
                    "expected": batch.after_cursor,
                    "records": batch.valid,
                    "pages": len(batch.pages),
                    "dead_letters": len(dead),
                    "newest": result.newest,
                },
            )
            if cur.rowcount != 1:
                raise CursorConflict(f"consumer {c.name!r} was moved or reset by another process")
            if rows:
                if isolate:
                    changed, refused = write_rows_one_by_one(cur, batch, self._q, hard=hard)
                    dead.extend(refused)
                    result.dead_lettered = len(dead)
                    if refused:
                        cur.execute(
                            self._q["adjust_counts"],
                            {"consumer": c.name, "refused": len(refused)},
                        )
                else:
                    changed = self._write_rows(cur, rows)
                    refused = []
                result.upserted = sum(n for (_, is_del), n in changed.items() if not is_del)
                result.deleted = sum(n for (_, is_del), n in changed.items() if is_del)
                result.changed = dict(changed)
            else:
                refused = []
            # The rest were superseded within the batch or changed nothing (older than the row).
            result.skipped = batch.valid - len(refused) - result.upserted - result.deleted
            if dead:
                result.dead_by_collection = dict(
                    Counter(d.collection_id or "unknown" for d in dead)
                )
                cur.executemany(
                    self._q["insert_dead_letter"],
                    [
                        {
                            "consumer": c.name,
                            "after_cursor": d.after_cursor,
                            "collection_id": d.collection_id,
                            "upstream_id": d.upstream_id,
                            "reason": d.reason,
                            "raw": d.raw,
                        }
                        for d in dead
                    ],
                )
            if self.notify_channel is not None:
                cur.execute(
                    self._q["notify"],
                    {"channel": self.notify_channel, "payload": notify_payload(c.name, result)},
                )

    def _write_rows(
        self, cur: psycopg.Cursor[tuple[Any, ...]], rows: list[Record]
    ) -> Counter[tuple[str, bool]]:
        # A method of its own so that bench/ can time it.
        return write_rows(cur, rows, self._q, hard=self.consumer.delete_mode == "hard")


NOTIFY_LIMIT = 7900  # Postgres refuses payloads of 8000 bytes or more


def notify_payload(consumer: str, result: ApplyResult) -> str:
    """The JSON sent with NOTIFY after a commit: consumer, cursor, rows changed per
    collection, dead letters. Kept under Postgres' payload limit: when it would not fit,
    ``truncated`` is set and ``changed`` dropped, then (a cursor that long) ``cursor`` too;
    LISTENers read the cursor from the ``cursors`` table then."""
    doc: dict[str, object] = {
        "consumer": consumer,
        "cursor": result.cursor,
        "changed": result.by_collection,
        "dead_lettered": result.dead_lettered,
    }
    text = orjson.dumps(doc).decode()
    if len(text.encode()) > NOTIFY_LIMIT:
        doc["changed"] = {}
        doc["truncated"] = True
        text = orjson.dumps(doc).decode()
    if len(text.encode()) > NOTIFY_LIMIT:
        doc["cursor"] = None
        text = orjson.dumps(doc).decode()
    return text


def filters_mismatch(
    name: str, stored: dict[str, str | None], configured: dict[str, str | None]
) -> ConsumerMismatch | None:
    """The one check that a consumer's stored filters (its row in ``cursors``) are the
    configured ones: None when they are, else the error to raise or report (its cursor
    belongs to another stream)."""
    if stored == configured:
        return None
    return ConsumerMismatch(
        f"consumer {name!r} was created with filters {_fmt(stored)} but is now "
        f"configured with {_fmt(configured)}; its cursor belongs to that other "
        "stream. Use another SEQUIN_CONSUMER, or start this one over with "
        f"`sequin-worker reset --consumer {name}`."
    )


def _fmt(filters: dict[str, str | None]) -> str:
    shown = {k: v for k, v in filters.items() if v is not None}
    return str(shown) if shown else "{} (no filters)"


def reset_consumer(conn: Conn, schema: str, consumer: str) -> bool:
    """Delete a consumer's cursor row so that it starts over from the beginning; True if it
    existed. The rows it wrote stay; a fresh run rewrites each key with its latest version.
    Raises :class:`StoreFailure`."""
    with translated():
        cur = conn.execute(sqlfiles.query("reset_consumer", schema), {"consumer": consumer})
        return cur.rowcount == 1
