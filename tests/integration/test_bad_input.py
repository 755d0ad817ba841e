"""Bad input, end to end: from the wire through the client, the record rules and Postgres.

unit/test_records.py proves the rules on Python values and test_store.py the SQL on parsed
pages; here every case travels the whole way (HTTP body -> decode -> validate -> COPY ->
jsonb), with good records on both sides of the bad one, and each test checks the same three
things:

* the good records land (the table equals the stream's expected state);
* each bad record is in ``dead_letters`` verbatim (``json.loads(raw)`` is what was sent),
  with its reason, and the page it came from can be fetched again from ``after_cursor``;
* the stored cursor is never ahead of the data: it is the end of the stream only when all of
  it is applied, and ``records_applied`` counts exactly the records that became rows.

The cases that run the installed command (``python -m worker backfill``) are in
e2e/test_bad_input.py.
"""

from __future__ import annotations

import json
import random
import string
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import requests
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from tests import helpers
from tests.conftest import fetch_rows
from tests.helpers import (
    DROP,
    TOKEN,
    assert_table_matches,
    cursor_row,
    record,
)
from worker.service import Outcome
from worker.simulator import Simulator

Key = tuple[str, str]
PAGE = 50
T0 = datetime(2030, 1, 1, tzinfo=UTC)


# 200 base records, so the bad ones arrive on a later page (with an after_cursor).
pytestmark = pytest.mark.sim(seed=101, records=200, record_size=200)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def backfill(sim: Simulator, db: str, **over: object) -> Outcome:
    over.setdefault("SEQUIN_PAGE_SIZE", PAGE)
    outcome = helpers.backfill(sim, db, **over)
    assert outcome.caught_up
    return outcome


def spec_record(uid: str, seconds: float, **over: Any) -> dict[str, Any]:
    """A record shaped like the API document's example; ``DROP`` removes a field."""
    fields: dict[str, Any] = {
        "sync_id": "e6bd2ca5-36aa-4fce-9730-5543509a7747",
        "collection_id": "stripe:customer",
        "data": {"id": uid, "n": seconds},
        "created_at": at(seconds),
    }
    return record(**({"upstream_id": uid, "upstream_updated_at": at(seconds)} | fields | over))


def dead_letters(db: str) -> list[dict[str, Any]]:
    with psycopg.connect(db) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT consumer, after_cursor, collection_id, upstream_id, reason, raw "
            "FROM sequin.dead_letters ORDER BY id"
        )
        return cur.fetchall()


