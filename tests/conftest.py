"""Shared fixtures: a real Postgres, a migrated template database copied per test.

``TEST_DATABASE_URL`` (any database on a server where we may CREATE DATABASE) selects the
server; without it, a throwaway embedded Postgres is started for the session. The schema is
migrated once into a template database; each test gets its own copy (CREATE DATABASE ...
TEMPLATE), which is much faster than migrating per test and isolates tests completely.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from worker.pg.migrations import migrate
from worker.simulator import Simulator

SCHEMA = "sequin"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """DSN of a database on the test server (used as the admin connection)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from worker.embedded import throwaway_postgres

    with throwaway_postgres() as dsn:
        yield dsn


def _admin(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    name = f"sequin_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(pg_server, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn, SCHEMA)
    yield name
    with _admin(pg_server) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def db(pg_server: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh database with the ``sequin`` schema migrated, dropped after the test."""
    name = f"sequin_t_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield make_conninfo(pg_server, dbname=name)
    with _admin(pg_server) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def empty_db(pg_server: str) -> Iterator[str]:
    """DSN of a fresh database without any schema (for migration tests)."""
    name = f"sequin_e_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(pg_server, dbname=name)
    with _admin(pg_server) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def sim(request: pytest.FixtureRequest) -> Iterator[Simulator]:
    """A simulator over a real socket, serving our test token, stopped after the test.

    Its options come from the closest ``sim`` marker (e.g. a module's
    ``pytestmark = pytest.mark.sim(seed=3, records=1200)``), passed to ``Simulator``."""
    from tests.helpers import TOKEN  # here: tests.helpers imports this module

    marker = request.node.get_closest_marker("sim")
    options: dict[str, object] = {"token": TOKEN} | (marker.kwargs if marker else {})
    with Simulator(**options) as s:  # type: ignore[arg-type]
        yield s


def fetch_rows(dsn: str, schema: str = SCHEMA) -> dict[tuple[str, str], dict[str, object]]:
    """The records table as {(collection_id, upstream_id): row}."""
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            sql.SQL(
                "SELECT collection_id, upstream_id, sync_id::text AS sync_id, provider, data, "
                "deleted, upstream_updated_at, created_at FROM {}.records"
            ).format(sql.Identifier(schema))
        )
        return {(r["collection_id"], r["upstream_id"]): r for r in cur.fetchall()}


def fetch_one(dsn: str, query: str, *params: object) -> tuple[object, ...] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchone()  # type: ignore[arg-type]
