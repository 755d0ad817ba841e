"""SQL text lives in ``sql/``: numbered migrations and named queries. This module finds and
loads it; nothing else in the worker holds SQL text.

Every statement is written with a ``{schema}`` placeholder, filled with the configured schema
quoted by :class:`psycopg.sql.Identifier`; values are always bound parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from psycopg import sql

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{3,})_([\w-]+)\.sql$")


def sql_dir() -> Path:
    """The ``sql/`` folder: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "queries.sql").is_file():
            return candidate
    raise FileNotFoundError(f"sql/ folder not found next to {here}")  # pragma: no cover


@cache
def _queries() -> dict[str, str]:
    text = (sql_dir() / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME_LINE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str, schema: str) -> sql.Composed:
    """The named query from ``sql/queries.sql`` with ``{schema}`` filled in."""
    return render(_queries()[name], schema)


def render(text: str, schema: str) -> sql.Composed:
    """Fill ``{schema}`` in a SQL text with the quoted schema name."""
    return sql.SQL(text).format(schema=sql.Identifier(schema))


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

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
