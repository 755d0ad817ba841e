"""The API client over real sockets, against our simulator."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.helpers import TOKEN
from worker.api import SequinClient
from worker.errors import ApiUnavailable, RequestRejected, TokenRejected
from worker.simulator import FaultConfig, Simulator

pytestmark = pytest.mark.sim(seed=3, records=1200)


def client(sim: Simulator, **kw: Any) -> SequinClient:
    kw.setdefault("backoff_initial", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return SequinClient(sim.base_url, kw.pop("token", TOKEN), **kw)


def drain(c: SequinClient) -> tuple[list[dict[str, Any]], str]:
    records: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = c.fetch_page(cursor)
        records.extend(page.records)
        cursor = page.cursor
        if not page.is_full:
            return records, cursor


def test_drains_the_stream_in_order(sim: Simulator) -> None:
    records, cursor = drain(client(sim, page_size=500))
    assert len(records) == 1200
    stamps = [r["upstream_updated_at"] for r in records]
    assert stamps == sorted(stamps)
    # Caught up: an empty page hands back the same cursor.
    again = client(sim).fetch_page(cursor)
    assert again.records == [] and again.cursor == cursor


def test_filters_are_passed_through(sim: Simulator) -> None:
    records, _ = drain(client(sim, filters={"provider": "stripe", "sync_id": None}))
    assert records and all(r["collection_id"].startswith("stripe:") for r in records)
    assert len(records) == sim.record_count(provider="stripe")


def test_rejected_token_stops_at_once_with_a_clear_message(sim: Simulator) -> None:
    c = client(sim, token="wrong-token-value")
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(TokenRejected) as err:
        c.fetch_page(None)
    assert time.monotonic() - started < 2
    assert not [e for e in logs if e["event"] == "api_retry"]  # no retry
    assert "rejected the token" in str(err.value) and "SEQUIN_API_TOKEN" in str(err.value)
    assert "wrong-token-value" not in str(err.value)


def test_other_4xx_stops_with_the_server_message(sim: Simulator) -> None:
    with pytest.raises(RequestRejected) as err:
        client(sim).fetch_page("definitely-not-a-cursor")
    assert "HTTP 400" in str(err.value) and "cursor" in str(err.value).lower()


def test_retry_after_is_honoured(sim: Simulator) -> None:
    sim.faults = FaultConfig(rate_429=1.0, retry_after=0.4, retry_after_http_date_share=0.0)
    c = client(sim)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(c.fetch_page(None)))
    t.start()
    while len(sim.request_log) < 2:
        time.sleep(0.01)
    sim.faults = FaultConfig()
    t.join(10)
    assert result and result[0].records
    log = sim.request_log
    for prev, nxt in itertools.pairwise(log):
        if prev.retry_after is not None:
            assert nxt.time >= prev.time + prev.retry_after


@pytest.mark.parametrize(
    "faults",
    [
        FaultConfig(rate_5xx=0.5, html_share=1.0, seed=1),
        FaultConfig(rate_drop=0.5, seed=2),
        FaultConfig(rate_truncate=0.5, seed=3),
        FaultConfig(rate_429=0.5, retry_after=0.01, seed=4),
    ],
    ids=["5xx-html", "drop", "truncate", "429"],
)
def test_transient_faults_are_retried_and_logged(sim: Simulator, faults: FaultConfig) -> None:
    sim.faults = faults
    with capture_logs() as logs:
        records, _ = drain(client(sim, page_size=100))
    assert len(records) == 1200
    retries = [e for e in logs if e["event"] == "api_retry"]
    assert retries, "expected at least one retry"
    assert all(e["reason"] and e["attempt"] >= 1 for e in retries)
    assert TOKEN not in repr(logs)


def test_retry_budget_runs_out(sim: Simulator) -> None:
    sim.faults = FaultConfig(rate_5xx=1.0)
    with pytest.raises(ApiUnavailable, match="3 attempts") as err:
        client(sim, max_retries=2).fetch_page(None)
    assert "HTTP 5" in str(err.value)
    deadline = time.monotonic() + 2  # the server logs a request after answering it
    while len(sim.request_log) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sim.request_log) == 3


def test_stop_interrupts_a_retry_wait(sim: Simulator) -> None:
    from worker.errors import Stopped

    sim.faults = FaultConfig(rate_5xx=1.0)
    stop = threading.Event()
    c = client(sim, backoff_initial=30, backoff_max=30, stop=stop)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Stopped):
        c.fetch_page(None)
    assert time.monotonic() - started < 5


def test_timeout_is_retried(sim: Simulator) -> None:
    sim.faults = FaultConfig(latency=0.5)
    c = client(sim, read_timeout=0.1, max_retries=1)
    with capture_logs() as logs, pytest.raises(ApiUnavailable, match="timeout"):
        c.fetch_page(None)
    assert [e["reason"] for e in logs if e["event"] == "api_retry"] == ["timeout"]


def test_dead_letters_keep_the_text_from_the_wire(sim: Simulator) -> None:
    from worker.records import parse_page

    fragment = '{"collection_id": "stripe:customer",   "upstream_id": 7, "n": 1.50}'
    sim.append_raw(fragment)
    c = client(sim, page_size=500)
    cursor = None
    while True:
        page = c.fetch_page(cursor)
        parsed = parse_page(
            page.records, cursor=page.cursor, after_cursor=cursor, raw_texts=page.raw_texts
        )
        if parsed.dead_letters:
            break
        cursor = page.cursor
    assert [d.raw for d in parsed.dead_letters] == [fragment]


# --------------------------------------------------------------------------- never stuck


@pytest.mark.parametrize(
    "faults",
    [
        FaultConfig(rate_trickle=1.0, trickle_bytes=1, trickle_interval=0.05),
        FaultConfig(rate_silent=1.0),
        FaultConfig(rate_silent=1.0, silent_before_headers=True),
    ],
    ids=["trickle", "silent-after-headers", "silent"],
)
def test_a_request_ends_at_its_deadline_whatever_the_server_does(
    sim: Simulator, faults: FaultConfig
) -> None:
    """A trickle (a byte every 50 ms) never trips the per-read timeout; the total deadline
    still ends each attempt, which is retried as a timeout."""
    sim.faults = faults
    c = client(sim, read_timeout=0.4, request_timeout=0.6, max_retries=1)
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(ApiUnavailable, match="timeout"):
        c.fetch_page(None)
    assert time.monotonic() - started < 5
    reasons = [e["reason"] for e in logs if e["event"] == "api_retry"]
    assert len(reasons) == 1 and reasons[0].startswith("timeout")
    if faults.rate_trickle:
        assert "SEQUIN_REQUEST_TIMEOUT" in reasons[0]  # the per-read timeout never fired
    assert not [t for t in threading.enumerate() if t.name == "sequin-request-deadline"]


def test_abort_ends_a_request_in_flight_and_every_later_one(sim: Simulator) -> None:
    from worker.errors import Stopped

    sim.faults = FaultConfig(rate_silent=1.0)
    c = client(sim, read_timeout=30, request_timeout=30)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            c.fetch_page(None)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=fetch)
    t.start()
    deadline = time.monotonic() + 5
    while not sim.request_log and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.request_log, "the request never arrived"
    started = time.monotonic()
    c.abort()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - started < 2
    assert len(errors) == 1 and isinstance(errors[0], Stopped)
    with pytest.raises(Stopped):
        c.fetch_page(None)
    assert len(sim.request_log) == 1


def test_a_retry_wait_beats_and_ends_on_abort(sim: Simulator) -> None:
    from worker.errors import Stopped

    sim.faults = FaultConfig(rate_5xx=1.0)
    beats: list[float] = []
    c = client(sim, backoff_initial=30, backoff_max=30, on_wait=lambda: beats.append(1.0))
    threading.Timer(0.5, c.abort).start()
    started = time.monotonic()
    with pytest.raises(Stopped):
        c.fetch_page(None)
    assert time.monotonic() - started < 3
    assert len(beats) >= 3  # a documented backoff is a live worker


@pytest.mark.parametrize("token", [TOKEN + "\n", "sk-a\rb", "sk-\u2019"])
def test_a_request_that_cannot_be_sent_is_not_retried(sim: Simulator, token: str) -> None:
    """requests refuses such header values before sending; no retry can change that."""
    from worker.errors import InvalidRequest

    c = client(sim, token=token)
    with capture_logs() as logs, pytest.raises(InvalidRequest) as err:
        c.fetch_page(None)
    assert not [e for e in logs if e["event"] == "api_retry"]
    assert "SEQUIN_API_TOKEN" in str(err.value)
    assert token.strip() not in str(err.value) + repr(logs)
    assert sim.request_log == []
