"""No psycopg error crosses the boundary of worker/pg/: the database commands report a failing
statement as a StoreFailure (``database: ... (SQLSTATE ...)``, exit 6), never a traceback."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import SCHEMA
from tests.helpers import TOKEN, run_cli, worker_env
from worker.errors import StoreFailure
from worker.pg.connection import translated
from worker.simulator import Simulator


def test_translated_turns_a_psycopg_error_into_a_classified_store_failure(db: str) -> None:
    with (
        psycopg.connect(db, autocommit=True) as conn,
        pytest.raises(StoreFailure) as caught,
        translated(),
    ):
        conn.execute("SELECT no_such_column FROM sequin.cursors")
    assert caught.value.sqlstate == "42703"
    assert caught.value.failure_class == "permanent"
    assert "SQLSTATE 42703" in str(caught.value)


def test_database_commands_report_a_failing_statement_with_exit_6(db: str) -> None:
    # Tables changed by hand: every command's first query fails inside Postgres.
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {SCHEMA}.cursors RENAME COLUMN records_applied TO gone")
        conn.execute(f"ALTER TABLE {SCHEMA}.schema_migrations RENAME COLUMN version TO gone")
    with Simulator(token=TOKEN, seed=1, records=1) as sim:
        env = worker_env(sim, db)
        for args in (["status"], ["migrate"], ["views"]):
            proc = run_cli(args, env)
            assert proc.returncode == 6, (args, proc.stderr)
            assert "database: " in proc.stderr and "(SQLSTATE 42703)" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
