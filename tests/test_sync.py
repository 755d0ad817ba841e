"""The sync loop driven by in-memory fakes of the API and the store (no sockets, no DB)."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from worker.api import Page, TokenRejected
from worker.records import dedup
from worker.store import ApplyResult, Batch, CursorConflict, StoreUnavailable
from worker.sync import ProtocolViolation, SyncLoop, next_step, poll_delay


def rec(i: int, key: str | None = None) -> dict[str, Any]:
    return {
        "collection_id": "stripe:customer",
        "upstream_id": key or f"k{i}",
        "upstream_updated_at": f"2024-01-01T00:00:00.{i:06d}Z",
        "data": {"i": i},
        "deleted": False,
    }


class FakeSource:
    """A stream of ``n`` records; cursors are stream positions as strings."""

    def __init__(self, records: list[dict[str, Any]], limit: int, log: list[str | None]) -> None:
        self.records = records
        self.limit = limit
        self.log = log
        self.fail_with: BaseException | None = None

    def fetch_page(self, after_cursor: str | None) -> Page:
        self.log.append(after_cursor)
        if self.fail_with is not None:
            raise self.fail_with
        start = int(after_cursor) if after_cursor else 0
        chunk = self.records[start : start + self.limit]
        cursor = str(start + len(chunk)) if chunk else (after_cursor or "0")
        return Page(after_cursor=after_cursor, records=chunk, cursor=cursor, limit=self.limit)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeSink:
    def __init__(self) -> None:
        self.cursor: str | None = None
        self.rows: dict[tuple[str, str], int] = {}
        self.batches: list[tuple[str | None, str, int]] = []
        self.fail_next: list[BaseException] = []
        self.connects = 0

    def connect(self) -> None:
        self.connects += 1

    def open_consumer(self) -> str | None:
        return self.cursor

    def apply(self, batch: Batch) -> ApplyResult:
        if self.fail_next:
            raise self.fail_next.pop(0)
        if batch.after_cursor != self.cursor:
            raise CursorConflict("moved")
        for r in dedup(r for p in batch.pages for r in p.records):
            self.rows[r.key] = int(r.upstream_updated_at.microsecond)
        self.batches.append((batch.after_cursor, batch.cursor, len(batch.pages)))
        self.cursor = batch.cursor
        return ApplyResult(received=batch.received, pages=len(batch.pages), cursor=batch.cursor)

    def close(self) -> None:
        pass


def make_loop(source: FakeSource, sink: FakeSink, *, mode: str = "backfill", **kw: Any) -> SyncLoop:
    return SyncLoop(lambda: source, sink, mode=mode, stop=threading.Event(), **kw)  # type: ignore[arg-type]


def test_next_step_is_pure_pagination_logic() -> None:
    assert next_step(Page(None, [1, 2], "2", limit=2)) == "more"
    assert next_step(Page("2", [1], "3", limit=2)) == "more"  # short: more may follow
    assert next_step(Page("3", [], "3", limit=2)) == "caught_up"  # only empty means caught up
    with pytest.raises(ProtocolViolation):
        next_step(Page("3", [1], "3", limit=1))


def test_poll_delay_jitter_is_within_twenty_percent() -> None:
    rng = random.Random(1)
    delays = [poll_delay(10.0, rng) for _ in range(1000)]
    assert min(delays) >= 8.0 and max(delays) <= 12.0
    assert max(delays) - min(delays) > 3.0


def test_backfill_applies_everything_once_and_stops_when_caught_up() -> None:
    log: list[str | None] = []
    source = FakeSource([rec(i) for i in range(95)], limit=10, log=log)
    sink = FakeSink()
    assert make_loop(source, sink).run() is True
    assert len(sink.rows) == 95
    assert sink.cursor == "95"
    # Each batch starts where the previous one ended: no gap, no overlap.
    for (_, end), (start, _) in zip(
        [(b[0], b[1]) for b in sink.batches], [(b[0], b[1]) for b in sink.batches[1:]], strict=False
    ):
        assert start == end


def test_group_commit_takes_pages_already_waiting_up_to_the_limit() -> None:
    source = FakeSource([rec(i) for i in range(100)], limit=10, log=[])
    sink = FakeSink()
    real_apply = sink.apply

    def slow_apply(batch: Batch) -> ApplyResult:
        time.sleep(0.05)  # let the prefetcher fill the queue
        return real_apply(batch)

    sink.apply = slow_apply  # type: ignore[method-assign]
    make_loop(source, sink, batch_max_records=30, prefetch_pages=8).run()
    sizes = [b[2] for b in sink.batches]
    assert max(sizes) > 1, sizes  # grouped while behind
    assert all(s <= 3 for s in sizes), sizes  # never more than 30 records per batch
    assert sink.cursor == "100"


def test_resume_from_the_committed_cursor() -> None:
    log: list[str | None] = []
    source = FakeSource([rec(i) for i in range(30)], limit=10, log=log)
    sink = FakeSink()
    sink.cursor = "20"
    make_loop(source, sink).run()
    assert log[0] == "20"
    assert sorted(int(k[1][1:]) for k in sink.rows) == list(range(20, 30))


def test_lost_database_reconnects_and_resumes_from_what_committed() -> None:
    log: list[str | None] = []
    source = FakeSource([rec(i) for i in range(50)], limit=10, log=log)
    sink = FakeSink()
    sink.fail_next = [StoreUnavailable("gone")]
    loop = make_loop(source, sink, batch_max_records=10)
    loop._max_db_retries = 3
    assert loop.run() is True
    assert sink.connects == 2
    assert sink.cursor == "50" and len(sink.rows) == 50
    assert log.count(None) == 2  # the first page was fetched again after the reconnect


def test_cursor_conflict_restarts_from_the_stored_cursor() -> None:
    source = FakeSource([rec(i) for i in range(20)], limit=10, log=[])
    sink = FakeSink()
    sink.fail_next = [CursorConflict("someone else")]
    assert make_loop(source, sink).run() is True
    assert sink.cursor == "20"


def test_api_errors_surface_to_the_caller() -> None:
    source = FakeSource([rec(0)], limit=10, log=[])
    source.fail_with = TokenRejected(401, "bad token")
    with pytest.raises(TokenRejected):
        make_loop(source, FakeSink()).run()


def test_run_mode_polls_after_caught_up_and_stops_on_request() -> None:
    log: list[str | None] = []
    records = [rec(i) for i in range(5)]
    source = FakeSource(records, limit=10, log=log)
    sink = FakeSink()
    loop = make_loop(source, sink, mode="run", poll_interval=0.05)
    t = threading.Thread(target=loop.run)
    t.start()
    time.sleep(0.3)
    records.extend(rec(i) for i in range(5, 8))  # live records appear
    time.sleep(0.3)
    loop._stop.set()
    t.join(5)
    assert not t.is_alive()
    assert sink.cursor == "8"
    assert log.count("8") >= 1 and log.count("5") >= 2  # polled while caught up


def test_empty_page_with_same_cursor_commits_nothing() -> None:
    source = FakeSource([], limit=10, log=[])
    sink = FakeSink()
    sink.cursor = "0"
    make_loop(source, sink).run()
    assert sink.batches == []
    # From the start of an empty stream, the first cursor the API hands out is stored.
    sink.cursor = None
    make_loop(source, sink).run()
    assert sink.batches == [(None, "0", 1)]
