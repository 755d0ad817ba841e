"""The pure rules: validation, sanitising, dedup. No sockets, no database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import DROP as _DROP
from tests.helpers import record as rec
from worker.records import (
    REPLACEMENT,
    InvalidRecord,
    dedup,
    dumps_verbatim,
    parse_page,
    parse_timestamp,
    provider_of,
    sanitise,
    validate,
    versions_by_key,
)


def test_valid_record_from_the_spec() -> None:
    record, sanitised = validate(rec())
    assert not sanitised
    assert record.key == ("salesforce:task", "0018b000021BldZAAS")
    assert record.upstream_updated_at == datetime(2024, 11, 10, 18, 39, 0, 70453, tzinfo=UTC)
    assert json.loads(record.data_json or "") == {"activity_date": "2023-09-12", "n": 1}
    assert str(record.sync_id) == "70a313f8-7c94-43d4-8d0c-5659a52de5c4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-11-10T18:39:00Z", datetime(2024, 11, 10, 18, 39, tzinfo=UTC)),
        ("2024-11-10T18:39:00.5Z", datetime(2024, 11, 10, 18, 39, 0, 500000, tzinfo=UTC)),
        (
            "2024-11-10T20:39:00.123456+02:00",
            datetime(2024, 11, 10, 20, 39, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2024-11-10 18:39:00+00:00", datetime(2024, 11, 10, 18, 39, tzinfo=UTC)),
        ("2024-11-10T18:39:00.070453123Z", datetime(2024, 11, 10, 18, 39, 0, 70453, tzinfo=UTC)),
    ],
)
def test_timestamps_in_other_valid_iso_forms(text: str, expected: datetime) -> None:
    assert parse_timestamp(text, "t") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2024-13-10T18:39:00Z",
        "2024-11-10T25:00:00Z",
        "2024-11-10T18:39:00",
        "2024-11-10",
        "1731263940",
        "2024-11-10T18:39:00ZZ",
    ],
)
def test_invalid_timestamps(text: str) -> None:
    with pytest.raises(InvalidRecord):
        parse_timestamp(text, "t")


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"collection_id": _DROP}, "collection_id is missing"),
        ({"collection_id": 7}, "collection_id must be a string"),
        ({"collection_id": ""}, "collection_id is empty"),
        ({"upstream_id": _DROP}, "upstream_id is missing"),
        ({"upstream_id": 12345}, "upstream_id must be a string"),
        ({"upstream_updated_at": _DROP}, "upstream_updated_at is missing"),
        ({"upstream_updated_at": 1731263940}, "upstream_updated_at must be a string"),
        ({"upstream_updated_at": "not a date"}, "not an ISO 8601"),
        ({"deleted": _DROP}, "deleted is missing"),
        ({"deleted": "false"}, "deleted must be a boolean"),
        ({"deleted": 0}, "deleted must be a boolean"),
        ({"data": _DROP}, "data is missing"),
        ({"data": None}, "data is null"),
        ({"data": [1, 2]}, "data must be an object"),
        ({"data": "text"}, "data must be an object"),
        ({"sync_id": "not-a-uuid"}, "sync_id is not a UUID"),
        ({"sync_id": 5}, "sync_id must be a string"),
        ({"created_at": "later"}, "created_at is not an ISO 8601"),
        ({"upstream_id": "a\x00b"}, "upstream_id contains NUL"),
        ({"collection_id": "x:\ud800"}, "collection_id contains NUL or a lone surrogate"),
    ],
)
def test_invalid_records_name_the_reason(override: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidRecord, match=reason):
        validate(rec(**override))


@pytest.mark.parametrize("item", [None, 3, "x", [1], True])
def test_non_object_record(item: Any) -> None:
    with pytest.raises(InvalidRecord, match="record must be an object"):
        validate(item)


def test_deleted_record_may_carry_null_or_no_data() -> None:
    r1, _ = validate(rec(deleted=True, data=None))
    r2, _ = validate(rec(deleted=True, data=_DROP))
    assert r1.deleted and r1.data_json is None
    assert r2.deleted and r2.data_json is None


def test_optional_fields_may_be_null_or_absent() -> None:
    r, _ = validate(rec(sync_id=None, created_at=_DROP))
    assert r.sync_id is None and r.created_at is None


def test_nul_and_surrogates_are_replaced_and_flagged() -> None:
    data = {"a\x00key": ["x\x00y", {"deep": "\ud83d lone"}], "fine": "\u00e9\U0001f600"}
    record, sanitised = validate(rec(data=data))
    assert sanitised
    stored = json.loads(record.data_json or "")
    assert stored == {
        f"a{REPLACEMENT}key": [f"x{REPLACEMENT}y", {"deep": f"{REPLACEMENT} lone"}],
        "fine": "\u00e9\U0001f600",
    }


def test_escaped_backslash_u0000_text_is_not_a_nul() -> None:
    # The six characters \u0000 in a string are legitimate text, not a NUL.
    record, sanitised = validate(rec(data={"path": "C:\\u0000"}))
    assert not sanitised
    assert json.loads(record.data_json or "") == {"path": "C:\\u0000"}


def test_big_integers_survive() -> None:
    record, sanitised = validate(rec(data={"n": 2**70}))
    assert not sanitised
    assert json.loads(record.data_json or "") == {"n": 2**70}


def test_parse_page_keeps_everything() -> None:
    raws: list[Any] = [
        rec(upstream_id="a"),
        rec(upstream_id=None),
        "garbage",
        rec(upstream_id="b", data={"x": "\x00"}),
    ]
    page = parse_page(raws, cursor="c2", after_cursor="c1")
    assert [r.upstream_id for r in page.records] == ["a", "b"]
    assert len(page.dead_letters) == 3
    reasons = [d.reason for d in page.dead_letters]
    assert reasons[0] == "upstream_id must be a string, got null"
    assert reasons[1] == "record must be an object, got string"
    assert reasons[2].startswith("data contained NUL")
    assert all(d.after_cursor == "c1" for d in page.dead_letters)
    # Verbatim: the dead letter decodes to exactly what was received.
    assert json.loads(page.dead_letters[0].raw) == raws[1]
    assert json.loads(page.dead_letters[1].raw) == "garbage"
    assert json.loads(page.dead_letters[2].raw) == raws[3]
    assert page.dead_letters[2].upstream_id == "b"


def test_dead_letter_raw_keeps_lone_surrogates_and_nul_as_escapes() -> None:
    raw = rec(upstream_id="\ud800", data={"k": "\x00"})
    page = parse_page([raw], cursor="c", after_cursor=None)
    (dead,) = page.dead_letters
    assert "\\ud800" in dead.raw and "\x00" not in dead.raw
    assert json.loads(dead.raw) == raw
    assert dead.upstream_id is None


def _r(uid: str, ts: str, n: int, deleted: bool = False) -> Any:
    record, _ = validate(
        rec(upstream_id=uid, upstream_updated_at=ts, data={"n": n}, deleted=deleted)
    )
    return record


def test_dedup_later_in_stream_wins_on_equal_timestamps() -> None:
    t = "2024-01-01T00:00:00Z"
    out = dedup([_r("a", t, 1), _r("b", t, 1), _r("a", t, 2), _r("a", t, 3)])
    assert [(r.upstream_id, json.loads(r.data_json)["n"]) for r in out] == [("a", 3), ("b", 1)]


def test_dedup_never_lets_an_older_version_win() -> None:
    out = dedup([_r("a", "2024-01-02T00:00:00Z", 2), _r("a", "2024-01-01T00:00:00Z", 1)])
    assert json.loads(out[0].data_json or "")["n"] == 2


def test_dedup_delete_then_recreate() -> None:
    out = dedup(
        [_r("a", "2024-01-01T00:00:00Z", 1, deleted=True), _r("a", "2024-01-01T00:00:01Z", 2)]
    )
    assert not out[0].deleted


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), max_size=12))
def test_versions_by_key_orders_each_key_as_dedup_chooses(plan: list[tuple[str, int]]) -> None:
    records = [_r(uid, f"2024-01-01T00:00:0{sec}Z", n) for n, (uid, sec) in enumerate(plan)]
    versions = versions_by_key(records)
    assert [v[0] for v in versions] == dedup(records)  # the first is dedup's winner
    assert sorted(id(r) for v in versions for r in v) == sorted(id(r) for r in records)
    for v in versions:
        # Best first: newer timestamp, then later in the stream.
        ranks = [(r.upstream_updated_at, records.index(r)) for r in v]
        assert ranks == sorted(ranks, reverse=True)


def test_provider_of() -> None:
    assert provider_of("stripe:subscription") == "stripe"
    assert provider_of("nocolon") == "nocolon"


@given(
    st.recursive(st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20)
)
def test_sanitise_leaves_nothing_postgres_rejects(value: Any) -> None:
    clean = sanitise(value)
    text = json.dumps(clean, ensure_ascii=False)
    assert "\x00" not in text
    text.encode("utf-8")  # raises on a lone surrogate


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_dumps_verbatim_round_trips(value: Any) -> None:
    assert json.loads(dumps_verbatim(value)) == value


def test_raw_data_from_the_wire_passes_through_untouched() -> None:
    from worker.codec import decode_page
    from worker.records import RawJSON

    body = (
        b'{"records": [{"collection_id": "s:c", "upstream_id": "a", "deleted": false,'
        b' "upstream_updated_at": "2024-01-01T00:00:00Z",'
        b' "data": {"z": 1, "a": 12345678901234567890123, "x": 1e400, "s": "\\u00e9"}}],'
        b' "cursor": "c1"}'
    )
    records, cursor = decode_page(body)
    assert cursor == "c1"
    assert isinstance(records[0]["data"], RawJSON)
    record, sanitised = validate(records[0])
    assert not sanitised
    assert record.data_json == b'{"z": 1, "a": 12345678901234567890123, "x": 1e400, "s": "\\u00e9"}'


@pytest.mark.parametrize(
    ("raw", "outcome"),
    [
        (b"null", "deleted-null"),
        (b"[1]", "data must be an object, got array"),
        (b'"text"', "data must be an object, got string"),
        (b"12", "data must be an object, got number"),
        (b'{"k": "a\\u0000b"}', "sanitised"),
        (b'{"k": "\\ud83d\\ude00 pair"}', "clean"),
        (b'{"k": "\\\\u0000 not a NUL"}', "clean"),
    ],
)
def test_raw_data_rules(raw: bytes, outcome: str) -> None:
    from worker.records import RawJSON

    record_in = rec(data=RawJSON(raw), deleted=outcome == "deleted-null")
    if outcome.startswith("data must"):
        with pytest.raises(InvalidRecord, match=outcome):
            validate(record_in)
        return
    record, sanitised = validate(record_in)
    if outcome == "deleted-null":
        assert record.data_json is None
    elif outcome == "sanitised":
        assert sanitised and json.loads(record.data_json or "") == {"k": f"a{REPLACEMENT}b"}
    else:
        assert not sanitised and json.loads(record.data_json or "") == json.loads(raw)
