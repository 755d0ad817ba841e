"""The sync loop driven by the in-memory fakes of :mod:`worker.testing` (no sockets, no DB)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any

import pytest

from tests.helpers import DROP, record
from worker.errors import (
    CursorConflict,
    DatabaseRefused,
    DatabaseUnavailable,
    ProtocolViolation,
    StoreFailure,
    StoreUnavailable,
    TokenRejected,
)
from worker.model import ApplyResult, Batch, Page
from worker.paging import next_step, poll_delay
from worker.sync import SyncLoop
from worker.testing import InMemorySink, InMemorySource


def rec(i: int, key: str | None = None) -> dict[str, Any]:
    """Record ``i`` of a stream (key ``k<i>`` unless given), in stream order."""
    return record(
        key or f"k{i}",
        f"2024-01-01T00:00:00.{i:06d}Z",
        collection_id="stripe:customer",
        data={"i": i},
        sync_id=DROP,
        created_at=DROP,
    )


def make_loop(
    source: InMemorySource, sink: InMemorySink, *, mode: str = "backfill", **kw: Any
) -> SyncLoop:
    kw.setdefault("stop", threading.Event())
    return SyncLoop(lambda: source, sink, mode=mode, **kw)  # type: ignore[arg-type]


class RecordedWaits(threading.Event):
    """A stop event that is never set and whose waits return at once, recording each timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


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
    source = InMemorySource([rec(i) for i in range(95)], limit=10, log=log)
    sink = InMemorySink()
    assert make_loop(source, sink).run() is True
    assert len(sink.rows) == 95
    assert sink.cursor == "95"
    # Each batch starts where the previous one ended: no gap, no overlap.
    for (_, end), (start, _) in zip(
        [(b[0], b[1]) for b in sink.batches], [(b[0], b[1]) for b in sink.batches[1:]], strict=False
    ):
        assert start == end


def test_group_commit_takes_pages_already_waiting_up_to_the_limit() -> None:
    source = InMemorySource([rec(i) for i in range(100)], limit=10, log=[])
    sink = InMemorySink()
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
    source = InMemorySource([rec(i) for i in range(30)], limit=10, log=log)
    sink = InMemorySink()
    sink.cursor = "20"
    make_loop(source, sink).run()
    assert log[0] == "20"
    assert sorted(int(k[1][1:]) for k in sink.rows) == list(range(20, 30))


def test_lost_database_reconnects_and_resumes_from_what_committed() -> None:
    log: list[str | None] = []
    source = InMemorySource([rec(i) for i in range(50)], limit=10, log=log)
    sink = InMemorySink()
    sink.fail_next = [StoreUnavailable("gone")]
    loop = make_loop(source, sink, batch_max_records=10, max_db_retries=3)
    assert loop.run() is True
    assert sink.connects == 2
    assert sink.cursor == "50" and len(sink.rows) == 50
    # The pages fetched before the failure are applied again, not fetched again.
    assert log.count(None) == 1
    # At most the page in flight when the session ended is fetched twice.
    assert len(log) - len(set(log)) <= 1, log


def test_cursor_conflict_restarts_from_the_stored_cursor() -> None:
    source = InMemorySource([rec(i) for i in range(20)], limit=10, log=[])
    sink = InMemorySink()
    sink.fail_next = [CursorConflict("someone else")]
    assert make_loop(source, sink).run() is True
    assert sink.cursor == "20"


def test_api_errors_surface_to_the_caller() -> None:
    source = InMemorySource([rec(0)], limit=10, log=[])
    source.fail_with = TokenRejected(401, "bad token")
    with pytest.raises(TokenRejected):
        make_loop(source, InMemorySink()).run()


def test_run_mode_polls_after_caught_up_and_stops_on_request() -> None:
    log: list[str | None] = []
    records = [rec(i) for i in range(5)]
    source = InMemorySource(records, limit=10, log=log)
    sink = InMemorySink()
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
    source = InMemorySource([], limit=10, log=[])
    sink = InMemorySink()
    sink.cursor = "0"
    make_loop(source, sink).run()
    assert sink.batches == []
    # From the start of an empty stream, the first cursor the API hands out is stored.
    sink.cursor = None
    make_loop(source, sink).run()
    assert sink.batches == [(None, "0", 1)]


