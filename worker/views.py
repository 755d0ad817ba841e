"""Per-collection views: ``{schema}.{provider}_{object}`` over the live rows of a collection.

A view exposes ``upstream_id``, ``upstream_updated_at`` and every top-level key of ``data``
as a typed column. Types are inferred from the collection's most recent rows: numbers
``numeric``, booleans ``boolean``, strings that are all ISO timestamps ``timestamptz``, other
strings ``text``, objects and arrays ``jsonb``; a key whose values mix kinds is ``jsonb``
(or ``text`` when they are all scalars). Views follow the JSON: a key that appears upstream
shows up at the next refresh (``sequin-worker views``, or automatically when a collection
first appears and when a backfill catches up).

Names from upstream data are sanitised (lower case, ``[a-z0-9_]``, at most 63 bytes) and
then quoted with :class:`psycopg.sql.Identifier`; the data keys themselves only ever reach
SQL as quoted literals. The worker replaces only views it created (listed in
``{schema}.views``); a relation of the same name made by someone else is left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg
import structlog
from psycopg import sql

from worker import sqlfiles
from worker.locks import lock_key
from worker.records import provider_of

log = structlog.get_logger("worker.views")

MAX_IDENT = 63
SAMPLE_ROWS = 10_000
RESERVED_COLUMNS = frozenset({"upstream_id", "upstream_updated_at"})
RESERVED_RELATIONS = frozenset({"records", "cursors", "dead_letters", "schema_migrations", "views"})


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


def plan_columns(key_types: Iterable[tuple[str, str, bool]]) -> list[Column]:
    """Columns from (key, json type, all strings are timestamps) rows, sorted by key."""
    kinds: dict[str, set[str]] = {}
    stamps: dict[str, bool] = {}
    for key, kind, is_ts in key_types:
        kinds.setdefault(key, set()).add(kind)
        stamps[key] = stamps.get(key, True) and bool(is_ts)
    taken = set(RESERVED_COLUMNS)
    columns = []
    for key in sorted(kinds):
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
    schema: str, name: str, collection_id: str, columns: Sequence[Column]
) -> sql.Composed:
    """``CREATE VIEW`` for one collection; every name quoted, every key a literal."""
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
        "CREATE VIEW {schema}.{view} AS SELECT {cols} FROM {schema}.records "
        "WHERE collection_id = {coll} AND NOT deleted"
    ).format(
        schema=sql.Identifier(schema),
        view=sql.Identifier(name),
        cols=sql.SQL(", ").join(exprs),
        coll=sql.Literal(collection_id),
    )


@dataclass(frozen=True)
class Refreshed:
    view: str
    collection_id: str
    columns: int
    skipped: str | None = None  # why it was not (re)created


def refresh_views(
    conn: psycopg.Connection[tuple[object, ...]],
    schema: str,
    collections: Iterable[str] | None = None,
) -> list[Refreshed]:
    """Create or replace the views of ``collections`` (default: every collection present).

    One transaction per view, under a transaction advisory lock so that concurrent refreshes
    take turns. ``conn`` must be in autocommit mode.
    """
    if collections is None:
        rows = conn.execute(sqlfiles.query("collections_present", schema))
        collections = [str(r[0]) for r in rows]
    done = []
    for collection_id in collections:
        done.append(_refresh_one(conn, schema, collection_id))
    return done


def _refresh_one(
    conn: psycopg.Connection[tuple[object, ...]], schema: str, collection_id: str
) -> Refreshed:
    ident = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("views", schema),))
        row = conn.execute(
            sqlfiles.query("view_of_collection", schema), {"collection": collection_id}
        ).fetchone()
        name = str(row[0]) if row else _free_name(conn, schema, view_name(collection_id))
        if name is None:
            wanted = view_name(collection_id)
            log.warning("view_name_taken", view=wanted, collection=collection_id)
            return Refreshed(
                wanted, collection_id, 0, skipped=f"{schema}.{wanted} exists and is not ours"
            )
        key_types = conn.execute(
            sqlfiles.query("view_key_types", schema),
            {"collection": collection_id, "sample": SAMPLE_ROWS},
        ).fetchall()
        columns = plan_columns((str(k), str(t), bool(ts)) for k, t, ts in key_types)
        conn.execute(sql.SQL("DROP VIEW IF EXISTS {}.{}").format(ident, sql.Identifier(name)))
        conn.execute(view_statement(schema, name, collection_id, columns))
        conn.execute(
            sqlfiles.query("view_register", schema),
            {"view": name, "collection": collection_id, "columns": len(columns)},
        )
    log.info(
        "view_refreshed", view=f"{schema}.{name}", collection=collection_id, columns=len(columns)
    )
    return Refreshed(name, collection_id, len(columns))


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
    """Collections that already have a view."""
    return {str(r[0]) for r in conn.execute(sqlfiles.query("views_known", schema))}
