"""The loop's totals path, with the in-memory sink's real counts (no sockets, no DB)."""

from __future__ import annotations

import threading
from typing import Any

from worker.model import ApplyResult
from worker.sync import SyncLoop, Totals
from worker.testing import InMemorySink, InMemorySource


def rec(i: int, key: str, *, deleted: bool = False) -> dict[str, Any]:
    return {
        "collection_id": "stripe:customer",
        "upstream_id": key,
        "upstream_updated_at": f"2024-01-01T00:00:00.{i:06d}Z",
        "data": None if deleted else {"i": i},
        "deleted": deleted,
    }


def test_totals_add_up_what_each_committed_batch_did() -> None:
    records: list[Any] = [rec(i, f"k{i}") for i in range(6)]
    records += [
        rec(6, "k0"),  # a newer version of k0: upserted again
        rec(7, "k1", deleted=True),  # a delete
        {"collection_id": "stripe:customer", "upstream_id": "bad"},  # a dead letter
        rec(9, "k9"),
    ]
    sink = InMemorySink()
    results: list[ApplyResult] = []
    totals = Totals()
    loop = SyncLoop(
        lambda: InMemorySource(records, limit=3),
        sink,
        mode="backfill",
        stop=threading.Event(),
        batch_max_records=3,  # one full page per batch
        on_batch=results.append,
        totals=totals,
    )
    assert loop.run() is True
    assert totals is loop.totals
    # Pages of 3, 3, 3 and 1 records, then the empty page (committed with the last one).
    assert (totals.received, totals.pages) == (10, 5)
    assert (totals.upserted, totals.deleted, totals.skipped, totals.dead_lettered) == (8, 1, 0, 1)
    for name in ("received", "upserted", "deleted", "skipped", "dead_lettered", "pages"):
        assert getattr(totals, name) == sum(getattr(r, name) for r in results), name
    assert sink.rows[("stripe:customer", "k1")].deleted
    assert len(sink.dead_letters) == 1 and loop.state.cursor == "10"


def test_an_older_version_than_the_stored_one_is_counted_as_skipped() -> None:
    sink = InMemorySink()
    loop = SyncLoop(
        # The old version comes inside a later page (one mis-stamped record, not a rewind).
        lambda: InMemorySource([rec(5, "k"), rec(5, "a"), rec(6, "x"), rec(2, "k")], limit=2),
        sink,
        mode="backfill",
        stop=threading.Event(),
        batch_max_records=2,
    )
    assert loop.run() is True
    assert (loop.totals.upserted, loop.totals.skipped) == (3, 1)
    assert sink.stamp(("stripe:customer", "k")).microsecond == 5
