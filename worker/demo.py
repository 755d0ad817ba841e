"""``sequin-worker demo``: backfill a simulated account and show what landed.

Starts the simulator on a free loopback port and, when ``DATABASE_URL`` is unset, a throwaway
embedded Postgres; backfills into schema ``sequin_demo`` (recreated, so a real ``sequin``
schema in the same database is never touched); prints rows per collection and the rate;
stops everything it started.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg.sql import Composed

from worker import logs
from worker.config import Settings
from worker.embedded import throwaway_postgres
from worker.pg import sqlfiles
from worker.pg.connection import connect, translated
from worker.service import run_consumer
from worker.simulator import Simulator
from worker.status import table

DEMO_SCHEMA = "sequin_demo"
DEMO_TOKEN = "demo-token"  # noqa: S105 - the simulator's, not a secret


_MALFORMED = [
    '{"collection_id": "stripe:customer", "upstream_id": "cus_bad_ts", '
    '"upstream_updated_at": "last tuesday", "data": {}, "deleted": false}',
    '{"collection_id": "stripe:customer", "upstream_id": "cus_nul", '
    '"upstream_updated_at": "2030-01-01T00:00:00Z", "data": {"note": "a\\u0000b"}, '
    '"deleted": false}',
]


@contextmanager
def _database() -> Iterator[tuple[str, str]]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url, "DATABASE_URL"
        return
    with throwaway_postgres() as dsn:
        yield dsn, "a throwaway embedded Postgres"


def main(records: int = 20000) -> int:
    logs.configure(os.environ.get("SEQUIN_LOG_LEVEL", "warning"), "console")
    with Simulator(token=DEMO_TOKEN, seed=7, records=records) as sim, _database() as (dsn, where):
        # A few records Postgres cannot take as they are, to show where they go.
        for fragment in _MALFORMED:
            sim.append_raw(fragment)
        print(f"simulator: {sim.base_url}/v1/records ({records} records + {len(_MALFORMED)} bad)")
        print(f"database:  {where}, schema {DEMO_SCHEMA}")
        _execute(dsn, sqlfiles.query("drop_schema", DEMO_SCHEMA))
        settings = Settings(
            SEQUIN_API_TOKEN=DEMO_TOKEN,
            SEQUIN_BASE_URL=sim.base_url,
            DATABASE_URL=dsn,
            SEQUIN_DB_SCHEMA=DEMO_SCHEMA,
            SEQUIN_CONSUMER="demo",
        )
        outcome = run_consumer(settings, "backfill", threading.Event())
        t = outcome.totals
        print()
        print(_table(dsn))
        print()
        print(
            f"backfilled {t.received} records in {t.elapsed:.1f} s "
            f"({t.rate():.0f} records/s); a second run would change nothing."
        )
        if where == "DATABASE_URL":
            print(f"look: psql \"$DATABASE_URL\" -c 'TABLE {DEMO_SCHEMA}.dead_letters'")
        else:
            print("(the throwaway database is deleted now; set DATABASE_URL to keep the data)")
    return 0


def _table(dsn: str) -> str:
    rows = _execute(dsn, sqlfiles.query("demo_summary", DEMO_SCHEMA))
    header = ("collection", "live", "deleted", "dead letters")
    body = [(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]
    totals = ("total", *(str(sum(int(r[i]) for r in body)) for i in (1, 2, 3)))
    return table(header, body, right={1, 2, 3}, footer=totals)


def _execute(dsn: str, query: Composed) -> list[tuple[Any, ...]]:
    """Run one statement on a bounded connection; a psycopg error becomes the domain's
    :class:`~worker.errors.StoreFailure` (exit 6), through the store's one translation."""
    with translated(), connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []
