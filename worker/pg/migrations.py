"""Schema migrations: applies ``sql/migrations/NNN_name.sql`` in order, once each.

Several processes may start at once (a Deployment's replicas, a backfill Job): all of them
call :func:`migrate`, and a session advisory lock makes them take turns, so each migration
runs exactly once and every caller returns only when the schema is current. Each migration
runs in its own transaction together with its row in ``{schema}.schema_migrations``.
"""

from __future__ import annotations

import psycopg
import structlog

from worker.pg import sqlfiles
from worker.pg.connection import DbTimeouts, translated
from worker.pg.locks import migration_lock_key

log = structlog.get_logger("worker.pg.migrations")


def migrate(
    conn: psycopg.Connection[tuple[object, ...]],
    schema: str,
    timeouts: DbTimeouts | None = None,
) -> list[int]:
    """Bring ``schema`` up to date. Returns the versions this call applied.

    ``conn`` must be in autocommit mode (the lock is session-level and each migration takes
    its own transaction). Raises :class:`~worker.errors.StoreFailure` if a migration fails;
    that migration is rolled back and the ones before it stay applied.

    Bounded waits: another process's migrations are waited for at most
    ``timeouts.statement`` seconds, and every DDL statement waits at most ``timeouts.wait``
    for its table lock (a DDL queued behind a long query would block every reader and writer
    of that table meanwhile). Either raises :class:`~worker.errors.StoreFailure` of class
    ``transient`` (SQLSTATE 55P03, lock not available), retried by the caller.
    """
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection")
    with translated():
        return _migrate(conn, schema, timeouts or DbTimeouts.default())


def _migrate(conn: psycopg.Connection[tuple[object, ...]], schema: str, t: DbTimeouts) -> list[int]:
    key = migration_lock_key(schema)
    set_lock_timeout = sqlfiles.statement("set_lock_timeout")
    conn.execute(set_lock_timeout, {"timeout": f"{int(t.statement * 1000)}"})
    conn.execute(sqlfiles.statement("advisory_lock"), {"key": key})
    try:
        conn.execute(set_lock_timeout, {"timeout": f"{int(t.wait * 1000)}"})
        # CREATE SCHEMA IF NOT EXISTS can still race without the lock; we hold it.
        conn.execute(sqlfiles.query("bootstrap_migrations", schema))
        applied = {row[0] for row in conn.execute(sqlfiles.query("migrations_applied", schema))}
        done: list[int] = []
        for m in sqlfiles.migrations():
            if m.version in applied:
                continue
            with conn.transaction():
                conn.execute(m.statement(schema))
                conn.execute(
                    sqlfiles.query("migration_record", schema),
                    {"version": m.version, "name": m.name},
                )
            log.info("migration_applied", version=m.version, name=m.name, schema=schema)
            done.append(m.version)
        return done
    finally:
        conn.execute(sqlfiles.statement("advisory_unlock"), {"key": key})


def pending(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> list[int]:
    """Versions not yet applied (all of them when the schema does not exist). Raises
    :class:`~worker.errors.StoreFailure`."""
    with translated():
        return _pending(conn, schema)


def _pending(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> list[int]:
    known = [m.version for m in sqlfiles.migrations()]
    if not sqlfiles.table_exists(conn, schema, "schema_migrations"):
        return known
    applied = {row[0] for row in conn.execute(sqlfiles.query("migrations_applied", schema))}
    return [v for v in known if v not in applied]
