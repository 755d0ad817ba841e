"""SQL text lives in ``sql/``: numbered migrations and named queries. This module finds and
loads it; nothing else in the worker holds SQL text, except the view DDL that
:mod:`worker.pg.views` composes from identifiers (a view's columns are only known at run time).

Every statement on our tables is written with a ``{schema}`` placeholder, filled with the
configured schema quoted by :class:`psycopg.sql.Identifier`; values are always bound
parameters. Every named query has a one-line ``--`` description under its ``-- name:`` line
(tests/test_sqlfiles.py checks it).

``sql/`` sits at the top of the repository; the wheel carries it as ``worker/sql`` (the
``force-include`` in pyproject.toml). :func:`sql_dir` finds it with :mod:`importlib.resources`
in an installed package, and next to the package in a checkout (an editable install).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{3,})_([\w-]+)\.sql$")


def sql_dir() -> Traversable:
    """The ``sql/`` folder: ``worker/sql`` in an installed wheel, else the checkout's top-level
    ``sql/`` next to the ``worker`` package."""
    packaged = resources.files("worker") / "sql"
    if (packaged / "queries.sql").is_file():
        return packaged
    checkout = Path(str(resources.files("worker"))).parent / "sql"
    if (checkout / "queries.sql").is_file():
        return checkout
    raise FileNotFoundError("sql/ folder not found in the worker package or next to it")


@cache
def _queries() -> dict[str, str]:
    text = (sql_dir() / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME_LINE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def names() -> list[str]:
    """Every query name in ``sql/queries.sql``, in file order."""
    return list(_queries())


def description(name: str) -> str:
    """The one-line description under the query's ``-- name:`` line ("" when missing)."""
    first = _queries()[name].splitlines()[0] if _queries()[name] else ""
    return first[2:].strip() if first.startswith("--") else ""


def query(name: str, schema: str, **identifiers: str) -> sql.Composed:
    """The named query from ``sql/queries.sql`` with ``{schema}`` (and any other placeholder
    named in ``identifiers``) filled in, each quoted by :class:`psycopg.sql.Identifier`."""
    quoted = {k: sql.Identifier(v) for k, v in identifiers.items()}
    return sql.SQL(_queries()[name]).format(schema=sql.Identifier(schema), **quoted)


def statement(name: str) -> sql.SQL:
    """A named query that names none of our tables (no ``{schema}``): catalog reads, session
    settings, advisory locks."""
    return sql.SQL(_queries()[name])


def table_exists(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    """Whether ``schema.table`` exists (the ``table_exists`` query)."""
    qualified = sql.Identifier(schema, table).as_string(conn)
    row = conn.execute(statement("table_exists"), {"table": qualified}).fetchone()
    return bool(row and row[0])


def render(text: str, schema: str) -> sql.Composed:
    """Fill ``{schema}`` in a SQL text with the quoted schema name."""
    return sql.SQL(text).format(schema=sql.Identifier(schema))


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Traversable

    def statement(self, schema: str) -> sql.Composed:
        return render(self.path.read_text(encoding="utf-8"), schema)


def migrations() -> list[Migration]:
    """All migrations in ``sql/migrations``, ordered by version."""
    found = []
    for path in (sql_dir() / "migrations").iterdir():
        m = _MIGRATION.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):  # pragma: no cover - a packaging mistake
        raise RuntimeError(f"duplicate migration versions in {sql_dir() / 'migrations'}")
    return found
