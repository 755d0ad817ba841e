"""Response bytes to a page: the envelope (``records`` array and ``cursor``), then each item
of the array on its own, with every number exactly as sent.

:func:`decode_page` is the one entry point. Its rules:

* **The envelope decides retry or apply.** If the top-level object, its one ``records`` array
  and its one non-empty ``cursor`` string can be read, the page is applied, whatever its items
  hold. If not (not JSON, truncated, HTML, another shape, invalid UTF-8 or ``NaN`` outside the
  items, a second ``records`` or ``cursor`` key) it raises ``ValueError``: the caller retries
  the same position. Two ``records`` (or ``cursor``) keys are refused as ambiguous rather than
  resolved by "last key wins", which would drop the other array's records without a trace.
* **Each item is decoded alone.** An item that is not JSON (``NaN``, ``Infinity``, invalid
  UTF-8, a stray comma, nesting too deep for the decoder) becomes an :class:`Undecodable`
  holding its bytes as text (:func:`item_text`), which the record rules dead-letter; the other
  items are unaffected. (On the whole-page fast path, invalid UTF-8 inside ``data`` is left for
  Postgres to refuse; the store then dead-letters that row alone, with the same text.)
* **Numbers are exact on every path.** ``data`` is never decoded to floats: the fast paths
  (msgspec, for the whole page or one item) keep it as the raw bytes from the wire, handed to
  ``jsonb`` as they came; the fallback (stdlib) decodes numbers to ``int``/``Decimal``, which
  :func:`worker.records.dumps_exact` writes back digit for digit.

Paths, fastest first: the whole page with msgspec (the usual well-formed page); else the
envelope split by :func:`record_spans` and each item with msgspec; else that item with the
exact stdlib decoder; else that item is an :class:`Undecodable`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import msgspec

from worker.records import Undecodable, WirePage, WireRecord, decode_exact, wire_to_dict

_WIRE_PAGE = msgspec.json.Decoder(WirePage)
_WIRE_RECORD = msgspec.json.Decoder(WireRecord)

_STRUCTURAL = re.compile(rb'["\[\]{},:]')
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_SPACE = b" \t\r\n"
_SPACES = re.compile(rb"[ \t\r\n]*")
_OPENER = {ord("]"): ord("["), ord("}"): ord("{")}
# A \u escape of a printable ASCII character (which no serialiser needs): the only way a key
# could spell "records" or "cursor" without those bytes appearing literally.
_ESCAPED_ASCII = re.compile(rb"\\u00[2-7][0-9a-fA-F]")


def decode_page(body: bytes) -> tuple[list[Any], str]:
    """Decode a response body into (items, cursor); raise ``ValueError`` if the envelope
    cannot be read. Items are record dicts (``data`` as :class:`~worker.records.RawJSON` or
    exactly decoded), other JSON values, or :class:`Undecodable`."""
    fast = decode_fast(body)
    if fast is not None:
        return fast
    return decode_split(body)


def decode_fast(body: bytes) -> tuple[list[Any], str] | None:
    """The whole page with msgspec, or None when this path cannot vouch for it (then
    :func:`decode_split` decides). Raises ``ValueError`` only for a missing cursor."""
    # msgspec checks UTF-8 in the strings it decodes (the key fields, the cursor), not inside
    # the raw ``data`` it passes through: there Postgres refuses invalid UTF-8 and the store
    # dead-letters that row alone. Checking here would cost as much as decoding the page.
    try:
        wire = _WIRE_PAGE.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    # msgspec lets the last of two equal keys win; a second "records" or "cursor" key is
    # refused by the split path instead. Two byte counts rule it out (together ~0.1 ms per
    # 100 kB), and a memchr for a backslash rules out keys spelled with escapes on most pages.
    if (
        body.count(b'"records"') != 1
        or body.count(b'"cursor"') != 1
        or (b"\\" in body and b"\\u00" in body and _ESCAPED_ASCII.search(body) is not None)
    ):
        return None
    if not isinstance(wire.cursor, str) or not wire.cursor:
        raise ValueError("body has no 'cursor' string")
    return [wire_to_dict(r) for r in wire.records], wire.cursor


def decode_split(body: bytes) -> tuple[list[Any], str]:
    """Read the envelope without decoding the items, then decode each item on its own."""
    items, start, end = record_spans(body)
    # The envelope without the array's contents: small, and decoded strictly (NaN, invalid
    # UTF-8 or junk anywhere outside the items make the body unreadable).
    tops: list[list[tuple[str, Any]]] = []

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        tops.append(kv)
        return dict(kv)

    try:
        doc = decode_exact(body[:start] + body[end:], object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"body is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not tops:
        raise ValueError("body is not a JSON object")
    if sum(1 for key, _ in tops[-1] if key == "cursor") > 1:  # the outermost object ends last
        raise ValueError("body has more than one 'cursor' key (ambiguous)")
    cursor = doc.get("cursor")
    if not isinstance(cursor, str) or not cursor:
        raise ValueError("body has no 'cursor' string")
    return [decode_item(item) for item in items], cursor


def decode_item(item: bytes) -> Any:
    """One item of the records array: msgspec (``data`` kept raw) if it is a record it can
    read, else the exact stdlib decoder, else an :class:`Undecodable` with the item's text."""
    if not item.isascii() and not _is_utf8(item):
        return _not_utf8(item)
    try:
        return wire_to_dict(_WIRE_RECORD.decode(item))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass  # not an object, or something msgspec refuses that the stdlib may read
    return decode_item_exact(item)


