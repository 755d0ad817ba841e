"""The API client's pure parts: Retry-After, the HTTPS rule, body decoding. No sockets."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from tests.helpers import TOKEN
from worker.api import SequinClient, parse_retry_after
from worker.codec import decode_item_exact, decode_page, record_spans


def test_retry_after_as_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 3, usegmt=True), now=now) == pytest.approx(3.0)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(formatdate(now - 60, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_plain_http_to_a_remote_host_is_refused() -> None:
    with pytest.raises(ValueError, match="plain http"):
        SequinClient("http://api.example.com", TOKEN)
    SequinClient("http://api.example.com", TOKEN, allow_insecure_http=True).close()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"cursor": "x"}', "no 'records' array"),
        (b'{"records": {}, "cursor": "x"}', "no 'records' array"),
        (b'{"records": []}', "no 'cursor' string"),
        (b'{"records": [], "cursor": 5}', "no 'cursor' string"),
        (b'{"records": [], "cursor": ""}', "no 'cursor' string"),
        (b'{"records": [', "not JSON"),
    ],
)
def test_malformed_bodies(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_page(body)


def test_bodies_with_lone_surrogate_escapes_and_big_ints_decode() -> None:
    records, cursor = decode_page(
        b'{"records": [{"a": "\\ud800", "n": 123456789012345678901234}], "cursor": "c"}'
    )
    assert records == [{"a": "\ud800", "n": 123456789012345678901234}] and cursor == "c"


def test_record_spans_give_each_record_exactly_as_received() -> None:
    items = [
        b'{"a": "x, ] } [ {", "b": [1, {"c": "\\"q\\""}]}',
        b'"just , a string"',
        b"  42 ",
        b'{"deep": [[[]]], "esc": "\\\\"}',
    ]
    body = b'{"cursor": "c,]", "records": [' + b",".join(items) + b'], "more": {"records": [9]}}'
    spans, start, end = record_spans(body)
    assert spans == [i.strip() for i in items]
    assert body[start - 1 : start] == b"[" and body[end : end + 1] == b"]"
    assert record_spans(b'{"records": [], "cursor": "x"}')[0] == []
    assert record_spans(b'{"rec\\u006frds": [1,2], "cursor": "x"}')[0] == [b"1", b"2"]
    with pytest.raises(ValueError, match="no 'records' array"):
        record_spans(b'{"cursor": "x"}')


def test_exact_numbers_and_deep_records_decode_without_losing_the_page() -> None:
    from decimal import Decimal

    from worker.records import Undecodable

    deep = b"[" * 5000 + b"]" * 5000
    body = (
        b'{"records": [{"n": 1e400, "i": 12345678901234567890123}, '
        + deep
        + b', 3], "cursor": "c"}'
    )
    records, cursor = decode_page(body)
    assert cursor == "c"
    assert isinstance(records[0], dict)  # a record (invalid: no key fields), not lost
    item = body[len(b'{"records": [') :].split(b", [[", 1)[0]
    assert decode_item_exact(item) == {"n": Decimal("1e400"), "i": 12345678901234567890123}
    assert isinstance(records[1], Undecodable) and records[1].raw == deep.decode()
    assert records[2] == 3
    # NaN is not JSON: that one item is undecodable (and dead-lettered); the page is not.
    records, cursor = decode_page(b'{"records": [NaN, 1], "cursor": "c"}')
    assert cursor == "c" and records[1] == 1
    assert isinstance(records[0], Undecodable) and records[0].raw == "NaN"
