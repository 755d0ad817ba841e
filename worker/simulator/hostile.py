"""Hostile items: named items a client must isolate one by one (decode faults).

Each is put in a page verbatim, as a raw item of the stream (see
:meth:`worker.simulator.stream.Stream.append_raw`); none of them is a storable record, so a
client must dead-letter each (with its bytes) and apply the rest of its page.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["HOSTILE_ITEMS", "hostile_items"]


def _record(uid: bytes, data: bytes, upstream_id: bytes | None = None) -> bytes:
    # A record well formed but for its `data` (or its key), so that only the decode fails.
    return (
        b'{"sync_id": null, "collection_id": "stripe:customer", "upstream_id": "'
        + (upstream_id if upstream_id is not None else b"hostile-" + uid)
        + b'", "upstream_updated_at": "2024-01-01T00:00:00Z", "deleted": false, "data": '
        + data
        + b"}"
    )


HOSTILE_ITEMS: dict[str, bytes] = {
    # Valid JSON, not a record.
    "null": b"null",
    "string": b'"not a record"',
    "number": b"12345678.12345678901",
    "array": b"[1, 2]",
    # Not JSON, in a record that is otherwise well formed.
    "nan": _record(b"nan", b'{"x": NaN}'),
    "infinity": _record(b"infinity", b'{"x": -Infinity}'),
    "invalid-utf8-key": _record(b"", b'{"x": 1}', upstream_id=b"bad-\xff\xfe-id"),
    "invalid-utf8-data": _record(b"utf8-data", b'{"s": "caf\xc3\x28"}'),
    "nul-byte": _record(b"nul-byte", b'{"s": "a\x00b"}'),
}
"""Named items the simulator can put in a page verbatim. None of them is a storable record:
a client must dead-letter each (with its bytes) and apply the rest of its page. Bytes that
are not UTF-8 are sent as they are."""


def hostile_items(kinds: Iterable[str] | None = None) -> list[bytes]:
    """The :data:`HOSTILE_ITEMS` named in ``kinds`` (default: all), in that order.

    Raises ValueError naming the unknown ones (before anything is appended).
    """
    names = list(HOSTILE_ITEMS) if kinds is None else list(kinds)
    unknown = [n for n in names if n not in HOSTILE_ITEMS]
    if unknown:
        raise ValueError(f"unknown hostile items {unknown}; known: {sorted(HOSTILE_ITEMS)}")
    return [HOSTILE_ITEMS[n] for n in names]