def fetch(sim: Simulator, after_cursor: str | None, limit: int = PAGE) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if after_cursor is not None:
        params["after_cursor"] = after_cursor
    resp = requests.get(
        sim.records_url,
        params=params,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = json.loads(resp.content)  # stdlib: keeps lone surrogates
    return body


def assert_cursor_at_the_end(sim: Simulator, db: str, *, rows: int) -> None:
    """The stored cursor is the end of the stream (nothing after it) and exactly ``rows``
    records were counted as applied."""
    row = cursor_row(db)
    body = fetch(sim, row.cursor)
    assert body["records"] == [] and body["cursor"] == row.cursor
    assert row.records_applied == rows


def assert_dead_lettered(db: str, sim: Simulator, sent: list[Any], reasons: list[str]) -> None:
    """Exactly ``sent`` are dead-lettered, verbatim and in stream order, each with its reason,
    and each can be fetched again from its ``after_cursor``."""
    dead = dead_letters(db)
    assert [json.loads(d["raw"]) for d in dead] == sent
    for d, reason in zip(dead, reasons, strict=True):
        assert reason in d["reason"], (reason, d["reason"])
        assert d["consumer"] == "default"
        assert d["after_cursor"] is not None  # the bad records are not on the first page
        assert json.loads(d["raw"]) in fetch(sim, d["after_cursor"])["records"]
    assert cursor_row(db).dead_letters == len(sent)


# --------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"collection_id": DROP}, "collection_id is missing"),
        ({"upstream_id": DROP}, "upstream_id is missing"),
        ({"upstream_updated_at": DROP}, "upstream_updated_at is missing"),
        ({"deleted": DROP}, "deleted is missing"),
        ({"data": DROP}, "data is missing"),
        ({"data": None}, "data is null on a record that is not deleted"),
        ({"data": ["a", "list"]}, "data must be an object"),
        ({"deleted": "false"}, "deleted must be a boolean"),
        ({"upstream_id": 42}, "upstream_id must be a string"),
        ({"collection_id": ""}, "collection_id is empty"),
    ],
    ids=[
        "no-collection_id",
        "no-upstream_id",
        "no-upstream_updated_at",
        "no-deleted",
        "no-data",
        "null-data",
        "list-data",
        "string-deleted",
        "number-upstream_id",
        "empty-collection_id",
    ],
)
def test_a_record_missing_or_mistyping_a_required_field_is_dead_lettered(
    sim: Simulator, db: str, override: dict[str, Any], reason: str
) -> None:
    # An earlier good version of the same key: the bad newer one must not touch its row.
    sim.append([sim.make_record("stripe:customer", "k-1", at(0), {"v": "good"})])
    bad = spec_record("k-1", 1, **override)
    sim.append_raw(json.dumps(bad), sort_ts=at(1))
    sim.append([sim.make_record("hubspot:deal", "after", at(2), {"v": "after"})])

    outcome = backfill(sim, db)

    assert outcome.totals.dead_lettered == 1
    assert_table_matches(db, sim.expected_state())  # the raw fragment is not in it
    assert fetch_rows(db)[("stripe:customer", "k-1")]["data"] == {"v": "good"}
    assert_dead_lettered(db, sim, [bad], [reason])
    d = dead_letters(db)[0]
    coll, uid = bad.get("collection_id"), bad.get("upstream_id")
    assert d["collection_id"] == (coll if isinstance(coll, str) else None)
    assert d["upstream_id"] == (uid if isinstance(uid, str) else None)
    assert_cursor_at_the_end(sim, db, rows=sim.record_count())


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_a_delete_without_data_is_a_tombstone_not_a_dead_letter(
    sim: Simulator, db: str, mode: str
) -> None:
    key = ("stripe:customer", "gone-1")
    sim.append([sim.make_record(*key, at(0), {"v": 1})])
    sim.append_raw(json.dumps(spec_record("gone-1", 1, data=DROP, deleted=True)), sort_ts=at(1))

    backfill(sim, db, SEQUIN_DELETE_MODE=mode)

    assert dead_letters(db) == []
    rows = fetch_rows(db)
    if mode == "hard":
        assert key not in rows
    else:
        assert rows[key]["deleted"] is True and rows[key]["data"] is None
        assert rows[key]["upstream_updated_at"] == T0 + timedelta(seconds=1)
    assert_cursor_at_the_end(sim, db, rows=sim.record_count() + 1)


# --------------------------------------------------------------------------- timestamps


def test_timestamps_in_other_valid_iso_forms_land_as_rows(sim: Simulator, db: str) -> None:
    forms = {
        "offset": ("2030-06-01T14:00:00+02:00", datetime(2030, 6, 1, 12, 0, tzinfo=UTC)),
        "no-fraction": ("2030-06-01T12:00:01Z", datetime(2030, 6, 1, 12, 0, 1, tzinfo=UTC)),
        "nanoseconds": (
            "2030-06-01T12:00:02.123456789Z",
            datetime(2030, 6, 1, 12, 0, 2, 123456, tzinfo=UTC),
        ),
        "negative-offset": (
            "2030-06-01T06:30:03.5-05:30",
            datetime(2030, 6, 1, 12, 0, 3, 500000, tzinfo=UTC),
        ),
        "space": ("2030-06-01 12:00:04+00:00", datetime(2030, 6, 1, 12, 0, 4, tzinfo=UTC)),
    }
    sim.append(
        [
            sim.make_record("salesforce:task", uid, text, {"form": uid}, created_at=text)
            for uid, (text, _) in forms.items()
        ]
    )

    backfill(sim, db)

    assert dead_letters(db) == []
    rows = fetch_rows(db)
    for uid, (_, instant) in forms.items():
        row = rows[("salesforce:task", uid)]
        assert row["upstream_updated_at"] == instant, uid
        assert row["created_at"] == instant, uid
    assert_table_matches(db, sim.expected_state())
    assert_cursor_at_the_end(sim, db, rows=sim.record_count())