def decode_item_exact(item: bytes) -> Any:
    """One item with the exact stdlib decoder only (the fallback of :func:`decode_item`)."""
    if not item:
        return Undecodable("", "empty item in the records array (two commas in a row?)")
    try:
        return decode_exact(item)
    except RecursionError:
        return Undecodable(item_text(item), "record is nested too deeply to decode")
    except UnicodeDecodeError:
        return _not_utf8(item)
    except ValueError as exc:
        return Undecodable(item_text(item), f"record is not valid JSON: {exc}")


def record_spans(body: bytes) -> tuple[list[bytes], int, int]:
    """The raw bytes of each item of the top-level ``records`` array, and where the array's
    contents start and end in ``body``.

    A small scanner: strings are skipped whole (brackets and commas inside them do not count),
    brackets must pair, and items are split at the array's own commas (an empty slot is an
    empty item). Raises ``ValueError`` if the body is not a JSON object with exactly one
    ``records`` key whose value is an array. It checks structure, not tokens: the caller
    decodes the envelope and each item.
    """
    first = _skip_space(body, 0)
    if body[first : first + 1] != b"{":
        try:
            decode_exact(body)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"body is not JSON ({exc})") from None
        raise ValueError("body is not a JSON object")
    stack = bytearray()
    pos = 0
    last_string = (0, 0)
    key_is_records = in_records = False
    start = end = -1
    item_start = 0
    items: list[bytes] = []
    while True:
        m = _STRUCTURAL.search(body, pos)
        if m is None:
            break
        i = m.start()
        c = body[i]
        pos = i + 1
        if c == 0x22:  # "
            s = _STRING.match(body, i)
            if s is None:
                raise ValueError(f"body is not JSON (unterminated string at byte {i})")
            last_string, pos = (i, s.end()), s.end()
        elif c == 0x3A:  # :
            if len(stack) == 1:
                key_is_records = _is_records(body[last_string[0] : last_string[1]])
                if key_is_records:
                    if start >= 0:
                        raise ValueError("body has more than one 'records' key (ambiguous)")
                    j = _skip_space(body, pos)
                    if j == len(body):
                        break  # truncated: reported below
                    if body[j : j + 1] != b"[":
                        raise ValueError("body has no 'records' array")
        elif c in (0x5B, 0x7B):  # [ {
            if len(stack) == 1 and key_is_records and start < 0:
                start = item_start = i + 1
                in_records = True
            stack.append(c)
        elif c in (0x5D, 0x7D):  # ] }
            if not stack or stack[-1] != _OPENER[c]:
                raise ValueError(f"body is not JSON (unbalanced brackets at byte {i})")
            stack.pop()
            if in_records and len(stack) == 1:
                end, in_records = i, False
                item = body[item_start:i].strip(_JSON_SPACE)
                if item or items:
                    items.append(item)
        elif c == 0x2C and in_records and len(stack) == 2:  # ,
            items.append(body[item_start:i].strip(_JSON_SPACE))
            item_start = i + 1
    if stack:
        raise ValueError("body is not JSON (it ends inside an object or array)")
    if start < 0 or end < 0:
        raise ValueError("body has no 'records' array")
    return items, start, end


def _skip_space(body: bytes, pos: int) -> int:
    m = _SPACES.match(body, pos)
    return m.end() if m is not None else pos


def item_text(item: bytes) -> str:
    """An item's bytes as text for a dead letter: exact where they are UTF-8; bytes that are
    not, and NUL (which a Postgres ``text`` column refuses), as ``\\xNN`` escapes."""
    text = item.decode("utf-8", "backslashreplace")
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def raw_texts_of(body: bytes) -> list[str] | None:
    """The text of each item of ``body``'s records array (see :func:`item_text`), or None if
    the body cannot be split."""
    try:
        items, _, _ = record_spans(body)
    except ValueError:
        return None
    return [item_text(item) for item in items]


def raw_texts_once(body: bytes) -> Callable[[], list[str] | None]:
    """A function giving :func:`raw_texts_of` ``body``, scanned on the first call only.

    It holds the body bytes, not the decoded records, so nothing decoded stays alive while
    its batch waits; the texts are kept only once a dead letter has asked for them.
    """
    cache: list[list[str] | None] = []

    def texts() -> list[str] | None:
        if not cache:
            cache.append(raw_texts_of(body))
        return cache[0]

    return texts


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _not_utf8(item: bytes) -> Undecodable:
    try:
        item.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f" (byte {exc.start}: 0x{item[exc.start]:02x})"
    else:  # pragma: no cover - only called on invalid UTF-8
        where = ""
    return Undecodable(
        item_text(item), f"record is not valid UTF-8{where}; kept with \\xNN escapes"
    )


def _is_records(key: bytes) -> bool:
    if key == b'"records"':
        return True
    try:
        return bool(json.loads(key) == "records")
    except ValueError:
        return False
