"""Schema migrations: applies ``sql/migrations/NNN_name.sql`` in order, once each.

Several processes may start at once (a Deployment's replicas, a backfill Job): all of them
call :func:`migrate`, and a session advisory lock makes them take turns, so each migration
runs exactly once and every caller returns only when the schema is current. Each migration
runs in its own transaction together with its row in ``{schema}.schema_migrations``.
"""

from __future__ import annotations

import psycopg
import structlog

from worker import sqlfiles
from worker.locks import migration_lock_key
from worker.pgconn import DbTimeouts

log = structlog.get_logger("worker.migrations")

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migrate(
    conn: psycopg.Connection[tuple[object, ...]],
    schema: str,
    timeouts: DbTimeouts | None = None,
) -> list[int]:
    """Bring ``schema`` up to date. Returns the versions this call applied.

    ``conn`` must be in autocommit mode (the lock is session-level and each migration takes
    its own transaction). Raises :class:`psycopg.Error` if a migration fails; that migration
    is rolled back and the ones before it stay applied.

    Bounded waits: another process's migrations are waited for at most
    ``timeouts.statement`` seconds, and every DDL statement waits at most ``timeouts.wait``
    for its table lock (a DDL queued behind a long query would block every reader and writer
    of that table meanwhile). Either raises :class:`psycopg.errors.LockNotAvailable`: a
    transient failure, retried by the caller.
    """
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection")
    t = timeouts or DbTimeouts.default()
    key = migration_lock_key(schema)
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(t.statement * 1000)}",))
    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    ddl_lock_timeout = f"{int(t.wait * 1000)}"
    try:
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (ddl_lock_timeout,))
        # CREATE SCHEMA IF NOT EXISTS can still race without the lock; we hold it.
        conn.execute(sqlfiles.render(_BOOTSTRAP, schema))
        applied = {
            row[0]
            for row in conn.execute(
                sqlfiles.render("SELECT version FROM {schema}.schema_migrations", schema)
            )
        }
        done: list[int] = []
        for m in sqlfiles.migrations():
            if m.version in applied:
                continue
            with conn.transaction():
                conn.execute(m.statement(schema))
                conn.execute(
                    sqlfiles.render(
                        "INSERT INTO {schema}.schema_migrations (version, name) VALUES (%s, %s)",
                        schema,
                    ),
                    (m.version, m.name),
                )
            log.info("migration_applied", version=m.version, name=m.name, schema=schema)
            done.append(m.version)
        return done
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def pending(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> list[int]:
    """Versions not yet applied (all of them when the schema does not exist)."""
    known = [m.version for m in sqlfiles.migrations()]
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".schema_migrations',)
    ).fetchone()
    if not exists or not exists[0]:
        return known
    applied = {
        row[0]
        for row in conn.execute(
            sqlfiles.render("SELECT version FROM {schema}.schema_migrations", schema)
        )
    }
    return [v for v in known if v not in applied]
