"""The Postgres store: the only module that writes the data tables.

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
from psycopg.types.json import set_json_dumps

from worker import migrations, sqlfiles
from worker.errors import ConsumerMismatch, CursorConflict, StoreFailure, StoreUnavailable
from worker.failures import classify
from worker.model import ApplyResult, Batch, ConsumerConfig, DeadLetter, Record
from worker.pgconn import DbTimeouts, deadline, sever

log = structlog.get_logger("worker.store")

Conn = psycopg.Connection[tuple[Any, ...]]


def store_failure(exc: psycopg.Error) -> StoreFailure:
    """The domain error for ``exc``, classified by its SQLSTATE; the message is Postgres'
    first line (never the DSN), with the SQLSTATE when there is one."""
    cls = classify(exc.sqlstate)
    text = _describe(exc)
    if exc.sqlstate:
        text = f"{text} (SQLSTATE {exc.sqlstate})"
    if cls == "connection_lost":
        return StoreUnavailable(text, sqlstate=exc.sqlstate)
    return StoreFailure(text, failure_class=cls, sqlstate=exc.sqlstate)


def connect(
    dsn: str,
    *,
    autocommit: bool = False,
    application_name: str = "sequin-worker",
    timeouts: DbTimeouts | None = None,
    statement_timeout: bool = False,
) -> Conn:
    """Open a connection whose every wait is bounded (see :class:`DbTimeouts`): libpq's
    connect timeout, keepalives and ``tcp_user_timeout`` on our side; keepalives,
    ``tcp_user_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout`` on
    the server's side, plus ``statement_timeout`` if ``statement_timeout`` is true. A
    stricter value configured on the role or database is kept.

    Raises :class:`StoreUnavailable` (never with the DSN in the message: it may hold a
    password).
    """
    t = timeouts or DbTimeouts.default()
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            application_name=application_name[:63],
            **t.client_params(),
        )
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(_describe(exc)) from None
    server = t.server_settings(statement=statement_timeout)
    guard = threading.Lock()
    try:
        # Session settings (not startup options: those would replace any `options` in the
        # DSN, and poolers refuse them). Ours are ceilings: a stricter value set on the role
        # or database stays. One round trip, itself bounded.
        with deadline(conn, t.wait, guard):
            conn.execute(
                "SELECT set_config(s.name, CASE WHEN p.setting::bigint > 0"
                " AND p.setting::bigint < s.value::bigint THEN p.setting ELSE s.value END,"
                " false) FROM unnest(%s::text[], %s::text[]) AS s(name, value)"
                " LEFT JOIN pg_settings p ON p.name = s.name",
                (list(server), list(server.values())),
            )
            if not autocommit:
                conn.commit()
    except psycopg.OperationalError as exc:
        with guard:
            conn.close()
        raise StoreUnavailable(_describe(exc)) from None
    except psycopg.Error as exc:
        # A server too old for one of them (tcp_user_timeout: Postgres 12): keep the
        # connection; the client-side bounds still hold.
        log.warning("db_session_settings_unavailable", reason=_describe(exc))
        conn.rollback()
    return conn


# Binary COPY: psycopg sends datetimes, UUIDs and booleans in Postgres' own binary forms
# instead of formatting them as text (measured ~5% faster end to end).
STAGE_TYPES = ["text", "text", "text", "timestamptz", "timestamptz", "bool", "jsonb"]


# Postgres refusing the data of a row (a value validation let through): handled row by row.
REFUSALS = (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded)
_IDLE = (psycopg.pq.TransactionStatus.IDLE,)


def _as_is(text: Any) -> Any:
    return text


def _describe(exc: psycopg.Error) -> str:
    # libpq messages name host and port but never the password; keep the first line.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
        self._position: str | None = None
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
            raise store_failure(exc) from None

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
                log.warning("db_cancel_failed", reason=_describe(exc))

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
        failure = store_failure(exc)
        conn = self._conn
        broken = conn is None or conn.closed or conn.info.transaction_status not in _IDLE
        if failure.failure_class == "connection_lost" or broken:
            # Lost or unusable connection: drop it; the caller reconnects. Otherwise the
            # transaction rolled back and the connection serves the retry.
            self.close()
        return failure

    def migrate(self) -> list[int]:
        """Apply pending migrations (see :mod:`worker.migrations`) on a side connection."""
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
            if stored != c.filters():
                raise ConsumerMismatch(
                    f"consumer {c.name!r} was created with filters {_fmt(stored)} but is now "
                    f"configured with {_fmt(c.filters())}; its cursor belongs to that other "
                    "stream. Use another SEQUIN_CONSUMER, or start this one over with "
                    f"`sequin-worker reset --consumer {c.name}`."
                )
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
        self._position = cursor
        return cursor  # type: ignore[no-any-return]

    @property
    def position(self) -> str | None:
        """The cursor as of this process's last commit (or :meth:`open_consumer`)."""
        return self._position

    # -- apply ----------------------------------------------------------------------------

    def apply(self, batch: Batch) -> ApplyResult:
        """Apply ``batch`` and move the cursor to ``batch.cursor``, in one transaction.

        ``batch.after_cursor`` must equal :attr:`position`; the update of the cursor row is the
        first statement and is conditional on it (a fence against a second writer).
        """
        if batch.after_cursor != self._position:
            raise CursorConflict(
                f"batch starts at {batch.after_cursor!r}, this process is at {self._position!r}"
            )
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
            log.warning("batch_refused_applying_row_by_row", reason=_describe(exc), rows=len(rows))
            result = fresh()
            self._apply(batch, rows, list(dead), result, isolate=True)
        self._position = batch.cursor
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
                    changed, refused = self._write_rows_one_by_one(cur, batch)
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

    def _write_rows_one_by_one(
        self, cur: psycopg.Cursor[tuple[Any, ...]], batch: Batch
    ) -> tuple[Counter[tuple[str, bool]], list[DeadLetter]]:
        """Each row under its own savepoint; the ones Postgres refuses become dead letters.

        Per key, the versions of the batch are tried newest first until Postgres accepts one:
        the key gets the newest version Postgres accepts, and every newer one it refused is
        dead-lettered. Applying the same pages one per batch gives the same table, so the
        result never depends on how pages were grouped (README, "Guarantees").
        """
        changed: Counter[tuple[str, bool]] = Counter()
        refused: list[DeadLetter] = []
        page_of = {id(r): p for p in batch.pages for r in p.records}
        for versions in batch.versions():
            for row in versions:
                try:
                    with self.conn.transaction():
                        changed.update(self._write_rows(cur, [row]))
                        cur.execute(self._q["clear_stage"])
                    break
                except REFUSALS as exc:
                    page = page_of[id(row)]
                    refused.append(
                        DeadLetter(
                            raw=page.raw_text(row),
                            reason=f"Postgres refused the row: {_describe(exc)}"[:500],
                            after_cursor=page.after_cursor,
                            collection_id=row.collection_id,
                            upstream_id=row.upstream_id,
                        )
                    )
        return changed, refused

    def _write_rows(
        self, cur: psycopg.Cursor[tuple[Any, ...]], rows: list[Record]
    ) -> Counter[tuple[str, bool]]:
        # data_json already is JSON text: the jsonb dumper must pass it through as it is.
        set_json_dumps(_as_is, context=cur)
        with cur.copy(self._q["copy_stage"]) as copy:
            copy.set_types(STAGE_TYPES)
            for r in rows:
                copy.write_row(
                    (
                        r.collection_id,
                        r.upstream_id,
                        r.sync_id,
                        r.upstream_updated_at,
                        r.created_at,
                        r.deleted,
                        r.data_json,
                    )
                )
        hard = self.consumer.delete_mode == "hard"
        changed: Counter[tuple[str, bool]] = Counter()
        cur.execute(self._q["upsert_rows"], {"include_deletes": not hard})
        for coll, is_del, n in cur.fetchall():
            changed[(coll, is_del)] += n
        if hard:
            cur.execute(self._q["apply_hard_deletes"])
            for coll, is_del, n in cur.fetchall():
                changed[(coll, is_del)] += n
        return changed


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


def _fmt(filters: dict[str, str | None]) -> str:
    shown = {k: v for k, v in filters.items() if v is not None}
    return str(shown) if shown else "{} (no filters)"


def ping(dsn: str, timeout: float = 2.0) -> bool:
    """True if the database answers a query within about ``timeout`` seconds (connecting,
    then the query, each bounded by it)."""
    try:
        with (
            psycopg.connect(
                dsn,
                autocommit=True,
                connect_timeout=max(2, int(timeout)),
                tcp_user_timeout=int(timeout * 1000),
            ) as conn,
            deadline(conn, timeout, threading.Lock()),
        ):
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def reset_consumer(
    dsn: str, schema: str, consumer: str, timeouts: DbTimeouts | None = None
) -> bool:
    """Delete a consumer's cursor row so that it starts over from the beginning.

    The rows it wrote stay; a fresh run rewrites each key with its latest version.
    """
    with connect(dsn, autocommit=True, timeouts=timeouts) as conn:
        cur = conn.execute(sqlfiles.query("reset_consumer", schema), {"consumer": consumer})
        return cur.rowcount == 1