# -- database failures: class, action, budget (worker.failures) ----------------------------


def failure(cls: str, message: str = "boom", sqlstate: str | None = None) -> StoreFailure:
    return StoreFailure(message, failure_class=cls, sqlstate=sqlstate)  # type: ignore[arg-type]


class FlakySink(InMemorySink):
    """Raises ``fail(batch)``'s exception (if any) instead of applying; records attempts."""

    def __init__(self, fail: Any) -> None:
        super().__init__()
        self.fail = fail
        self.attempts: list[tuple[str | None, int]] = []

    def apply(self, batch: Batch) -> ApplyResult:
        self.attempts.append((batch.after_cursor, len(batch.pages)))
        exc = self.fail(batch, len(self.attempts))
        if exc is not None:
            raise exc
        return super().apply(batch)


def test_a_batch_that_always_fails_spends_the_budget_across_reconnects() -> None:
    """Before: every reconnect reset the count, so backfill retried for ever at the first
    backoff step and never exited 6."""
    log: list[str | None] = []
    source = InMemorySource([rec(i) for i in range(30)], limit=10, log=log)
    for cls in ("connection_lost", "transient", "resource"):
        sink = FlakySink(lambda b, n, cls=cls: failure(cls))
        failures: list[tuple[str, float]] = []
        loop = make_loop(
            source,
            sink,
            max_db_retries=3,
            db_backoff=0.001,
            on_failure=lambda c, s, seen=failures: seen.append((c, s)),
        )
        with pytest.raises(DatabaseUnavailable, match="4 attempts"):
            loop.run()
        assert sink.connects == 4, cls  # reconnected each time, the count carried on
        assert [c for c, _ in failures] == [cls] * 4
        assert [s for _, s in failures] == sorted(s for _, s in failures)  # failing for longer
        assert sink.cursor is None


def test_the_backoff_grows_across_reconnects() -> None:
    sink = FlakySink(lambda b, n: failure("connection_lost"))
    stop = RecordedWaits()
    loop = make_loop(InMemorySource([rec(0)], limit=10, log=[]), sink, max_db_retries=4, stop=stop)
    waits = stop.waits
    with pytest.raises(DatabaseUnavailable):
        loop.run()
    # Exponential with jitter in [0.5, 1]: each step's range sits above the previous one's.
    assert [round(w / 0.5) for w in waits] != [1, 1, 1, 1]
    assert waits[3] > waits[0] and 2.0 <= waits[3] <= 4.0


def test_a_permanent_failure_stops_at_once_with_what_to_fix() -> None:
    sink = FlakySink(
        lambda b, n: failure("permanent", "permission denied for table records", "42501")
    )
    loop = make_loop(InMemorySource([rec(0)], limit=10, log=[]), sink, max_db_retries=None)
    with pytest.raises(DatabaseRefused, match=r"permission denied.*grant"):
        loop.run()
    assert len(sink.attempts) == 1


