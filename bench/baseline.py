"""The loop a user would write by hand: the benchmark's baseline contender.

requests + stdlib json; one page (500 records) per transaction; per page one ``executemany``
of ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` (the same newer-or-equal guard as the
worker) into a table shaped like ``sequin.records`` (same columns, key and indexes); the
cursor is saved in the same transaction. No validation, no retries, no dead letters.

Environment (the worker's names): SEQUIN_BASE_URL, SEQUIN_API_TOKEN, DATABASE_URL,
SEQUIN_DB_SCHEMA (default ``baseline``). Prints one summary line.
"""

from __future__ import annotations

import json
import os
import time

import psycopg
import requests
from psycopg.types.json import Jsonb

DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.records (
    collection_id text NOT NULL, upstream_id text NOT NULL, sync_id uuid,
    provider text NOT NULL GENERATED ALWAYS AS (split_part(collection_id, ':', 1)) STORED,
    data jsonb, deleted boolean NOT NULL DEFAULT false,
    upstream_updated_at timestamptz NOT NULL, created_at timestamptz,
    synced_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection_id, upstream_id));
CREATE INDEX IF NOT EXISTS records_cu ON {s}.records (collection_id, upstream_updated_at);
CREATE INDEX IF NOT EXISTS records_u ON {s}.records (upstream_updated_at);
CREATE INDEX IF NOT EXISTS records_s ON {s}.records (sync_id);
CREATE INDEX IF NOT EXISTS records_p ON {s}.records (provider);
CREATE TABLE IF NOT EXISTS {s}.cursors (consumer text PRIMARY KEY, cursor text);
"""
UPSERT = """
INSERT INTO {s}.records AS records
    (collection_id, upstream_id, sync_id, data, deleted, upstream_updated_at, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (collection_id, upstream_id) DO UPDATE SET
    sync_id = excluded.sync_id, data = excluded.data, deleted = excluded.deleted,
    upstream_updated_at = excluded.upstream_updated_at, created_at = excluded.created_at,
    synced_at = now()
WHERE records.upstream_updated_at <= excluded.upstream_updated_at
"""
SAVE_CURSOR = """
INSERT INTO {s}.cursors (consumer, cursor) VALUES ('baseline', %s)
ON CONFLICT (consumer) DO UPDATE SET cursor = excluded.cursor
"""


def main() -> None:
    schema = os.environ.get("SEQUIN_DB_SCHEMA", "baseline")
    url = os.environ["SEQUIN_BASE_URL"].rstrip("/") + "/v1/records"
    http = requests.Session()
    http.headers["Authorization"] = "Bearer " + os.environ["SEQUIN_API_TOKEN"]
    started, total = time.monotonic(), 0
    # autocommit: each `with conn.transaction()` below is one real BEGIN ... COMMIT.
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(DDL.format(s=schema))
        row = conn.execute(
            f"SELECT cursor FROM {schema}.cursors WHERE consumer = 'baseline'"
        ).fetchone()
        cursor = row[0] if row else None
        while True:
            params: dict[str, str | int] = {"limit": 500}
            if cursor:
                params["after_cursor"] = cursor
            resp = http.get(url, params=params, timeout=60)
            resp.raise_for_status()
            page = json.loads(resp.content)
            records = page["records"]
            # The stream is ordered by upstream_updated_at: the last version of a key wins.
            # (ON CONFLICT cannot touch the same row twice in one statement.)
            latest = {(r["collection_id"], r["upstream_id"]): r for r in records}
            rows = [
                (
                    r["collection_id"],
                    r["upstream_id"],
                    r.get("sync_id"),
                    Jsonb(r["data"]) if r.get("data") is not None else None,
                    r["deleted"],
                    r["upstream_updated_at"],
                    r.get("created_at"),
                )
                for r in latest.values()
            ]
            with conn.transaction(), conn.cursor() as cur:
                if rows:
                    cur.executemany(UPSERT.format(s=schema), rows)
                cur.execute(SAVE_CURSOR.format(s=schema), (page["cursor"],))
            total += len(records)
            cursor = page["cursor"]
            if len(records) < 500:
                break
    seconds = time.monotonic() - started
    print(
        f"baseline complete: {total} records in {seconds:.2f} s ({total / seconds:.0f} records/s)"
    )


if __name__ == "__main__":
    main()
