"""sql/queries.sql is the one home of the worker's SQL: every named query says what it is for,
and every name the code asks for exists (no database needed)."""

from __future__ import annotations

import re
from pathlib import Path

from worker.pg import sqlfiles

WORKER = Path(sqlfiles.__file__).resolve().parent.parent

# How the code names a query: sqlfiles.query("x", ...), sqlfiles.statement("x"), the lease's
# self._call("x", ...), the store's self._q["x"] and the tuple of names it renders.
_USES = re.compile(r"""(?:query|statement|_call)\(\s*["'](\w+)["']|_q\[["'](\w+)["']\]""")
_RENDERED = re.compile(r"for name in \((.*?)\)", re.DOTALL)


def test_every_named_query_has_a_description() -> None:
    names = sqlfiles.names()
    assert len(names) == len(set(names)), "a query name is used twice in queries.sql"
    missing = [n for n in names if not sqlfiles.description(n)]
    assert missing == [], f"no one-line description under -- name: {missing}"


def test_every_query_name_in_the_code_exists() -> None:
    known = set(sqlfiles.names())
    used: set[str] = set()
    for path in WORKER.rglob("*.py"):
        if path.name == "simulator.py" or "simulator" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        if "sqlfiles" not in text and "_call(" not in text:
            continue
        used.update(next(g for g in m.groups() if g) for m in _USES.finditer(text))
        for block in _RENDERED.findall(text):
            used.update(re.findall(r"""["'](\w+)["']""", block))
    assert {"advance_cursor", "upsert_rows", "ping", "drop_view"} <= used  # the scan works
    unknown = sorted(n for n in used if n not in known)
    assert unknown == [], f"used in worker/ but not in sql/queries.sql: {unknown}"


def test_sql_dir_is_found_with_importlib_resources() -> None:
    # In a checkout the top-level sql/ (the wheel carries it as worker/sql: test_packaging).
    assert (sqlfiles.sql_dir() / "queries.sql").is_file()
    assert sqlfiles.migrations()[0].version == 1
