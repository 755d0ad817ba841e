"""Per-collection views: ``{schema}.{provider}_{object}`` over the live rows of a collection.

A view exposes ``upstream_id``, ``upstream_updated_at`` and every top-level key of ``data``
as a typed column. Types are inferred from the collection's most recent rows: numbers
``numeric``, booleans ``boolean``, strings that are all ISO 8601 timestamps with an offset
``timestamptz`` (read through ``{schema}.try_timestamptz``: any other string in such a column,
'now' and 'infinity' included, reads as NULL), other strings ``text``, objects and arrays
``jsonb``; a key whose values mix kinds is ``jsonb`` (or ``text`` when they are all scalars).
Views follow the JSON: a key that appears upstream shows up at the next refresh
(``sequin-worker views``, or automatically when a collection first appears and when the
stream catches up). A key keeps its column name and position for the life of the view
(``{schema}.views.column_map``); new keys are appended.

A refresh never holds up readers or the sync: an unchanged view gets no DDL, appended
columns use ``CREATE OR REPLACE VIEW``, and the DDL waits at most :data:`LOCK_TIMEOUT_MS` for
its lock before the refresh of that view is deferred.

Names from upstream data are sanitised (lower case, ``[a-z0-9_]``, at most 63 bytes) and
then quoted with :class:`psycopg.sql.Identifier`; the data keys themselves only ever reach
SQL as quoted literals. The worker replaces only views it created (listed in
``{schema}.views``); a relation of the same name made by someone else is left alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import psycopg
import psycopg.errors
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from worker.pg import sqlfiles
from worker.pg.connection import translated
from worker.pg.locks import lock_key
from worker.records import provider_of

log = structlog.get_logger("worker.pg.views")

MAX_IDENT = 63
SAMPLE_ROWS = 10_000
RESERVED_COLUMNS = frozenset({"upstream_id", "upstream_updated_at"})
RESERVED_RELATIONS = frozenset({"records", "cursors", "dead_letters", "schema_migrations", "views"})
# How long a view's DDL may wait for its lock. DROP/CREATE OR REPLACE VIEW need an
# ACCESS EXCLUSIVE lock, which waits for every open transaction that has read the view, and
# every later reader queues behind the waiting DDL: so the DDL waits only a moment, then the
# refresh of that view is deferred to the next one.
LOCK_TIMEOUT_MS = 300
# How long a refresh waits for its turn behind another refresh of the same schema.
TURN_TIMEOUT_MS = 5_000


def sanitise_name(raw: str, fallback: str = "col") -> str:
    """A plain lower-case identifier for ``raw``: ``[a-z0-9_]``, not starting with a digit."""
    name = re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_")
    name = re.sub(r"_+", "_", name) or fallback
    if name[0].isdigit():
        name = "_" + name
    return name[:MAX_IDENT].rstrip("_") or fallback


def view_name(collection_id: str) -> str:
    """``stripe:subscription`` → ``stripe_subscription``."""
    provider = provider_of(collection_id)
    obj = collection_id[len(provider) + 1 :] if ":" in collection_id else ""
    name = sanitise_name(f"{provider}_{obj}" if obj else provider, "collection")
    return f"{name[: MAX_IDENT - 5]}_view" if name in RESERVED_RELATIONS else name


@dataclass(frozen=True)
class Column:
    name: str  # sanitised column name
    key: str  # the data key, verbatim
    pg_type: str  # text | numeric | boolean | timestamptz | jsonb


def infer_type(kinds: set[str], all_timestamps: bool) -> str:
    """The column type for a key whose non-null values have JSON types ``kinds``."""
    kinds = kinds - {"null"}
    if not kinds:
        return "text"
    if kinds == {"number"}:
        return "numeric"
    if kinds == {"boolean"}:
        return "boolean"
    if kinds == {"string"}:
        return "timestamptz" if all_timestamps else "text"
    if kinds & {"object", "array"}:
        return "jsonb"
    return "text"


def plan_columns(
    key_types: Iterable[tuple[str, str, bool]], previous: Sequence[Column] = ()
) -> list[Column]:
    """Columns from (key, json type, all strings are timestamps) rows.

    ``previous`` is the view's current column list: every key in it keeps its column name and
    position (its type follows the sample, unless the sample holds only nulls for it; a key
    gone from the sample keeps its column too), and keys new to the view are appended, sorted,
    with names that avoid every name already taken. So a new key ``ID`` next to an existing
    ``id`` becomes ``id_2`` and ``id`` keeps meaning what it meant.
    """
    kinds: dict[str, set[str]] = {}
    stamps: dict[str, bool] = {}
    for key, kind, is_ts in key_types:
        kinds.setdefault(key, set()).add(kind)
        stamps[key] = stamps.get(key, True) and bool(is_ts)
    taken = set(RESERVED_COLUMNS) | {c.name for c in previous}
    columns = []
    for c in previous:
        seen = kinds.get(c.key, set()) - {"null"}
        pg_type = infer_type(seen, stamps[c.key]) if seen else c.pg_type
        columns.append(Column(c.name, c.key, pg_type))
    kept = {c.key for c in previous}
    for key in sorted(kinds.keys() - kept):
        base = sanitise_name(key)
        if base in RESERVED_COLUMNS:
            base = f"data_{base}"
        name, n = base, 2
        while name in taken:
            suffix = f"_{n}"
            name = base[: MAX_IDENT - len(suffix)] + suffix
            n += 1
        taken.add(name)
        columns.append(Column(name, key, infer_type(kinds[key], stamps[key])))
    return columns


def view_statement(
    schema: str, name: str, collection_id: str, columns: Sequence[Column], *, replace: bool = False
) -> sql.Composed:
    """``CREATE [OR REPLACE] VIEW`` for one collection; every name quoted, every key a
    literal."""
    # The one statement composed here rather than named in sql/queries.sql: its column list
    # depends on the collection's keys, known only at run time. Names go through
    # sql.Identifier, keys through sql.Literal; no text from the data is ever spliced in.
    exprs: list[sql.Composable] = [sql.SQL("upstream_id"), sql.SQL("upstream_updated_at")]
    for c in columns:
        key = sql.Literal(c.key)
        if c.pg_type == "text":
            expr: sql.Composable = sql.SQL("data ->> {}").format(key)
        elif c.pg_type == "jsonb":
            expr = sql.SQL("data -> {}").format(key)
        elif c.pg_type == "timestamptz":
            expr = sql.SQL("{}.try_timestamptz(data ->> {})").format(sql.Identifier(schema), key)
        else:
            kind = "number" if c.pg_type == "numeric" else "boolean"
            expr = sql.SQL(
                "CASE WHEN jsonb_typeof(data -> {k}) = {kind} THEN (data ->> {k})::{t} END"
            ).format(k=key, kind=sql.Literal(kind), t=sql.SQL(c.pg_type))
        exprs.append(sql.SQL("{} AS {}").format(expr, sql.Identifier(c.name)))
    return sql.SQL(
        "CREATE {replace}VIEW {schema}.{view} AS SELECT {cols} FROM {schema}.records "
        "WHERE collection_id = {coll} AND NOT deleted"
    ).format(
        replace=sql.SQL("OR REPLACE " if replace else ""),
        schema=sql.Identifier(schema),
        view=sql.Identifier(name),
        cols=sql.SQL(", ").join(exprs),
        coll=sql.Literal(collection_id),
    )


_CATALOG_TYPES = {"timestamptz": "timestamp with time zone"}


def catalog_columns(columns: Sequence[Column]) -> list[tuple[str, str]]:
    """(name, type) of every column of the view, as ``format_type`` spells the types."""
    fixed = [("upstream_id", "text"), ("upstream_updated_at", "timestamp with time zone")]
    return fixed + [(c.name, _CATALOG_TYPES.get(c.pg_type, c.pg_type)) for c in columns]


def _column_map(columns: Sequence[Column]) -> Jsonb:
    return Jsonb([[c.name, c.key, c.pg_type] for c in columns])


def _columns_of(column_map: object) -> list[Column]:
    if not isinstance(column_map, list):
        return []  # a view made before the registry remembered its columns
    return [Column(str(n), str(k), str(t)) for n, k, t in column_map]


Action = Literal["created", "extended", "recreated", "unchanged", "deferred", "skipped"]


@dataclass(frozen=True)
class Refreshed:
    view: str
    collection_id: str
    columns: int
    # created: a new view; extended: CREATE OR REPLACE (columns added at the end);
    # recreated: DROP + CREATE (a column changed type); unchanged: no DDL at all;
    # deferred: a reader held the view longer than LOCK_TIMEOUT_MS, retried at the next refresh;
    # skipped: the name belongs to a relation we did not make.
    action: Action = "created"
    skipped: str | None = None  # why it was not (re)created


def refresh_views(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, collections: Iterable[str]
) -> list[Refreshed]:
    """Create, extend or replace the views of ``collections``; leave unchanged ones alone.

    One short transaction per view, under a transaction advisory lock so that concurrent
    refreshes take turns. The view's DDL waits at most ``LOCK_TIMEOUT_MS`` for its lock: a
    view that a reader holds is reported as ``deferred`` (event ``view_refresh_deferred``)
    and left as it was, so neither the caller nor any reader of the view waits longer than
    that. ``conn`` must be in autocommit mode. Other database errors raise
    :class:`~worker.errors.StoreFailure`.
    """
    with translated():
        return [_refresh_one(conn, schema, c) for c in collections]


def _refresh_one(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, collection_id: str
) -> Refreshed:
    name = view_name(collection_id)
    try:
        with conn.transaction():
            done = _plan_and_apply(conn, schema, collection_id)
    except psycopg.errors.LockNotAvailable:
        log.warning(
            "view_refresh_deferred",
            view=f"{schema}.{name}",
            collection=collection_id,
            lock_timeout_ms=LOCK_TIMEOUT_MS,
        )
        return Refreshed(name, collection_id, 0, action="deferred")
    if done.action == "skipped":
        log.warning("view_name_taken", view=done.view, collection=collection_id)
    else:
        log.log(
            logging.DEBUG if done.action == "unchanged" else logging.INFO,
            "view_refreshed",
            view=f"{schema}.{done.view}",
            collection=collection_id,
            columns=done.columns,
            action=done.action,
        )
    return done


def _set_lock_timeout(conn: psycopg.Connection[tuple[object, ...]], ms: int) -> None:
    conn.execute(sqlfiles.statement("set_local_lock_timeout"), {"timeout": f"{ms}ms"})


def _plan_and_apply(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, collection_id: str
) -> Refreshed:
    # Concurrent refreshes (the keeper, `sequin-worker views`) each hold this lock for one
    # short transaction, so waiting for it is bounded; the bound is there all the same.
    _set_lock_timeout(conn, TURN_TIMEOUT_MS)
    conn.execute(sqlfiles.statement("advisory_xact_lock"), {"key": lock_key("views", schema)})
    row = conn.execute(
        sqlfiles.query("view_of_collection", schema), {"collection": collection_id}
    ).fetchone()
    name = str(row[0]) if row else _free_name(conn, schema, view_name(collection_id))
    if name is None:
        wanted = view_name(collection_id)
        reason = f"{schema}.{wanted} exists and is not ours"
        return Refreshed(wanted, collection_id, 0, action="skipped", skipped=reason)
    previous = _columns_of(row[1]) if row else []
    key_types = conn.execute(
        sqlfiles.query("view_key_types", schema),
        {"collection": collection_id, "sample": SAMPLE_ROWS},
    ).fetchall()
    columns = plan_columns(((str(k), str(t), bool(ts)) for k, t, ts in key_types), previous)
    current = [
        (str(n), str(t))
        for n, t in conn.execute(
            sqlfiles.query("view_columns", schema), {"schema": schema, "view": name}
        )
    ]
    wanted_cols = catalog_columns(columns)
    action: Action
    if not current:
        action = "created"
    elif current == wanted_cols and previous == columns:
        action = "unchanged"
    elif wanted_cols[: len(current)] == current:
        action = "extended"  # Postgres allows OR REPLACE when columns are only appended
    else:
        action = "recreated"
    if action != "unchanged":
        # From here on a reader of the view would queue behind us, and every later reader
        # behind them: wait only a moment, then give up and leave the view as it is.
        _set_lock_timeout(conn, LOCK_TIMEOUT_MS)
        if action == "recreated":
            conn.execute(sqlfiles.query("drop_view", schema, view=name))
        stmt = view_statement(schema, name, collection_id, columns, replace=action == "extended")
        conn.execute(stmt)
    conn.execute(
        sqlfiles.query("view_register", schema),
        {
            "view": name,
            "collection": collection_id,
            "columns": len(columns),
            "column_map": _column_map(columns),
        },
    )
    return Refreshed(name, collection_id, len(columns), action=action)


def _free_name(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, wanted: str
) -> str | None:
    """``wanted`` if no relation has that name (or it is our view of another collection: then a
    suffixed name), else None when someone else's relation holds it."""
    name, n = wanted, 2
    while True:
        exists = conn.execute(
            sqlfiles.query("relation_exists", schema), {"schema": schema, "name": name}
        ).fetchone()
        if exists is None:
            return name
        ours = conn.execute(sqlfiles.query("view_is_ours", schema), {"view": name}).fetchone()
        if not ours:
            return None
        suffix = f"_{n}"
        name = wanted[: MAX_IDENT - len(suffix)] + suffix
        n += 1


def known_collections(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> set[str]:
    """Collections that already have a view (the registry: a small table). Raises
    :class:`~worker.errors.StoreFailure`."""
    with translated():
        return {str(r[0]) for r in conn.execute(sqlfiles.query("views_known", schema))}


def all_collections(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> list[str]:
    """Every collection in the records table, for ``sequin-worker views``.

    A skip scan of the primary key: one index probe per collection, not a read of every row
    as ``SELECT DISTINCT`` would do. The worker's own upkeep never calls this: it knows the
    collections from its batches and from the registry. Raises
    :class:`~worker.errors.StoreFailure`.
    """
    with translated():
        return [str(r[0]) for r in conn.execute(sqlfiles.query("collections_all", schema))]