def test_versions_are_ordered_by_instant_not_by_text_across_offsets(db: str) -> None:
    """One key, three versions whose text order is not their time order; one record per
    transaction, so the database's guard decides (not the in-batch dedup)."""
    with Simulator(token=TOKEN, seed=102, records=10) as sim:
        key = ("hubspot:deal", "tz-1")
        versions = [
            "2030-06-02T01:00:00+02:00",  # 23:00Z on the 1st
            "2030-06-01T23:30:00Z",  # later, though it sorts first as text
            "2030-06-01T23:45:00-01:00",  # 00:45Z on the 2nd: the newest
        ]
        sim.append([sim.make_record(*key, text, {"v": i}) for i, text in enumerate(versions)])

        backfill(sim, db, SEQUIN_PAGE_SIZE=1, SEQUIN_BATCH_MAX_RECORDS=1)

        row = fetch_rows(db)[key]
        assert row["data"] == {"v": 2}
        assert row["upstream_updated_at"] == datetime(2030, 6, 2, 0, 45, tzinfo=UTC)
        assert_table_matches(db, sim.expected_state())


def test_invalid_timestamps_are_dead_lettered(sim: Simulator, db: str) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"upstream_updated_at": "2030-06-01T12:00:00"}, "upstream_updated_at has no UTC offset"),
        ({"upstream_updated_at": "2030-02-30T00:00:00Z"}, "upstream_updated_at is not an ISO"),
        ({"upstream_updated_at": "2030-06-01"}, "upstream_updated_at is not an ISO"),
        ({"upstream_updated_at": "1780315200"}, "upstream_updated_at is not an ISO"),
        ({"upstream_updated_at": 1780315200}, "upstream_updated_at must be a string"),
        ({"upstream_updated_at": "2030-06-01T12:00:00+25:00"}, "upstream_updated_at is not"),
        ({"upstream_updated_at": "next tuesday"}, "upstream_updated_at is not an ISO"),
        ({"created_at": "2030-13-01T00:00:00Z"}, "created_at is not an ISO"),
    ]
    sent = []
    for i, (override, _) in enumerate(cases):
        sim.append([sim.make_record("stripe:customer", f"good-{i}", at(2 * i), {"i": i})])
        bad = spec_record(f"bad-ts-{i}", 2 * i + 1, **override)
        sim.append_raw(json.dumps(bad), sort_ts=at(2 * i + 1))
        sent.append(bad)

    outcome = backfill(sim, db)

    assert outcome.totals.dead_lettered == len(cases)
    assert_dead_lettered(db, sim, sent, [reason for _, reason in cases])
    rows = fetch_rows(db)
    assert not any(uid.startswith("bad-ts-") for _, uid in rows)
    assert_table_matches(db, sim.expected_state())
    assert_cursor_at_the_end(sim, db, rows=sim.record_count())


# --------------------------------------------------------------------------- data


