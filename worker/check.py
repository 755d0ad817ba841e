"""``sequin-worker check``: the first thing to run after writing ``.env``.

Each check prints one line, ✓ or ✗, and a hint when it fails: the settings, the API with the
token (one request, ``limit=1``), the database, the migrations, and the consumer's stored
filters. Returns True only when every check passes. Nothing is written: pending migrations
are reported, not applied.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from worker.api import client_from_settings
from worker.config import Settings, load_settings
from worker.errors import (
    ApiError,
    ConfigError,
    RequestRejected,
    Stopped,
    StoreFailure,
    StoreUnavailable,
    TokenRejected,
)
from worker.pg import migrations, sqlfiles
from worker.pg.connection import connect, translated
from worker.pg.store import filters_mismatch

OK, FAIL = "✓", "✗"


class Checks:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = 0

    def ok(self, what: str, detail: str) -> None:
        print(f"{OK} {what}: {detail}", file=self.out, flush=True)

    def fail(self, what: str, detail: str, hint: str) -> None:
        self.failed += 1
        print(f"{FAIL} {what}: {detail}\n    hint: {hint}", file=self.out, flush=True)


def run_checks(
    out: TextIO | None = None,
    settings_loader: Callable[[], Settings] | None = None,
) -> bool:
    c = Checks(out or sys.stdout)
    try:
        settings = (settings_loader or _load)()
    except ConfigError as exc:
        for line in exc.problems:
            c.fail("configuration", line, "fix it in the environment or .env (see .env.example)")
        return False
    filters = ", ".join(f"{k}={v}" for k, v in settings.filters.items() if v) or "no filters"
    c.ok(
        "configuration",
        f"consumer {settings.consumer!r} ({filters}), schema {settings.db_schema}, "
        f"{settings.delete_mode} deletes, API {settings.base_url}",
    )
    _check_api(c, settings)
    _check_database(c, settings)
    return c.failed == 0


def _load() -> Settings:
    return load_settings(require=("api_token", "database_url"))


def _check_api(c: Checks, settings: Settings) -> None:
    client = client_from_settings(settings, max_retries=0, page_size=1, request_timeout=30)
    started = time.perf_counter()
    try:
        page = client.fetch_page(None)
    except TokenRejected as exc:
        c.fail("API", str(exc), "create or copy the token again in the Sequin console")
    except RequestRejected as exc:
        # 404 is a path the API does not have (a base URL ending in /v1, say); other 4xx are
        # about the query: the filters.
        hint = (
            f"SEQUIN_BASE_URL is {settings.base_url}: give the API's root, without /v1"
            if exc.status == 404
            else "check SEQUIN_SYNC_ID / SEQUIN_PROVIDER / SEQUIN_COLLECTION"
        )
        c.fail("API", str(exc), hint)
    except (ApiError, Stopped) as exc:
        c.fail("API", str(exc), f"is {settings.base_url} reachable from here?")
    else:
        ms = (time.perf_counter() - started) * 1000
        c.ok("API", f"token accepted, {len(page.records)} record(s) in the first page, {ms:.0f} ms")
    finally:
        client.close()


def _check_database(c: Checks, settings: Settings) -> None:
    assert settings.database_url is not None
    try:
        conn = connect(settings.database_url.get_secret_value(), autocommit=True)
    except StoreUnavailable as exc:
        c.fail("database", str(exc), "check DATABASE_URL; is Postgres running and reachable?")
        c.fail("migrations", "not checked", "the database must answer first")
        return
    with conn, translated():
        row = conn.execute(sqlfiles.statement("server_version")).fetchone()
        c.ok("database", f"connected, PostgreSQL {row[0] if row else '?'}")
        try:
            pending = migrations.pending(conn, settings.db_schema)
        except StoreFailure as exc:
            c.fail("migrations", str(exc).splitlines()[0], "does the role have access to it?")
            return
        if pending:
            c.fail(
                "migrations",
                f"schema {settings.db_schema}: pending {pending}",
                "run `sequin-worker migrate` (run and backfill also migrate at start)",
            )
            return
        c.ok("migrations", f"schema {settings.db_schema} is up to date")
        row = conn.execute(
            sqlfiles.query("get_consumer", settings.db_schema), {"consumer": settings.consumer}
        ).fetchone()
        if row is None:
            c.ok("consumer", f"{settings.consumer!r} is new: the first run starts at the beginning")
            return
        stored = {"sync_id": row[2], "provider": row[3], "collection": row[4]}
        if filters_mismatch(settings.consumer, stored, settings.filters):
            c.fail(
                "consumer",
                f"{settings.consumer!r} was created with other filters "
                f"{ {k: v for k, v in stored.items() if v} }",
                f"use another SEQUIN_CONSUMER or `sequin-worker reset --consumer "
                f"{settings.consumer} --yes`",
            )
            return
        where = f"cursor {row[1]!r}" if row[1] is not None else "the beginning (no cursor yet)"
        c.ok("consumer", f"{settings.consumer!r} resumes at {where}")