def test_held_pages_are_applied_again_and_a_resource_failure_halves_the_batch() -> None:
    log: list[str | None] = []
    source = InMemorySource([rec(i) for i in range(80)], limit=10, log=log)

    def fail(batch: Batch, attempt: int) -> BaseException | None:
        if attempt == 1:
            time.sleep(0.3)  # the prefetcher fills its queue meanwhile
            return failure("connection_lost")
        if len(batch.pages) > 1:
            return failure("resource", "canceling statement due to statement timeout", "57014")
        return None

    sink = FlakySink(fail)
    loop = make_loop(source, sink, prefetch_pages=8, db_backoff=0.001)
    assert loop.run() is True
    assert sink.cursor == "80" and len(sink.rows) == 80
    sizes = [n for _, n in sink.attempts]
    assert sizes[1] > 2, sizes  # the held pages, grouped again
    halving = sizes[1 : sizes.index(1, 1) + 1]
    assert all(b == max(1, a // 2) for a, b in itertools.pairwise(halving)), sizes
    # The held pages were not fetched again (at most the one in flight at the failure).
    assert log.count(None) == 1 and len(log) - len(set(log)) <= 1, log


def test_pages_of_a_commit_whose_acknowledgement_was_lost_are_not_applied_twice() -> None:
    log: list[str | None] = []
    source = InMemorySource([rec(i) for i in range(40)], limit=10, log=log)
    sink = InMemorySink()
    real_apply = sink.apply
    calls = []

    def apply(batch: Batch) -> ApplyResult:
        calls.append(batch.after_cursor)
        if len(calls) == 1:
            time.sleep(0.2)
            real_apply(batch)  # it commits, then the connection drops before the answer
            raise StoreUnavailable("server closed the connection unexpectedly")
        return real_apply(batch)

    sink.apply = apply  # type: ignore[method-assign]
    assert make_loop(source, sink, db_backoff=0.001).run() is True
    assert sink.cursor == "40" and len(sink.rows) == 40
    starts = [b[0] for b in sink.batches]
    assert len(starts) == len(set(starts))  # no batch applied twice
    assert log.count(None) == 1 and len(log) - len(set(log)) <= 1, log


def test_a_commit_ends_the_failure_and_the_budget_starts_again() -> None:
    # Two failures before each commit with a budget of two: never exhausted.
    source = InMemorySource([rec(i) for i in range(30)], limit=10, log=[])
    sink = FlakySink(lambda b, n: failure("transient") if n % 3 != 0 else None)
    loop = make_loop(source, sink, max_db_retries=2, db_backoff=0.001, batch_max_records=10)
    assert loop.run() is True
    assert sink.cursor == "30"
    assert loop.state.failing_since is None and loop.failures.budget.failures == 0


def test_a_failure_while_stopping_is_not_counted() -> None:
    stop = threading.Event()
    failures: list[str] = []

    def fail(batch: Batch, attempt: int) -> BaseException:
        stop.set()  # e.g. the statement cancelled by the shutdown
        return failure("resource", "canceling statement due to user request", "57014")

    sink = FlakySink(fail)
    loop = SyncLoop(
        lambda: InMemorySource([rec(0)], limit=10, log=[]),
        sink,
        mode="run",
        stop=stop,
        on_failure=lambda c, s: failures.append(c),
    )
    assert loop.run() is False
    assert failures == [] and loop.failures.budget.failures == 0


def test_pages_held_through_repeated_failures_stay_bounded() -> None:
    source = InMemorySource([rec(i) for i in range(500)], limit=10, log=[])

    def fail(batch: Batch, attempt: int) -> BaseException | None:
        time.sleep(0.02)  # the prefetcher of each session fetches meanwhile
        return failure("transient")

    sink = FlakySink(fail)
    loop = make_loop(source, sink, prefetch_pages=3, max_db_retries=8, db_backoff=0.001)
    with pytest.raises(DatabaseUnavailable):
        loop.run()
    first = sink.attempts[0][1]
    assert all(n == first for _, n in sink.attempts)  # the same pages each time, not more
    assert len(loop._held) <= first + 3  # and at most a prefetch queue's worth behind them


# --------------------------------------------------------------------------- never stuck


class ShortPages(InMemorySource):
    """Every page holds at most ``limit - 3`` records though more follow (allowed by the API
    document: only an empty page means there is no more)."""

    def fetch_page(self, after_cursor: str | None) -> Page:
        page = super().fetch_page(after_cursor)
        if len(page.records) > self.limit - 3:
            start = int(after_cursor) if after_cursor else 0
            page.records = page.records[: self.limit - 3]
            page.cursor = str(start + len(page.records))
        return page


def test_a_short_page_mid_stream_is_not_the_end_of_a_backfill() -> None:
    log: list[str | None] = []
    source = ShortPages([rec(i) for i in range(95)], limit=10, log=log)
    sink = InMemorySink()
    assert make_loop(source, sink).run() is True
    assert len(sink.rows) == 95 and sink.cursor == "95"
    assert log[-1] == "95"  # ended by the empty page


def test_run_polls_again_at_once_after_a_short_page_and_waits_after_an_empty_one() -> None:
    log: list[str | None] = []
    source = ShortPages([rec(i) for i in range(95)], limit=10, log=log)
    sink = InMemorySink()
    loop = make_loop(source, sink, mode="run", poll_interval=30)
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while sink.cursor != "95" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.cursor == "95"  # no poll interval between the short pages
        time.sleep(0.3)
        assert log.count("95") == 1  # the empty page: now it waits
    finally:
        loop._stop.set()
        t.join(5)
    assert not t.is_alive()


class Replay(InMemorySource):
    """A well-behaved stream until page ``at``, which comes back with ``page``'s fields."""

    def __init__(self, records: list[dict[str, Any]], at: int, bad: dict[str, Any]) -> None:
        super().__init__(records, limit=10, log=[])
        self.at = at
        self.bad = bad

    def fetch_page(self, after_cursor: str | None) -> Page:
        page = super().fetch_page(after_cursor)
        if len(self.log) == self.at:
            for name, value in self.bad.items():
                setattr(page, name, value)
        return page


@pytest.mark.parametrize(
    "bad",
    [
        {"cursor": "10"},  # a cycle: back to the cursor of page 1
        {"cursor": None},  # a cycle: back to where the session started (set below)
        {"records": [rec(15)], "cursor": "31"},  # a rewind under a fresh cursor
    ],
    ids=["cycle", "cycle-to-start", "rewind"],
)
def test_a_page_going_back_stops_the_loop_before_it_is_applied(bad: dict[str, Any]) -> None:
    records = [rec(i) for i in range(60)]
    sink = InMemorySink()
    sink.cursor = "0"
    if bad["cursor"] is None:
        bad = {"cursor": "0"}
    source = Replay(records, at=4, bad=bad)
    with pytest.raises(ProtocolViolation, match=r"cursor it had already given|went back"):
        make_loop(source, sink, batch_max_records=10).run()
    assert sink.cursor == "30"  # pages 1-3 applied, page 4 not
    assert len(sink.rows) == 30


def test_a_cursor_outside_the_recent_window_is_followed() -> None:
    from worker.paging import Paginator
    from worker.records import parse_page

    p = Paginator(None, memory=2)
    for i, cursor in enumerate(["a", "b", "c", "a"]):
        page = Page(p.cursor, [rec(i)], cursor, limit=1)
        parsed = parse_page(page.records, cursor=cursor, after_cursor=page.after_cursor)
        assert p.advance(page, parsed) == "more"
    assert p.cursor == "a"


class Hung(InMemorySource):
    """Fetches block until aborted (a fetch no deadline ended)."""

    def __init__(self) -> None:
        super().__init__([], limit=10, log=[])
        self.released = threading.Event()

    def fetch_page(self, after_cursor: str | None) -> Page:
        self.log.append(after_cursor)
        self.released.wait()
        raise TokenRejected(401, "aborted")

    def abort(self) -> None:
        self.released.set()


def test_a_hung_fetch_lets_the_heartbeat_go_stale_and_halting_ends_it() -> None:
    source = Hung()
    loop = make_loop(source, InMemorySink(), mode="run")
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        time.sleep(1.5)
        assert source.log == [None]
        assert time.monotonic() - loop.state.heartbeat > 1.0  # stuck shows as stuck
    finally:
        loop._stop.set()
        t.join(5)
    assert not t.is_alive()
    assert not [x for x in threading.enumerate() if x.name == "prefetch"]


def test_a_poll_wait_keeps_the_heartbeat_fresh() -> None:
    source = InMemorySource([rec(i) for i in range(5)], limit=10, log=[])
    loop = make_loop(source, InMemorySink(), mode="run", poll_interval=3)
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        ages = []
        for _ in range(10):
            time.sleep(0.15)
            ages.append(time.monotonic() - loop.state.heartbeat)
        assert max(ages) < 0.6
        assert source.log == [None, "5"]  # one wait in progress, no busy polling
    finally:
        loop._stop.set()
        t.join(5)


def test_one_mis_stamped_record_inside_a_page_is_not_a_rewind() -> None:
    """Only where a page starts tells its position; a single record with an older stamp
    further on is a bad record (the store's newer-wins guard handles it), not a rewind."""
    records = [rec(i) for i in range(30)]
    records[15] = rec(1, key="stale-stamp")
    sink = InMemorySink()
    assert make_loop(InMemorySource(records, limit=10, log=[]), sink).run() is True
    assert sink.cursor == "30" and len(sink.rows) == 30
