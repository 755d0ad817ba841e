"""Every decode path gives the same, exact answer: a property test over numbers and hostile
items, checked against the record rules and against Postgres' own jsonb equality."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.codec import (
    decode_fast,
    decode_item,
    decode_item_exact,
    decode_page,
    decode_split,
    item_text,
    raw_texts_of,
)
from worker.records import decode_exact, parse_page
from worker.simulator import HOSTILE_ITEMS

# --------------------------------------------------------------------------- the corpus

_digits = st.text("0123456789", min_size=1, max_size=40)
_int_part = st.one_of(
    st.just("0"), st.builds(lambda a, b: a + b, st.sampled_from("123456789"), _digits)
)
numbers = st.builds(
    lambda sign, whole, frac, exp: sign + whole + frac + exp,
    st.sampled_from(["", "-"]),
    _int_part,
    st.one_of(st.just(""), _digits.map(lambda d: "." + d)),
    st.one_of(
        st.just(""),
        st.builds(
            lambda e, s, n: f"{e}{s}{n}",
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.integers(0, 450),
        ),
    ),
)
"""JSON number texts: up to 40 digits each side of the point, exponents to +-450 (beyond a
double's range both ways), negative zero, upper-case E."""

_HOSTILE_RECORD = (
    b'{"collection_id": "c:x", "upstream_id": "h", "upstream_updated_at": '
    b'"2024-01-01T00:00:00Z", "deleted": false, "data": {"n": %s}}'
)
hostile_items = st.one_of(
    st.sampled_from(list(HOSTILE_ITEMS.values())),
    numbers.map(str.encode),  # a bare number is valid JSON but not a record
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(lambda c: _HOSTILE_RECORD % c),
    st.binary(min_size=1, max_size=3)
    .filter(lambda b: not _is_utf8(b) and b'"' not in b and b"\\" not in b)
    .map(lambda b: _HOSTILE_RECORD % (b'"' + b + b'"')),
    st.sampled_from([b"{}", b"[]", b"true", b'"\\ud800"', b'{"a": 1,}', b"[[[[1]]]]"]),
)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def record_item(uid: int, data: str) -> bytes:
    return (
        f'{{"collection_id": "stripe:customer", "upstream_id": "u{uid}", '
        f'"upstream_updated_at": "2024-01-01T00:00:{uid % 60:02d}Z", "deleted": false, '
        f'"data": {data}}}'
    ).encode()


datas = st.builds(
    lambda a, b, c: f'{{"n": {a}, "list": [{b}, {{"deep": {c}}}], "s": "\\u00e9 x"}}',
    numbers,
    numbers,
    numbers,
)

# A page: (kind, item) in stream order, kind "good" with its data text or "bad".
pages = st.lists(
    st.one_of(
        datas.map(lambda d: ("good", d)),
        hostile_items.map(lambda b: ("bad", b)),
    ),
    min_size=1,
    max_size=12,
)


def body_of(items: list[bytes], cursor: str) -> bytes:
    return b'{"records": [' + b", ".join(items) + b'], "cursor": "' + cursor.encode() + b'"}'


# --------------------------------------------------------------------------- the paths


def _whole_page_fast(body: bytes, items: list[bytes]) -> tuple[list[Any], str]:
    result = decode_fast(body)
    assert result is not None, "a page of valid records must take the fast path"
    return result


def _split(body: bytes, items: list[bytes]) -> tuple[list[Any], str]:
    return decode_split(body)


def _each_item(decoder: Callable[[bytes], Any]) -> Callable[[bytes, list[bytes]], Any]:
    def run(body: bytes, items: list[bytes]) -> tuple[list[Any], str]:
        return [decoder(i) for i in items], decode_split(body)[1]

    return run


PATHS: dict[str, Callable[[bytes, list[bytes]], tuple[list[Any], str]]] = {
    "decode_page": lambda body, items: decode_page(body),
    "split": _split,
    "item-msgspec": _each_item(decode_item),
    "item-exact": _each_item(decode_item_exact),
}


def check(
    conn: psycopg.Connection[tuple[Any, ...]] | None,
    page: list[tuple[str, Any]],
    path: str,
) -> None:
    items = [record_item(i, x) if kind == "good" else x for i, (kind, x) in enumerate(page)]
    cursor = "cur-" + str(len(items))
    body = body_of(items, cursor)
    records, got_cursor = PATHS[path](body, items)
    assert got_cursor == cursor
    parsed = parse_page(
        records, cursor=got_cursor, after_cursor="a", raw_texts=lambda: raw_texts_of(body)
    )
    goods = {f"u{i}": x for i, (kind, x) in enumerate(page) if kind == "good"}
    # The fast path hands data to Postgres undecoded: invalid UTF-8 in it reaches the store,
    # whose COPY refuses it and dead-letters that row alone with this same text
    # (integration/test_bad_input.py::test_invalid_utf8_inside_data_on_an_otherwise_clean_page_...).
    refused = [
        r for r in parsed.records if isinstance(r.data_json, bytes) and not _is_utf8(r.data_json)
    ]
    rows = [r for r in parsed.records if r not in refused]
    # Every valid record is a row, with data semantically exactly the text sent.
    assert sorted(r.upstream_id for r in rows) == sorted(goods)
    for r in rows:
        text = r.data_json.decode() if isinstance(r.data_json, bytes) else r.data_json
        assert text is not None
        assert decode_exact(text) == decode_exact(goods[r.upstream_id]), (path, text)
        if conn is not None:
            row = conn.execute(
                "SELECT %s::jsonb = %s::jsonb", (text, goods[r.upstream_id])
            ).fetchone()
            assert row == (True,), (path, text, goods[r.upstream_id])
    # Every bad item is dead-lettered, in order, with its bytes (escaped where not UTF-8).
    bad = [item_text(x) for kind, x in page if kind == "bad"]
    dead = [d.raw for d in parsed.dead_letters]
    if refused:
        assert sorted(dead + [parsed.raw_text(r) for r in refused]) == sorted(bad), path
    else:
        assert dead == bad, path
    # Where the item was UTF-8 without NUL, the dead letter is its bytes exactly.
    sent = [x for kind, x in page if kind == "bad" and _is_utf8(x) and b"\x00" not in x]
    assert all(item_text(x).encode() == x for x in sent)


@pytest.mark.parametrize("path", list(PATHS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page=pages)
def test_every_decode_path_keeps_numbers_exact_and_isolates_bad_items(
    path: str, page: list[tuple[str, Any]]
) -> None:
    check(None, page, path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page=st.lists(datas.map(lambda d: ("good", d)), min_size=1, max_size=6))
def test_a_page_of_valid_records_takes_the_fast_path_exactly(
    page: list[tuple[str, Any]],
) -> None:
    check(None, page, "decode_page")
    items = [record_item(i, x) for i, (_, x) in enumerate(page)]
    _whole_page_fast(body_of(items, "c"), items)


def test_bad_envelopes_stay_retryable_bad_bodies() -> None:
    good = record_item(1, '{"n": 1}')
    for body, reason in [
        (b'{"records": [' + good + b'], "cursor": "c\xff"}', "not JSON"),
        (b'{"records": [' + good + b'], "cursor": "c", "x": NaN}', "not JSON"),
        (b'{"records": [' + good + b"], ", "not JSON"),
        (b'{"records": [{"a": [1}], "cursor": "c"}', "not JSON"),
        (b'{"records": [1], "records": [2], "cursor": "c"}', "ambiguous"),
        (b'{"records": [1], "cursor": "c", "cursor": "d"}', "ambiguous"),
        (b"<html>502</html>", "not JSON"),
        (b'{"records":', "not JSON"),
        (b'{"records": 5, "cursor": "c"}', "no 'records' array"),
    ]:
        with pytest.raises(ValueError, match=reason):
            decode_page(body)


def test_empty_slots_in_the_array_are_items_of_their_own() -> None:
    good = record_item(1, '{"n": 1}')
    records, cursor = decode_page(b'{"records": [' + good + b",, " + good + b',], "cursor": "c"}')
    assert cursor == "c" and len(records) == 4
    parsed = parse_page(records, cursor="c", after_cursor=None)
    assert len(parsed.records) == 2
    assert [d.raw for d in parsed.dead_letters] == ["", ""]