def test_five_megabytes_of_data_land_as_one_row(sim: Simulator, db: str) -> None:
    rng = random.Random(5)
    blob = "".join(rng.choices(string.ascii_letters + string.digits + "äöü€😀", k=4_000_000))
    data = {
        "blob": blob,
        "items": [{"i": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(20_000)],
    }
    assert len(json.dumps(data, ensure_ascii=False).encode()) > 5_000_000
    key = ("salesforce:contact", "huge-1")
    sim.append([sim.make_record(*key, at(0), data)])
    sim.append([sim.make_record("stripe:customer", "after-huge", at(1), {"v": 1})])

    backfill(sim, db)

    assert dead_letters(db) == []
    assert fetch_rows(db)[key]["data"] == data
    assert_table_matches(db, sim.expected_state())
    assert_cursor_at_the_end(sim, db, rows=sim.record_count())


def test_nul_and_lone_surrogates_in_nested_keys_and_values(sim: Simulator, db: str) -> None:
    """Inside ``data`` (at any depth, in keys and values) NUL and lone surrogates become
    U+FFFD in the row and the original is dead-lettered; a valid surrogate pair and the six
    characters backslash-u-0-0-0-0 are ordinary text; in the key fields they make the record
    unstorable (dead letter only, and the dead letter's key columns stay NULL)."""
    hostile = (
        '{"sync_id": "e6bd2ca5-36aa-4fce-9730-5543509a7747", "collection_id": '
        '"salesforce:contact", "upstream_id": "hostile-1", "upstream_updated_at": '
        f'"{at(1)}", "deleted": false, "created_at": "{at(1)}", "data": '
        '{"outer": {"k\\u0000ey": ["v\\ud800al", {"\\udfff": "\\u0000"}, 7], "ok": "fine"}, '
        '"pair": "\\ud83d\\ude00", "\\ud83d": {"deep": [["\\u0000\\u0000"]]}}}'
    )
    clean = (
        '{"sync_id": null, "collection_id": "salesforce:contact", "upstream_id": "clean-1", '
        f'"upstream_updated_at": "{at(2)}", "deleted": false, "created_at": null, "data": '
        '{"pair": "\\ud83d\\ude00", "escaped": "\\\\u0000 is six characters"}}'
    )
    nul_key = json.dumps(spec_record("a\u0000b", 3))
    surrogate_collection = json.dumps(spec_record("s-1", 4, collection_id="stripe:\ud800"))
    for i, fragment in enumerate((hostile, clean, nul_key, surrogate_collection), start=1):
        sim.append_raw(fragment, sort_ts=at(i))
    sim.append([sim.make_record("stripe:customer", "after", at(5), {"v": 1})])

    backfill(sim, db)

    rows = fetch_rows(db)
    assert rows[("salesforce:contact", "hostile-1")]["data"] == {
        "outer": {"k\ufffdey": ["v\ufffdal", {"\ufffd": "\ufffd"}, 7], "ok": "fine"},
        "pair": "\U0001f600",
        "\ufffd": {"deep": [["\ufffd\ufffd"]]},
    }
    assert rows[("salesforce:contact", "clean-1")]["data"] == {
        "pair": "\U0001f600",
        "escaped": "\\u0000 is six characters",
    }
    assert not any(uid in ("a\ufffdb", "s-1") for _, uid in rows)
    sent = [json.loads(f) for f in (hostile, nul_key, surrogate_collection)]
    assert_dead_lettered(
        db,
        sim,
        sent,
        ["stored with U+FFFD", "upstream_id contains NUL", "collection_id contains NUL"],
    )
    keys = [(d["collection_id"], d["upstream_id"]) for d in dead_letters(db)]
    assert keys == [("salesforce:contact", "hostile-1"), ("stripe:customer", None), (None, "s-1")]
    expected = sim.expected_state()
    for key in (("salesforce:contact", "hostile-1"), ("salesforce:contact", "clean-1")):
        stamp = rows[key]["upstream_updated_at"]
        assert isinstance(stamp, datetime)
        expected[key] = {
            "deleted": False,
            "upstream_updated_at": stamp.isoformat(),
            "data": rows[key]["data"],
            "sync_id": rows[key]["sync_id"],
        }
    assert_table_matches(db, expected)
    # hostile-1 and clean-1 became rows; the other two did not.
    assert_cursor_at_the_end(sim, db, rows=sim.record_count() + 2)


@pytest.mark.parametrize(
    "number",
    ["123456789012345678901234", "-98765432109876543210", "18446744073709551616"],
)
def test_integers_beyond_64_bits_land_exactly(sim: Simulator, db: str, number: str) -> None:
    """A JSON integer too big for 64 bits is valid JSON and fits jsonb: it must land as that
    integer, not as the nearest double (the worker's own docs say big integers survive)."""
    fragment = json.dumps(spec_record("big-1", 1, data={"n": 0, "note": "big"})).replace(
        '"n": 0', f'"n": {number}'
    )
    sim.append_raw(fragment, sort_ts=at(1))
    sim.append([sim.make_record("stripe:customer", "after", at(2), {"v": 1})])

    backfill(sim, db)

    assert dead_letters(db) == []
    assert fetch_rows(db)[("stripe:customer", "big-1")]["data"] == {"n": int(number), "note": "big"}
    assert_cursor_at_the_end(sim, db, rows=sim.record_count() + 1)


def test_a_number_beyond_double_range_is_not_silently_nulled(sim: Simulator, db: str) -> None:
    """``1e400`` is valid JSON (and valid jsonb). Stored exactly or dead-lettered are both
    acceptable; turning it into ``null`` without a trace is not ("nothing a page held is
    silently dropped")."""
    fragment = json.dumps(spec_record("huge-number", 1, data={"x": 0})).replace(
        '"x": 0', '"x": 1e400'
    )
    sim.append_raw(fragment, sort_ts=at(1))

    backfill(sim, db)

    row = fetch_rows(db).get(("stripe:customer", "huge-number"))
    dead = [json.loads(d["raw"]) for d in dead_letters(db)]
    # Postgres prints 1e400 as the integer it is; compare as exact numbers.
    kept_exactly = row is not None and Decimal(row["data"]["x"]) == Decimal("1e400")
    assert kept_exactly or json.loads(fragment) in dead, (
        f"stored as {row and row['data']!r} and not dead-lettered"
    )


# --------------------------------------------------------------------------- the API itself


def page_body(records: list[dict[str, Any]], cursor: str) -> bytes:
    return json.dumps({"records": records, "cursor": cursor}).encode()


Answer = Callable[[str | None, int], tuple[int, bytes]]


class ScriptedAPI:
    """A stand-in for ``GET /v1/records`` that answers from a script.

    ``answer(after_cursor, n)`` gives the status and JSON body of the ``n``-th request (from
    0). Every request's query parameters are kept in :attr:`requests`.
    """

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                params = {k: v[-1] for k, v in query.items()}
                with api._lock:
                    n = len(api.requests)
                    api.requests.append(params)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    status, body = 401, b'{"error": {"message": "bad token"}}'
                else:
                    status, body = api.answer(params.get("after_cursor"), n)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> ScriptedAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


GOOD = [
    spec_record("shape-1", 1),
    spec_record("shape-2", 2, collection_id="hubspot:deal", deleted=True, data=None),
]


@pytest.mark.parametrize(
    "body",
    [
        b'{"records": "x", "cursor": "c1"}',
        page_body(GOOD, "c1").replace(b', "cursor": "c1"', b""),
        page_body(GOOD, "c1").replace(b'"c1"', b"7"),
        b'{"records": {"0": {}}, "cursor": "c1"}',
        b'{"data": [], "next": null}',
        b"[]",
        b'"records"',
        b"null",
    ],
    ids=[
        "records-a-string",
        "no-cursor",
        "cursor-a-number",
        "records-an-object",
        "other-keys",
        "array",
        "string",
        "null",
    ],
)
def test_a_page_of_valid_json_in_the_wrong_shape_is_retried_then_applied(
    sim: Simulator, db: str, body: bytes
) -> None:
    """Nothing of a wrong-shaped page is applied (not even records next to a missing cursor);
    the same position is asked again and the good answer is applied once."""

    def answer(after: str | None, n: int) -> tuple[int, bytes]:
        if n == 0:
            return 200, body
        return 200, page_body([] if after == "c1" else GOOD, "c1")

    with ScriptedAPI(answer) as api, capture_logs() as logs:
        outcome = backfill(sim, db, SEQUIN_BASE_URL=api.base_url, SEQUIN_PAGE_SIZE=10)

    # The same position again, then (a short page is not the end) the empty page after c1.
    assert [r.get("after_cursor") for r in api.requests] == [None, None, "c1"]
    retries = [e for e in logs if e["event"] == "api_retry"]
    assert len(retries) == 1 and "bad body" in retries[0]["reason"]
    assert outcome.totals.received == 2
    rows = fetch_rows(db)
    assert rows.keys() == {("stripe:customer", "shape-1"), ("hubspot:deal", "shape-2")}
    assert rows[("hubspot:deal", "shape-2")]["deleted"] is True
    assert dead_letters(db) == []
    row = cursor_row(db)
    assert row.cursor == "c1" and row.records_applied == 2


# --------------------------------------------------------------------------- poison records


def _squeeze(text: str) -> str:
    return "".join(text.split())


# --------------------------------------------------------------------------- every item alone

# Numbers a double cannot hold (more significant digits than 17, or below its smallest), none
# with a run of 16 digits (which used to send a whole page to the exact decoder).
EXACT_NUMBERS = ["12345678.12345678901", "1.5e-400", "-1234567.1234567890123", "4.9e-325"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"records": [GOOD], "records": [BAD], "cursor": "c1"}',
        b'{"records": [BAD], "rec\\u006frds": [GOOD], "cursor": "c1"}',
        b'{"records": [GOOD], "cursor": "c0", "cursor": "c1"}',
    ],
    ids=["two-records-keys", "records-spelled-twice", "two-cursor-keys"],
)
def test_a_body_with_two_records_or_cursor_keys_is_refused_as_ambiguous(
    sim: Simulator, db: str, body: bytes
) -> None:
    """Which of two ``records`` arrays (or cursors) is meant cannot be known; "last key wins"
    would drop the other array's records without a trace. The body is a bad body: retried, and
    nothing of it applied or dead-lettered; the good answer that follows is applied once."""
    good, bad = json.dumps(GOOD[0]).encode(), b'{"upstream_id": "ambiguous-bad"}'
    first = body.replace(b"GOOD", good).replace(b"BAD", bad)

    def answer(after: str | None, n: int) -> tuple[int, bytes]:
        if n == 0:
            return 200, first
        return 200, page_body([] if after == "c1" else GOOD, "c1")

    with ScriptedAPI(answer) as api, capture_logs() as logs:
        backfill(sim, db, SEQUIN_BASE_URL=api.base_url, SEQUIN_PAGE_SIZE=10)

    retries = [e["reason"] for e in logs if e["event"] == "api_retry"]
    assert len(retries) == 1 and "ambiguous" in retries[0], retries
    # The same position again, then (a short page is not the end) the empty page after c1.
    assert [r.get("after_cursor") for r in api.requests] == [None, None, "c1"]
    assert dead_letters(db) == []
    row = cursor_row(db)
    assert row.cursor == "c1" and row.records_applied == 2


def test_invalid_utf8_inside_data_on_an_otherwise_clean_page_is_dead_lettered(
    sim: Simulator, db: str
) -> None:
    """The fast path passes ``data`` through undecoded, so Postgres is the one to find its
    invalid UTF-8: the batch is applied again row by row and only that record is
    dead-lettered, with its bytes escaped."""
    from worker.simulator import HOSTILE_ITEMS

    sim.append([sim.make_record("stripe:customer", "before", at(1), {"v": 1})])
    (item,) = sim.append_hostile(["invalid-utf8-data"], sort_ts=at(2))
    sim.append([sim.make_record("hubspot:deal", "after", at(3), {"v": 3})])

    backfill(sim, db)

    assert_table_matches(db, sim.expected_state())
    dead = dead_letters(db)
    assert [d["raw"] for d in dead] == [item.decode("utf-8", "backslashreplace")]
    assert item == HOSTILE_ITEMS["invalid-utf8-data"]
    assert dead[0]["upstream_id"] == "hostile-utf8-data"
    assert_cursor_at_the_end(sim, db, rows=sim.record_count())
