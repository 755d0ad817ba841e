"""Per-record costs of the worker's steps in isolation, and COPY variants into a staging table.

    .venv/bin/python bench/micro.py [--records 20000] [--pages 40]

Fetches ``--pages`` real pages from the simulator, then times each step on them, best of 5:
decoding (the codec's msgspec fast path and its exact split/stdlib fallback, against the
stdlib and orjson as references), validation (``parse_page`` and its parts that are public
functions), dedup; then COPY of the deduplicated rows into an index-free staging table: binary
with ``set_types`` as the store does, and text variants for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from uuid import UUID

import harness
import orjson
import psycopg
import requests
from harness import Databases, SimulatorProcess, Table
from psycopg.types.json import set_json_dumps


def best(fn: Callable[[], object], repeat: int = 5) -> float:
    """The fastest of ``repeat`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def page_bodies(sim: SimulatorProcess, n_pages: int) -> Iterator[bytes]:
    """The first ``n_pages`` response bodies of the stream, as sent."""
    from worker.codec import decode_page

    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {harness.TOKEN}"
    params: dict[str, str | int] = {"limit": 500}
    for _ in range(n_pages):
        body = http.get(sim.base_url + "/v1/records", params=params, timeout=60).content
        yield body
        params["after_cursor"] = decode_page(body)[1]


def per_record(bodies: list[bytes]) -> list[Any]:
    """Print the per-record table; return the deduplicated rows of 4-page batches."""
    from worker import codec
    from worker import records as rec
    from worker.model import Batch

    decoded = [codec.decode_page(b) for b in bodies]
    items = [item for page, _ in decoded for item in page]
    n = len(items)
    harness.section(f"micro: per-record costs on {n} real records ({len(bodies)} pages), best of 5")
    t = Table(["step", "us/record", "s per 100k"], left=1)

    def add(name: str, seconds: float) -> None:
        t.add(name, f"{seconds * 1e6 / n:.2f}", f"{seconds * 1e5 / n:.3f}")

    # Each decoded page is dropped at once (the worker holds ~10 at most): keeping all of
    # them alive would mostly measure the cyclic GC walking them (see the "kept alive" line).
    add(
        "decode_page (codec: msgspec fast path)",
        best(lambda: [codec.decode_page(b) and None for b in bodies]),
    )
    add("  all pages kept alive (GC)", best(lambda: [codec.decode_page(b) for b in bodies]))
    add(
        "decode_split (the split fallback: envelope, then each item)",
        best(lambda: [codec.decode_split(b) and None for b in bodies]),
    )
    add(
        "json.loads, stdlib (baseline.py's)", best(lambda: [json.loads(b) and None for b in bodies])
    )
    add("orjson.loads (drain.py's)", best(lambda: [orjson.loads(b) and None for b in bodies]))

    def validate() -> None:
        for page, cursor in decoded:
            rec.parse_page(page, cursor=cursor, after_cursor=None)

    add("parse_page (validate, all of it)", best(validate))
    stamps = [i["upstream_updated_at"] for i in items] + [
        i["created_at"] for i in items if i.get("created_at")
    ]
    add("  datetime.fromisoformat x2", best(lambda: [datetime.fromisoformat(s) for s in stamps]))
    add(
        "  parse_timestamp x2 (shape check + fromisoformat)",
        best(lambda: [rec.parse_timestamp(s, "t") for s in stamps]),
    )
    sync_ids = [i["sync_id"] for i in items]
    add(
        "  UUID(sync_id) (now only for non-canonical spellings)",
        best(lambda: [UUID(s) for s in sync_ids]),
    )
    exact = [
        rec.decode_exact(i["data"].raw) for i in items if isinstance(i.get("data"), rec.RawJSON)
    ]
    add(
        "exact fallback: decode_exact(data)",
        best(
            lambda: [
                rec.decode_exact(i["data"].raw)
                for i in items
                if isinstance(i.get("data"), rec.RawJSON)
            ]
        ),
    )
    add(
        "  dumps_exact(data) (its re-serialisation)",
        best(lambda: [rec.dumps_exact(d) for d in exact]),
    )
    pages = [rec.parse_page(page, cursor=cursor, after_cursor=None) for page, cursor in decoded]
    batches = [Batch(after_cursor=None, pages=pages[i : i + 4]) for i in range(0, len(pages), 4)]
    add("dedup (Batch.rows, 4-page batches)", best(lambda: [b.rows() for b in batches]))
    print(t.render())
    return [r for b in batches for r in b.rows()]


_STAGE = """CREATE TEMP TABLE stage (collection_id text NOT NULL, upstream_id text NOT NULL,
 sync_id text, upstream_updated_at timestamptz NOT NULL, created_at timestamptz,
 deleted boolean NOT NULL, data {data_type})"""
_COLS = "(collection_id, upstream_id, sync_id, upstream_updated_at, created_at, deleted, data)"
# As the store's staging table (sql/queries.sql, create_stage) and its binary COPY types.
_TYPES = ["text", "text", "text", "timestamptz", "timestamptz", "bool", "jsonb"]
Variant = tuple[str, str, list[str] | None, Callable[[], list[tuple[Any, ...]]]]


def copy_variants(rows: list[Any]) -> dict[str, Variant]:
    """name -> (staging DDL, COPY statement, binary types or None, the rows to write)."""

    def text(data: str | bytes | None) -> str | None:
        return data.decode() if isinstance(data, bytes) else data

    def typed() -> list[tuple[Any, ...]]:
        return [
            (
                r.collection_id,
                r.upstream_id,
                r.sync_id,
                r.upstream_updated_at,
                r.created_at,
                r.deleted,
                r.data_json,
            )
            for r in rows
        ]

    def typed_text() -> list[tuple[Any, ...]]:
        return [(*row[:6], text(row[6])) for row in typed()]

    def received_strings() -> list[tuple[Any, ...]]:
        return [
            (
                r.collection_id,
                r.upstream_id,
                r.sync_id,
                r.upstream_updated_at.isoformat(),
                r.created_at.isoformat() if r.created_at else None,
                r.deleted,
                text(r.data_json),
            )
            for r in rows
        ]

    text_copy = f"COPY stage {_COLS} FROM STDIN"
    jsonb, as_text = _STAGE.format(data_type="jsonb"), _STAGE.format(data_type="text")
    return {
        "binary + set_types, as the store does (data passed through)": (
            jsonb,
            f"COPY stage {_COLS} FROM STDIN (FORMAT BINARY)",
            _TYPES,
            typed,
        ),
        "text (datetime, str; the store before binary COPY)": (
            jsonb,
            text_copy,
            None,
            typed_text,
        ),
        "text, timestamps as strings": (jsonb, text_copy, None, received_strings),
        "text, data into a text column (no jsonb parse)": (as_text, text_copy, None, typed_text),
    }


def copies(dbs: Databases, rows: list[Any]) -> None:
    harness.section(
        f"micro: COPY of {len(rows)} deduplicated rows into a staging table (best of 3)"
    )
    t = Table(["COPY variant", "wall s", "client CPU s", "us/row wall"], left=1)
    with dbs.fresh("micro") as (dsn, _schema), psycopg.connect(dsn) as conn:
        set_json_dumps(lambda text: text, context=conn)  # data is JSON text already
        for name, (ddl, copy_sql, types, make_rows) in copy_variants(rows).items():
            conn.execute("DROP TABLE IF EXISTS stage")
            conn.execute(ddl)
            conn.commit()
            prepared = make_rows()
            best_w, best_c = 1e9, 1e9
            for _ in range(3):
                w0, c0 = time.perf_counter(), time.thread_time()
                with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    if types:
                        copy.set_types(types)
                    for row in prepared:
                        copy.write_row(row)
                conn.rollback()
                best_w = min(best_w, time.perf_counter() - w0)
                best_c = min(best_c, time.thread_time() - c0)
            t.add(name, f"{best_w:.3f}", f"{best_c:.3f}", f"{best_w * 1e6 / len(rows):.1f}")
    print(t.render())
    print(
        "(row preparation is not timed; a staging table without indexes: this is the "
        "client->server transfer and parse only)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=20_000, help="the simulator's dataset")
    parser.add_argument("--pages", type=int, default=40, help="pages of 500 to measure on")
    args = parser.parse_args()
    with harness.workload(args.records) as (dbs, sim):
        rows = per_record(list(page_bodies(sim, args.pages)))
        copies(dbs, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
