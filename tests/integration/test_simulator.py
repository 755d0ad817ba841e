"""Tests of worker.simulator, over real sockets with `requests`.

The simulator is the yardstick the worker is measured against, so these tests
check it against the API document: auth, parameters, paging (especially across
equal timestamps), filters, the always-present cursor, run-time appends, the
expected-state oracle, determinism, the injected faults and the request log.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import email.utils
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from worker.simulator import (
    HOSTILE_ITEMS,
    FaultConfig,
    RequestLogEntry,
    Simulator,
    format_ts,
    parse_ts,
)

TOKEN = "dev-token"
FIELDS = [
    "sync_id",
    "collection_id",
    "upstream_id",
    "upstream_updated_at",
    "data",
    "deleted",
    "created_at",
]
TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {TOKEN}"
        yield s


@pytest.fixture(scope="module")
def shared() -> Iterator[Simulator]:
    """A read-only simulator shared by the tests that do not change the stream."""
    with Simulator(records=1200, seed=11) as sim:
        yield sim


def get(session: requests.Session, sim: Simulator, **params: Any) -> requests.Response:
    return session.get(sim.records_url, params=params, timeout=10)


def page(session: requests.Session, sim: Simulator, **params: Any) -> dict[str, Any]:
    response = get(session, sim, **params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def drain(
    session: requests.Session,
    sim: Simulator,
    limit: int = 500,
    cursor: str | None = None,
    filters: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], str]:
    """Page to the end: (all records, the pages, the final cursor)."""
    pages: list[list[dict[str, Any]]] = []
    while True:
        params: dict[str, Any] = {"limit": limit, **(filters or {})}
        if cursor is not None:
            params["after_cursor"] = cursor
        body = page(session, sim, **params)
        assert isinstance(body["cursor"], str)
        if not body["records"]:
            if cursor is not None:
                assert body["cursor"] == cursor
            return [r for p in pages for r in p], pages, body["cursor"]
        assert len(body["records"]) <= limit
        pages.append(body["records"])
        cursor = body["cursor"]


def last_versions(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    state: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        state[(record["collection_id"], record["upstream_id"])] = record
    return state


def assert_error(response: requests.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code


def cursor_for(ts: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{parse_ts(ts)}:{seq}".encode()).rstrip(b"=").decode()


# --------------------------------------------------------------------------- auth, routing


def test_requires_bearer_token(shared: Simulator) -> None:
    url = shared.records_url
    assert_error(requests.get(url, timeout=5), 401, "unauthorized")
    assert_error(requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=5), 401)
    assert_error(requests.get(url, headers={"Authorization": f"Basic {TOKEN}"}, timeout=5), 401)
    assert_error(requests.get(url, headers={"Authorization": "Bearer"}, timeout=5), 401)
    response = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}"):
        assert requests.get(url, headers={"Authorization": header}, timeout=5).status_code == 200


def test_other_paths_and_methods(shared: Simulator, session: requests.Session) -> None:
    for path in ("/", "/v1/record", "/v1/records/", "/v2/records"):
        assert_error(session.get(shared.base_url + path, timeout=5), 404, "not_found")
    assert_error(session.post(shared.records_url, json={}, timeout=5), 405)


def test_keep_alive_and_content_length(session: requests.Session) -> None:
    with Simulator(records=900, seed=2) as sim:
        records, _, _ = drain(session, sim, limit=100)
        assert len(records) == 900
        assert sim.connection_count == 1
        response = get(session, sim, limit=3)
        assert int(response.headers["Content-Length"]) == len(response.content)
        assert sim.connection_count == 1


# --------------------------------------------------------------------------- parameters


def test_limit_default_and_maximum(shared: Simulator, session: requests.Session) -> None:
    assert len(page(session, shared)["records"]) == 100
    assert len(page(session, shared, limit=1)["records"]) == 1
    assert len(page(session, shared, limit=500)["records"]) == 500
    assert len(page(session, shared, limit="0042")["records"]) == 42


@pytest.mark.parametrize("limit", ["0", "501", "-1", "abc", "1.5", "", " 5", "1e2", "99999999999"])
def test_limit_out_of_bounds_is_400(
    shared: Simulator, session: requests.Session, limit: str
) -> None:
    response = get(session, shared, limit=limit)
    assert_error(response, 400, "invalid_parameter")
    assert "limit" in response.json()["error"]["message"]


@pytest.mark.parametrize("name", ["sync_id", "provider", "collection"])
def test_empty_filter_is_400(shared: Simulator, session: requests.Session, name: str) -> None:
    assert_error(get(session, shared, **{name: ""}), 400, "invalid_parameter")


def test_unknown_parameters_are_ignored(shared: Simulator, session: requests.Session) -> None:
    assert page(session, shared, limit=5, colour="blue") == page(session, shared, limit=5)


# --------------------------------------------------------------------------- the records


def test_record_shape_and_dataset_statistics(shared: Simulator, session: requests.Session) -> None:
    records, _, _ = drain(session, shared)
    assert len(records) == 1200 == shared.record_count()
    sync_ids = shared.sync_ids
    assert set(sync_ids) == {"stripe", "salesforce", "hubspot"}
    assert len(set(sync_ids.values())) == 3
    top_level_types: set[type] = set()
    for record in records:
        assert list(record) == FIELDS
        uuid.UUID(record["sync_id"])
        provider = record["collection_id"].split(":")[0]
        assert record["sync_id"] == sync_ids[provider]
        assert record["collection_id"] in shared.collections
        assert isinstance(record["upstream_id"], str)
        assert record["upstream_id"]
        assert TS_RE.fullmatch(record["upstream_updated_at"])
        assert TS_RE.fullmatch(record["created_at"])
        assert record["created_at"] <= record["upstream_updated_at"]
        assert isinstance(record["deleted"], bool)
        assert record["data"] is None or isinstance(record["data"], dict)
        if record["data"] is None:
            assert record["deleted"]
        else:
            top_level_types.update(type(v) for v in record["data"].values())
    assert top_level_types >= {str, int, float, bool, type(None), dict, list}
    assert {r["collection_id"] for r in records} == set(shared.collections)

    stamps = [r["upstream_updated_at"] for r in records]
    assert stamps == sorted(stamps)
    assert stamps[0].startswith("2024-01-01T00:00:")
    ties = sum(a == b for a, b in itertools.pairwise(stamps)) / len(stamps)
    assert 0.05 < ties < 0.2

    deleted = [r for r in records if r["deleted"]]
    assert 0.02 < len(deleted) / len(records) < 0.09
    assert any(r["data"] is None for r in deleted)
    assert any(r["data"] is not None for r in deleted)

    keys = {(r["collection_id"], r["upstream_id"]) for r in records}
    assert len(keys) == 1200 // 5  # churn: every key is updated about five times

    sizes = [len(orjson.dumps(r["data"])) for r in records if r["data"] is not None]
    assert 600 < sum(sizes) / len(sizes) < 1000


def test_record_size_and_keys_options(session: requests.Session) -> None:
    with Simulator(records=300, keys=7, record_size=3000, seed=5) as sim:
        records, _, _ = drain(session, sim)
    assert len({(r["collection_id"], r["upstream_id"]) for r in records}) == 7
    sizes = [len(orjson.dumps(r["data"])) for r in records if r["data"] is not None]
    assert 2400 < sum(sizes) / len(sizes) < 3600


def test_deterministic_for_a_seed(session: requests.Session) -> None:
    with Simulator(records=400, seed=42) as a, Simulator(records=400, seed=42) as b:
        for params in ({"limit": 500}, {"limit": 7}, {"limit": 50, "provider": "stripe"}):
            assert get(session, a, **params).content == get(session, b, **params).content
        assert a.sync_ids == b.sync_ids
        assert a.expected_state() == b.expected_state()
        mine = drain(session, a)[0]
    with Simulator(records=400, seed=43) as c:
        other = drain(session, c)[0]
    assert len(other) == len(mine)
    assert other != mine


def test_format_and_parse_ts() -> None:
    us = parse_ts("2024-11-10T18:39:00.070453Z")
    assert format_ts(us) == "2024-11-10T18:39:00.070453Z"
    assert parse_ts("2024-11-10T19:39:00.070453+01:00") == us
    assert format_ts(0) == "1970-01-01T00:00:00.000000Z"
    with pytest.raises(ValueError, match="offset"):
        parse_ts("2024-11-10T18:39:00")


# --------------------------------------------------------------------------- pagination


@pytest.mark.parametrize("limit", [1, 7, 100, 499])
def test_every_record_exactly_once_at_any_page_size(
    shared: Simulator, session: requests.Session, limit: int
) -> None:
    reference, _, _ = drain(session, shared, limit=500)
    records, pages, _ = drain(session, shared, limit=limit)
    assert records == reference
    assert all(len(p) == limit for p in pages[:-1])
    # The boundaries that matter: the page ends inside a run of equal timestamps.
    inside_runs = sum(
        1
        for before, after in itertools.pairwise(pages)
        if before[-1]["upstream_updated_at"] == after[0]["upstream_updated_at"]
    )
    if limit < 100:
        assert inside_runs >= 3


def test_a_timestamp_run_longer_than_a_page(session: requests.Session) -> None:
    # Seed 58 has a bulk run of 701 records sharing one timestamp (82..782).
    with Simulator(records=1000, seed=58) as sim:
        records, pages, _ = drain(session, sim, limit=500)
        assert len(records) == 1000
        assert pages[0][-1]["upstream_updated_at"] == pages[1][0]["upstream_updated_at"]
        stamps = collections.Counter(r["upstream_updated_at"] for r in records)
        assert max(stamps.values()) > 500
        assert drain(session, sim, limit=33)[0] == records


def test_cursor_continues_after_its_position(shared: Simulator, session: requests.Session) -> None:
    everything, _, _ = drain(session, shared)
    first = page(session, shared, limit=250)
    second = page(session, shared, limit=250, after_cursor=first["cursor"])
    assert first["records"] + second["records"] == everything[:500]
    # A cursor is a position: sending it again gives the same page.
    assert page(session, shared, limit=250, after_cursor=first["cursor"]) == second


def test_empty_page_returns_the_cursor_sent(shared: Simulator, session: requests.Session) -> None:
    _, _, cursor = drain(session, shared)
    for _ in range(2):
        body = page(session, shared, after_cursor=cursor)
        assert body == {"records": [], "cursor": cursor}


def test_empty_stream_start_cursor_round_trips(session: requests.Session) -> None:
    with Simulator(records=0) as sim:
        body = page(session, sim)
        assert body["records"] == []
        start = body["cursor"]
        assert page(session, sim, after_cursor=start) == {"records": [], "cursor": start}
        sim.append([sim.make_record("stripe:customer", "cus_1", "2024-05-01T00:00:00Z", {"a": 1})])
        body = page(session, sim, after_cursor=start)
        assert [r["upstream_id"] for r in body["records"]] == ["cus_1"]
        assert body["cursor"] != start
        assert page(session, sim, after_cursor=body["cursor"])["records"] == []


def test_filtered_to_nothing_returns_start_cursor(
    shared: Simulator, session: requests.Session
) -> None:
    body = page(session, shared, provider="zendesk")
    assert body["records"] == []
    follow_up = page(session, shared, after_cursor=body["cursor"])
    assert follow_up["records"] == page(session, shared)["records"]


def test_invalid_cursors_are_400(shared: Simulator, session: requests.Session) -> None:
    records = page(session, shared, limit=3)["records"]
    good = page(session, shared, limit=3)["cursor"]
    with Simulator(records=50, seed=99) as other:
        foreign = page(session, other, limit=3)["cursor"]
    bad = [
        "garbage!",
        "",
        good + "=",  # not canonical
        base64.urlsafe_b64encode(b"foo").decode(),
        cursor_for(records[2]["upstream_updated_at"], 5),  # no record at that position
        cursor_for(records[2]["upstream_updated_at"], 10**9),
        foreign,
        "x" * 500,
    ]
    for cursor in bad:
        response = get(session, shared, after_cursor=cursor)
        assert_error(response, 400, "invalid_cursor")
        assert response.json()["error"]["message"] == "invalid cursor"
    assert page(session, shared, after_cursor=good)["records"]


# --------------------------------------------------------------------------- filters


def test_filters_match_client_side_filtering(shared: Simulator, session: requests.Session) -> None:
    everything, _, _ = drain(session, shared)
    stripe_sync = shared.sync_ids["stripe"]
    cases: list[dict[str, str]] = [
        {"sync_id": stripe_sync},
        {"provider": "salesforce"},
        {"collection": "hubspot:deal"},
        {"provider": "stripe", "collection": "stripe:customer"},
        {"sync_id": stripe_sync, "collection": "stripe:subscription"},
        {"sync_id": stripe_sync, "provider": "stripe", "collection": "stripe:customer"},
        {"provider": "stripe", "collection": "salesforce:task"},  # contradictory: nothing
        {"sync_id": str(uuid.uuid4())},
    ]
    for filters in cases:
        expected = [
            r
            for r in everything
            if r["sync_id"] == filters.get("sync_id", r["sync_id"])
            and r["collection_id"].split(":")[0]
            == filters.get("provider", r["collection_id"]).split(":")[0]
            and r["collection_id"] == filters.get("collection", r["collection_id"])
        ]
        records, _, _ = drain(session, shared, limit=37, filters=filters)
        assert records == expected, filters
        assert shared.record_count(
            filters.get("sync_id"), filters.get("provider"), filters.get("collection")
        ) == len(expected)


def test_filtered_cursor_is_a_stream_position(shared: Simulator, session: requests.Session) -> None:
    everything, _, _ = drain(session, shared)
    body = page(session, shared, limit=20, collection="salesforce:contact")
    last = body["records"][-1]
    index = everything.index(last)
    unfiltered = page(session, shared, limit=50, after_cursor=body["cursor"])
    assert unfiltered["records"] == everything[index + 1 : index + 51]


# --------------------------------------------------------------------------- run-time additions


def test_append_is_placed_by_timestamp(session: requests.Session) -> None:
    with Simulator(records=60, seed=3) as sim:
        before, _, _ = drain(session, sim)
        consumer = page(session, sim, limit=30)  # a consumer that has read 30 records
        ts = before[10]["upstream_updated_at"]
        same_ts = [i for i, r in enumerate(before) if r["upstream_updated_at"] == ts]
        sim.append([sim.make_record("stripe:customer", "cus_new", ts, {"name": "Zoë"})])

        after, _, _ = drain(session, sim, limit=9)
        assert len(after) == 61
        # After every record that already had that timestamp.
        assert after[same_ts[-1] + 1]["upstream_id"] == "cus_new"
        assert after[: same_ts[-1] + 1] == before[: same_ts[-1] + 1]
        # Older than the consumer's cursor: invisible to it.
        rest, _, _ = drain(session, sim, cursor=consumer["cursor"])
        assert rest == before[30:]

        late = sim.make_record("hubspot:deal", "77", "2030-01-01T00:00:00.5Z", None, deleted=True)
        sim.append([late])
        rest, _, _ = drain(session, sim, cursor=consumer["cursor"])
        assert rest[-1]["upstream_id"] == "77"
        assert rest[-1]["upstream_updated_at"] == "2030-01-01T00:00:00.5Z"  # served as given
        assert sim.record_count() == 62


def test_append_rejects_malformed_records_atomically(session: requests.Session) -> None:
    with Simulator(records=5) as sim:
        good = sim.make_record("stripe:customer", "cus_ok", "2024-01-01T00:00:01Z", {})
        broken = [
            {**good, "deleted": "no"},
            {k: v for k, v in good.items() if k != "sync_id"},
            {**good, "upstream_updated_at": "yesterday"},
            {**good, "data": [1, 2]},
            {**good, "data": {"s": "\ud800"}},  # not encodable: use append_raw
        ]
        for record in broken:
            with pytest.raises(ValueError, match="well-formed"):
                sim.append([good, record])
        assert sim.record_count() == 5
        assert len(drain(session, sim)[0]) == 5


def test_append_raw_fragments_are_emitted_verbatim(session: requests.Session) -> None:
    with Simulator(records=20, seed=4) as sim:
        records, _, _ = drain(session, sim)
        ts = records[5]["upstream_updated_at"]
        fragments = [
            '{"sync_id": 7, "collection_id": "stripe:customer"}',
            "42",
            '{"collection_id":"salesforce:task","upstream_id":"t1","data":{"s":"a\\u0000b"}}',
            '{"collection_id":"salesforce:task","data":{"s":"\\ud800"}}',
        ]
        for fragment in fragments:
            sim.append_raw(fragment, sort_ts=ts)
        sim.append_raw('{"tail": true}')

        response = get(session, sim, limit=500)
        for fragment in [*fragments, '{"tail": true}']:
            assert fragment.encode() in response.content
        items = json.loads(response.content)["records"]  # stdlib: accepts lone surrogates
        assert len(items) == 25
        # After every record that already had that timestamp, in insertion order.
        at = 1 + max(i for i, r in enumerate(records) if r["upstream_updated_at"] == ts)
        assert items[at : at + 4] == [json.loads(f) for f in fragments]
        assert [i for i in items if i not in records] == items[at : at + 4] + items[-1:]
        assert items[-1] == {"tail": True}

        # Filters see the fields a fragment carries; fragments without them pass.
        tasks = json.loads(get(session, sim, limit=500, collection="salesforce:task").content)
        raw_in_tasks = [
            i for i in tasks["records"] if not isinstance(i, dict) or "sync_id" not in i
        ]
        assert len(raw_in_tasks) == 4  # 42, the two task fragments, the tail

        assert sim.record_count() == 20
        assert sim.record_count(include_raw=True) == 25
        assert len(sim.expected_state()) == len(last_versions(records))


def test_append_raw_invalid_utf8(session: requests.Session) -> None:
    with Simulator(records=0) as sim:
        sim.append_raw('{"data": {"s": "\ud800"}}')  # a real lone surrogate: bad UTF-8
        response = get(session, sim)
        assert b'"\xed\xa0\x80"' in response.content
        with pytest.raises(UnicodeDecodeError):
            response.content.decode("utf-8")


# -- hostile items


def test_append_hostile_emits_each_item_verbatim_in_one_page(session: requests.Session) -> None:
    with Simulator(records=3, seed=5) as sim:
        sent = sim.append_hostile()
        assert sent == list(HOSTILE_ITEMS.values())
        body = get(session, sim, limit=500).content
        # In order, each exactly as listed, separated only by the array's commas.
        assert b",".join(sent) + b"]" in body
        assert sim.record_count(include_raw=True) == 3 + len(HOSTILE_ITEMS)
        assert sim.append_hostile(["null", "nan"]) == [HOSTILE_ITEMS["null"], HOSTILE_ITEMS["nan"]]
        with pytest.raises(ValueError, match="unknown hostile items"):
            sim.append_hostile(["no-such-kind"])


# -- end hostile items


# --------------------------------------------------------------------------- expected state


def test_expected_state_is_the_last_version_per_key(session: requests.Session) -> None:
    with Simulator(records=800, seed=8) as sim:
        base, _, _ = drain(session, sim)
        victim = base[-1]
        key = (victim["collection_id"], victim["upstream_id"])
        update = sim.make_record(*key, "2031-01-01T00:00:00.000000Z", None, deleted=True)
        stale = sim.make_record(
            base[0]["collection_id"], base[0]["upstream_id"], "2020-01-01T00:00:00.000000Z", {}
        )
        sim.append([update, stale])
        sim.append_raw('{"collection_id": "stripe:customer", "upstream_id": "raw"}')

        records, _, _ = drain(session, sim, limit=97)
        state = sim.expected_state()
        assert state == last_versions([r for r in records if r.get("upstream_id") != "raw"])
        assert state[key]["deleted"] is True
        assert state[key]["upstream_updated_at"] == "2031-01-01T00:00:00.000000Z"
        assert any(r["deleted"] for r in state.values())
        assert any(not r["deleted"] for r in state.values())

        for filters in ({"provider": "stripe"}, {"collection": "hubspot:deal"}):
            filtered, _, _ = drain(session, sim, filters=filters)
            filtered = [r for r in filtered if r.get("upstream_id") != "raw"]
            assert sim.expected_state(**filters) == last_versions(filtered)
        sync = sim.sync_ids["salesforce"]
        assert all(r["sync_id"] == sync for r in sim.expected_state(sync_id=sync).values())


# --------------------------------------------------------------------------- faults


def test_fault_config_validation() -> None:
    with pytest.raises(ValueError, match="rate_429"):
        FaultConfig(rate_429=1.5)
    with pytest.raises(ValueError, match="latency"):
        FaultConfig(latency=-1)


def test_fault_429_with_seconds(session: requests.Session) -> None:
    faults = FaultConfig(rate_429=1.0, retry_after=2, retry_after_http_date_share=0.0)
    with Simulator(records=10, faults=faults) as sim:
        response = get(session, sim, limit=5)
        assert_error(response, 429, "rate_limited")
        assert response.headers["Retry-After"] == "2"
        sim.faults.retry_after = 0.25
        assert get(session, sim).headers["Retry-After"] == "0.25"
        first, second = sim.request_log
        assert first.status == 429
        assert first.params == {"limit": "5"}
        assert first.retry_after is not None
        assert 2.0 <= first.retry_after < 2.2
        assert second.retry_after is not None
        assert 0.25 <= second.retry_after < 0.45


def test_fault_429_with_http_date(session: requests.Session) -> None:
    faults = FaultConfig(rate_429=1.0, retry_after=1, retry_after_http_date_share=1.0)
    with Simulator(records=10, faults=faults) as sim:
        sent = time.time()
        response = get(session, sim)
        assert response.status_code == 429
        when = email.utils.parsedate_to_datetime(response.headers["Retry-After"])
        assert when.tzinfo is not None
        assert sent + 1 <= when.timestamp() <= sent + 2.1
        (entry,) = sim.request_log
        assert entry.retry_after is not None
        assert 1.0 <= entry.retry_after <= 2.1


def test_fault_5xx_statuses_and_bodies(session: requests.Session) -> None:
    with Simulator(records=10, faults=FaultConfig(rate_5xx=1.0, html_share=0.5, seed=1)) as sim:
        responses = [get(session, sim) for _ in range(40)]
    assert {r.status_code for r in responses} == {500, 502, 503, 504}
    html = [r for r in responses if r.headers["Content-Type"] == "text/html"]
    assert 5 < len(html) < 35
    assert all(r.text.startswith("<html>") for r in html)
    for r in responses:
        if r not in html:
            assert_error(r, r.status_code)


def test_fault_drop_closes_without_response(session: requests.Session) -> None:
    with Simulator(records=10, faults=FaultConfig(rate_drop=1.0)) as sim:
        with pytest.raises(requests.ConnectionError):
            get(session, sim)
        assert [e.status for e in sim.request_log] == ["drop"]


def test_fault_truncate_sends_half_the_body(session: requests.Session) -> None:
    with Simulator(records=50, faults=FaultConfig(rate_truncate=1.0)) as sim:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            get(session, sim, limit=50)
        host, port = sim.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            request = (
                f"GET /v1/records?limit=50 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
            )
            sock.sendall(request.encode() + b"\r\n\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert len(body) == length // 2
        assert [e.status for e in sim.request_log] == ["truncate", "truncate"]


def test_latency_is_added(session: requests.Session) -> None:
    with Simulator(records=10, faults=FaultConfig(latency=0.2)) as sim:
        started = time.monotonic()
        assert get(session, sim).status_code == 200
        assert time.monotonic() - started >= 0.2


def test_faults_switch_at_run_time_and_are_seeded(session: requests.Session) -> None:
    with Simulator(records=10) as sim:
        assert get(session, sim).status_code == 200
        sim.faults = FaultConfig(rate_5xx=1.0, html_share=0.0)
        assert get(session, sim).status_code >= 500
        sim.faults = FaultConfig()
        assert get(session, sim).status_code == 200

        def statuses() -> list[int | str]:
            sim.faults = FaultConfig(rate_429=0.3, rate_5xx=0.3, retry_after=0, seed=9)
            del sim.request_log[:]
            for _ in range(30):
                get(session, sim)
            return [e.status for e in sim.request_log]

        first = statuses()
        assert first == statuses()
        counts = collections.Counter(s if s in (200, 429) else "5xx" for s in first)
        assert set(counts) == {200, 429, "5xx"}


def test_request_log_proves_retry_after_was_honoured(session: requests.Session) -> None:
    faults = FaultConfig(rate_429=0.4, retry_after=0.1, retry_after_http_date_share=0.0, seed=3)
    with Simulator(records=300, faults=faults) as sim:

        def compliant_get(**params: Any) -> dict[str, Any]:
            while True:
                response = get(session, sim, **params)
                if response.status_code != 429:
                    assert response.status_code == 200
                    body: dict[str, Any] = response.json()
                    return body
                time.sleep(float(response.headers["Retry-After"]))

        cursor = None
        count = 0
        while True:
            body = compliant_get(limit=50, **({"after_cursor": cursor} if cursor else {}))
            if not body["records"]:
                break
            count += len(body["records"])
            cursor = body["cursor"]
        assert count == 300
        log = list(sim.request_log)
        assert all(isinstance(e, RequestLogEntry) for e in log)
        assert any(e.status == 429 for e in log)
        for before, after in itertools.pairwise(log):
            if before.retry_after is not None:
                assert after.time >= before.time + before.retry_after
        assert log[-1].params == {"limit": "50", "after_cursor": cursor}

        # An impatient client is caught by the same check.
        del sim.request_log[:]
        sim.faults = FaultConfig(rate_429=1.0, retry_after=5, retry_after_http_date_share=0.0)
        get(session, sim)
        get(session, sim)
        early, late = sim.request_log
        assert early.retry_after is not None
        assert late.time < early.time + early.retry_after


# --------------------------------------------------------------------------- live mode, lifecycle


def test_live_mode_appends_records_now(session: requests.Session) -> None:
    with Simulator(records=20, seed=6, append_rate=200.0) as sim:
        first, _, cursor = drain(session, sim)
        time.sleep(0.3)
        started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
        more, _, cursor = drain(session, sim, cursor=cursor)
        assert len(more) >= 20
        stamps = [r["upstream_updated_at"] for r in first + more]
        assert stamps == sorted(stamps)
        assert parse_ts(more[-1]["upstream_updated_at"]) >= started.timestamp() * 1e6
        assert all(list(r) == FIELDS for r in more)
        assert {r["collection_id"] for r in more} <= set(sim.collections)
    count = sim.record_count()
    time.sleep(0.1)
    assert sim.record_count() == count  # stopped with the server
    # Live records are part of the oracle: read the rest in-process and compare.
    rest: list[dict[str, Any]] = []
    while batch := orjson.loads(sim.page(cursor, 500)):
        if not batch["records"]:
            break
        rest += batch["records"]
        cursor = batch["cursor"]
    assert len(first + more + rest) == count
    assert sim.expected_state() == last_versions(first + more + rest)


def test_start_stop_lifecycle(session: requests.Session) -> None:
    sim = Simulator(records=10)
    with pytest.raises(RuntimeError):
        _ = sim.base_url
    sim.start()
    url = sim.records_url
    try:
        with pytest.raises(RuntimeError):
            sim.start()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", sim.base_url)
        assert get(session, sim).status_code == 200  # leaves a keep-alive connection open
    finally:
        started = time.monotonic()
        sim.stop()
        assert time.monotonic() - started < 2
    sim.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        session.get(url, timeout=2)
    with pytest.raises(ValueError, match="token"):
        Simulator(token="")


def test_concurrent_clients_see_the_same_stream() -> None:
    with Simulator(records=2000, seed=12) as sim:
        results: list[list[dict[str, Any]]] = []

        def worker() -> None:
            with requests.Session() as s:
                s.headers["Authorization"] = f"Bearer {TOKEN}"
                results.append(drain(s, sim, limit=113)[0])

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4
    assert all(r == results[0] for r in results)
    assert len(results[0]) == 2000


def test_large_dataset_is_lazy(session: requests.Session) -> None:
    started = time.monotonic()
    with Simulator(records=1_000_000, seed=1) as sim:
        body = page(session, sim, limit=500)
        again = page(session, sim, limit=500, after_cursor=body["cursor"])
        assert len(again["records"]) == 500
        assert sim.record_count() == 1_000_000
    assert time.monotonic() - started < 2


# --------------------------------------------------------------------------- CLI


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.simulator", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_until_signalled(sig: signal.Signals) -> None:
    proc = _run_cli("--port", "0", "--records", "12", "--token", "t0k", "--seed", "3")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        assert "t0k" in line
        url = match.group(0) + "/v1/records"
        response = requests.get(url, headers={"Authorization": "Bearer t0k"}, timeout=5)
        assert len(response.json()["records"]) == 12
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in stderr


def test_cli_token_from_environment_and_faults() -> None:
    args = ["--port", "0", "--records", "5", "--fault-429", "1", "--retry-after", "3"]
    proc = _run_cli(*args, env={"SEQUIN_API_TOKEN": "from-env"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "from-env" in line
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        response = requests.get(
            match.group(0) + "/v1/records", headers={"Authorization": "Bearer x"}, timeout=5
        )
        assert response.status_code == 429
        retry_after = response.headers["Retry-After"]
        assert retry_after == "3" or retry_after.endswith("GMT")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0


def test_cli_rejects_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.simulator", "--fault-5xx", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert "--fault-5xx" in result.stderr


# --------------------------------------------------------------------------- stalls and paging


def test_stall_and_paging_fault_validation() -> None:
    with pytest.raises(ValueError, match="rate_trickle"):
        FaultConfig(rate_trickle=2.0)
    with pytest.raises(ValueError, match="rate_short_page"):
        FaultConfig(rate_short_page=0.6, rate_cycle=0.6)
    with pytest.raises(ValueError, match="trickle_bytes"):
        FaultConfig(trickle_bytes=0)


@pytest.mark.parametrize("before_headers", [False, True])
def test_fault_silent_holds_the_answer(session: requests.Session, before_headers: bool) -> None:
    faults = FaultConfig(rate_silent=1.0, silent_before_headers=before_headers)
    with Simulator(records=10, faults=faults) as sim:
        started = time.monotonic()
        with pytest.raises((requests.ConnectionError, requests.Timeout)):
            session.get(sim.records_url, timeout=(5, 0.5)).content  # noqa: B018
        assert 0.5 <= time.monotonic() - started < 5
        assert [e.status for e in sim.request_log] == ["silent"]


def test_fault_trickle_sends_the_whole_body_slowly(session: requests.Session) -> None:
    faults = FaultConfig(rate_trickle=1.0, trickle_bytes=400, trickle_interval=0.02)
    with Simulator(records=5, faults=faults) as sim:
        expected = sim.page(None, 5)
        started = time.monotonic()
        response = get(session, sim, limit=5)
        assert response.content == expected
        assert time.monotonic() - started >= 0.02 * (len(expected) // 400)
        assert [e.status for e in sim.request_log] == ["trickle"]


def test_fault_short_page_cuts_full_pages_and_loses_nothing(session: requests.Session) -> None:
    with Simulator(records=300, seed=4, faults=FaultConfig(rate_short_page=1.0)) as sim:
        records, cursor = [], None
        while True:
            body = page(session, sim, limit=50, **({"after_cursor": cursor} if cursor else {}))
            if not body["records"]:
                break
            assert len(body["records"]) < 50
            records += body["records"]
            cursor = body["cursor"]
        assert len(records) == 300
        assert sim.request_log[0].status == "short_page"


@pytest.mark.parametrize("fault", ["cycle", "rewind"])
def test_fault_cycle_and_rewind_go_back(session: requests.Session, fault: str) -> None:
    faults = FaultConfig(**{f"rate_{fault}": 1.0})  # type: ignore[arg-type]
    with Simulator(records=300, seed=4, faults=faults) as sim:
        p1 = page(session, sim, limit=50)
        p2 = page(session, sim, limit=50, after_cursor=p1["cursor"])  # nothing earlier yet
        p3 = page(session, sim, limit=50, after_cursor=p2["cursor"])
        clean = json.loads(sim.page(p2["cursor"], 50))
        if fault == "cycle":
            assert p3["records"] == clean["records"] and p3["cursor"] == p1["cursor"]
        else:
            assert p3["records"] == p2["records"][:49]
            assert p3["cursor"] not in (p1["cursor"], p2["cursor"], clean["cursor"])
        assert [e.status for e in sim.request_log] == [200, 200, fault]


def test_cli_stall_and_paging_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.simulator", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    for flag in (
        "--fault-silent",
        "--silent-before-headers",
        "--fault-trickle",
        "--trickle-bytes",
        "--trickle-interval",
        "--fault-short-page",
        "--fault-cycle",
        "--fault-rewind",
    ):
        assert flag in result.stdout


def test_simulator_imports_nothing_of_the_worker() -> None:
    # Independence from the client is what makes agreement between them mean something:
    # the whole package (CLI included) loads without any other worker module, nor the
    # client's HTTP and database libraries.
    probe = (
        "import sys, worker.simulator\n"
        "bad = sorted(m for m in sys.modules if (m.startswith('worker.')"
        " and not m.startswith('worker.simulator')) or m.split('.')[0] in"
        " ('requests', 'psycopg', 'structlog', 'pydantic', 'pydantic_settings', 'msgspec'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert result.stdout.strip() == ""
