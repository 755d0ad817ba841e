"""The pure rules applied to records: validation, sanitising, parsing a page.

No I/O here. Everything the sync loop decides about a record ("row or dead letter") is a
function of this module, so it is tested without sockets or a database. Which version of a
key wins is :func:`worker.model.dedup` (re-exported here): it defines what a batch means.

Rules:

* A record becomes a row only if ``collection_id`` and ``upstream_id`` are non-empty strings,
  ``upstream_updated_at`` is an ISO 8601 timestamp with a UTC offset, ``deleted`` is a
  boolean, ``data`` is an object (or ``null``/absent on a deleted record), and ``sync_id`` and
  ``created_at``, when present and not null, are a UUID and a timestamp.
* Anything else goes to the dead letters, verbatim, with the reason.
* Postgres rejects ``\\u0000`` and lone UTF-16 surrogates in ``jsonb`` and ``text``. Inside
  ``data`` they are replaced by U+FFFD (the row is stored) and the original record is also
  dead-lettered, so nothing is lost. In the key or other text fields they make the record
  unstorable: dead letter only.
* Within one batch the version of a key that wins is the greatest by
  (``upstream_updated_at``, stream position): later in the stream wins on equal timestamps,
  and an older timestamp never replaces a newer one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
import orjson

from worker.model import DeadLetter, ParsedPage, Record
from worker.model import dedup as dedup  # the rule lives with the model (Batch.rows)
from worker.model import versions_by_key as versions_by_key

REPLACEMENT = "\ufffd"
# orjson refuses to serialise deeper than this; deeper data is dead-lettered, not guessed at.
MAX_DEPTH = 254
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
# In raw JSON: a NUL or a UTF-16 surrogate escape (paired or not; the slow path decides).
_RAW_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_TS_SHAPE = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


class InvalidRecord(ValueError):
    """Raised inside validation; the message is the dead letter's reason."""


@dataclass(frozen=True, slots=True)
class Undecodable:
    """An item of a page that could not even be decoded (not JSON: ``NaN``, invalid UTF-8, a
    stray comma; or nested too deeply for the decoder); ``raw`` is its text from the wire,
    with bytes that are not UTF-8 (and NUL) as ``\\xNN`` escapes (see
    :func:`worker.codec.item_text`)."""

    raw: str
    reason: str


class RawJSON:
    """A JSON value left undecoded: its exact bytes from the wire (``data`` of a record)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def kind(self) -> str:
        """The JSON type, from the first byte."""
        first = self.raw.lstrip()[:1]
        return {
            b"{": "object",
            b"[": "array",
            b'"': "string",
            b"n": "null",
            b"t": "boolean",
            b"f": "boolean",
        }.get(first, "number")


class WireRecord(msgspec.Struct):
    """One record as decoded on the fast path: ``data`` stays raw JSON (no decode, no
    re-encode), the other fields are decoded as whatever JSON they hold."""

    collection_id: Any = msgspec.UNSET
    upstream_id: Any = msgspec.UNSET
    upstream_updated_at: Any = msgspec.UNSET
    deleted: Any = msgspec.UNSET
    data: msgspec.Raw = msgspec.Raw()
    sync_id: Any = None
    created_at: Any = None


class WirePage(msgspec.Struct):
    records: list[WireRecord]
    cursor: Any = None


def wire_to_dict(r: WireRecord) -> dict[str, Any]:
    """The record as the dict :func:`validate` reads, ``data`` as :class:`RawJSON`."""
    out: dict[str, Any] = {"sync_id": r.sync_id, "created_at": r.created_at}
    if r.collection_id is not msgspec.UNSET:
        out["collection_id"] = r.collection_id
    if r.upstream_id is not msgspec.UNSET:
        out["upstream_id"] = r.upstream_id
    if r.upstream_updated_at is not msgspec.UNSET:
        out["upstream_updated_at"] = r.upstream_updated_at
    if r.deleted is not msgspec.UNSET:
        out["deleted"] = r.deleted
    raw = bytes(r.data)
    if raw:
        out["data"] = RawJSON(raw)
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _exact_int(text: str) -> int | Decimal:
    # int() refuses more than 4300 digits (CPython's guard against slow conversion); jsonb
    # takes far more, so such an integer stays exact as a Decimal instead of failing.
    return int(text) if len(text) <= 4000 else Decimal(text)


def decode_exact(
    text: bytes | str,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """Decode JSON with the stdlib, keeping every number exactly: integers of any size,
    fractions as :class:`~decimal.Decimal` (no rounding to a double, no ``inf``); the
    non-JSON literals ``NaN`` and ``Infinity`` are refused (``ValueError``), as is invalid
    UTF-8 (``UnicodeDecodeError``, a ``ValueError``)."""
    if isinstance(text, bytes):
        # Strictly: json.loads(bytes) would decode with "surrogatepass", letting an encoded
        # lone surrogate (ED A0 80: not UTF-8) through as a repairable string.
        text = text.decode("utf-8")
    return json.loads(
        text,
        parse_float=Decimal,
        parse_int=_exact_int,
        parse_constant=_refuse_constant,
        object_pairs_hook=object_pairs_hook,
    )


def dumps_exact(value: Any) -> str:
    """Serialise a decoded JSON value with numbers exactly as decoded (``Decimal`` included).

    Strings are escaped to ASCII, so NUL and lone surrogates stay ``\\u`` escapes.
    """
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, RawJSON):
        return value.raw.decode("utf-8", "replace")
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps_exact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join([dumps_exact(v) for v in value]) + "]"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
            deepest = max(deepest, d + 1)
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
            deepest = max(deepest, d + 1)
    return deepest


def dumps_verbatim(value: Any) -> str:
    """Serialise a received JSON value back to JSON text without losing anything.

    Used for dead letters when the exact text from the wire is not at hand. orjson is the
    fast path; it refuses lone surrogates, ``Decimal`` and integers beyond 64 bits, which
    :func:`dumps_exact` keeps exactly. The result is always storable in a ``text`` column.
    """
    if isinstance(value, Undecodable):
        return value.raw
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        pass
    try:
        return dumps_exact(value)
    except RecursionError:
        return json.dumps(f"<a value nested more than {MAX_DEPTH} levels deep>")


def sanitise(value: Any) -> Any:
    """Return ``value`` with NUL and lone surrogates replaced by U+FFFD, keys included."""
    if isinstance(value, str):
        return _BAD_CHARS.sub(REPLACEMENT, value)
    if isinstance(value, dict):
        return {sanitise(k): sanitise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [sanitise(v) for v in value]
    return value


def _has_bad_chars(s: str) -> bool:
    return _BAD_CHARS.search(s) is not None


def parse_timestamp(value: Any, field_name: str) -> datetime:
    """Parse an ISO 8601 timestamp that carries a UTC offset (``Z`` or ``+hh:mm``)."""
    if not isinstance(value, str):
        raise InvalidRecord(f"{field_name} must be a string timestamp, got {_type_name(value)}")
    if not _TS_SHAPE.match(value):
        raise InvalidRecord(f"{field_name} is not an ISO 8601 timestamp: {value[:64]!r}")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRecord(f"{field_name} is not an ISO 8601 timestamp: {value[:64]!r}") from None
    if ts.tzinfo is None or ts.utcoffset() is None:
        # A naive timestamp would be read in the session's time zone: ambiguous, so refused.
        raise InvalidRecord(f"{field_name} has no UTC offset: {value[:64]!r}")
    return ts


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        Decimal: "number",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _key_text(raw: dict[str, Any], name: str) -> str:
    if name not in raw:
        raise InvalidRecord(f"{name} is missing")
    value = raw[name]
    if not isinstance(value, str):
        raise InvalidRecord(f"{name} must be a string, got {_type_name(value)}")
    if not value:
        raise InvalidRecord(f"{name} is empty")
    if _has_bad_chars(value):
        raise InvalidRecord(f"{name} contains NUL or a lone surrogate")
    return value


def validate(raw: Any) -> tuple[Record, bool]:
    """Validate one received record.

    Returns the row and whether its ``data`` had to be sanitised (in which case the caller
    must also dead-letter the original). Raises :class:`InvalidRecord` with the reason.
    """
    if isinstance(raw, Undecodable):
        raise InvalidRecord(raw.reason)
    if not isinstance(raw, dict):
        raise InvalidRecord(f"record must be an object, got {_type_name(raw)}")
    collection_id = _key_text(raw, "collection_id")
    upstream_id = _key_text(raw, "upstream_id")
    if "upstream_updated_at" not in raw:
        raise InvalidRecord("upstream_updated_at is missing")
    updated_at = parse_timestamp(raw["upstream_updated_at"], "upstream_updated_at")
    if "deleted" not in raw:
        raise InvalidRecord("deleted is missing")
    deleted = raw["deleted"]
    if not isinstance(deleted, bool):
        raise InvalidRecord(f"deleted must be a boolean, got {_type_name(deleted)}")

    sync_id: str | None = None
    raw_sync = raw.get("sync_id")
    if raw_sync is not None:
        if not isinstance(raw_sync, str):
            raise InvalidRecord(f"sync_id must be a string, got {_type_name(raw_sync)}")
        if _UUID.match(raw_sync):
            sync_id = raw_sync
        else:
            try:
                sync_id = str(UUID(raw_sync))  # the other spellings UUID() accepts
            except ValueError:
                raise InvalidRecord(f"sync_id is not a UUID: {raw_sync[:64]!r}") from None

    created_at = None
    if raw.get("created_at") is not None:
        created_at = parse_timestamp(raw["created_at"], "created_at")

    if "data" not in raw and not deleted:
        raise InvalidRecord("data is missing")
    data_json, sanitised = _data_of(raw.get("data"), deleted)
    record = Record(
        collection_id=collection_id,
        upstream_id=upstream_id,
        sync_id=sync_id,
        upstream_updated_at=updated_at,
        created_at=created_at,
        deleted=deleted,
        data_json=data_json,
    )
    return record, sanitised


def _data_of(data: Any, deleted: bool) -> tuple[str | bytes | None, bool]:
    """``data`` as JSON text for jsonb, and whether it had to be sanitised.

    Raw JSON from the wire passes through as its bytes unless it holds a NUL or surrogate
    escape; then it is decoded and goes the way of decoded data.
    """
    if isinstance(data, RawJSON):
        kind = data.kind()
        if kind == "null":
            data = None
        elif kind != "object":
            raise InvalidRecord(f"data must be an object, got {kind}")
        elif _RAW_SUSPECT.search(data.raw) is None:
            return data.raw, False
        else:
            data = decode_exact(data.raw)
    if data is None:
        if not deleted:
            raise InvalidRecord("data is null on a record that is not deleted")
        return None, False
    if not isinstance(data, dict):
        raise InvalidRecord(f"data must be an object, got {_type_name(data)}")
    return _data_json(data)


def _data_json(data: dict[str, Any]) -> tuple[str, bool]:
    try:
        out = orjson.dumps(data).decode()
    except (orjson.JSONEncodeError, TypeError):
        # A lone surrogate, an exact number (Decimal, or an integer beyond 64 bits), or
        # nesting deeper than orjson goes.
        if depth(data) > MAX_DEPTH:
            raise InvalidRecord(f"data is nested more than {MAX_DEPTH} levels deep") from None
        clean = sanitise(data)
        return dumps_exact(clean), clean != data
    if "\\u0000" in out:
        # Could be a real NUL or the six characters "\u0000" escaped; only a walk can tell.
        clean = sanitise(data)
        if clean != data:
            return orjson.dumps(clean).decode(), True
    return out, False


def parse_page(
    raw_records: Sequence[Any],
    *,
    cursor: str,
    after_cursor: str | None,
    raw_texts: Callable[[], Sequence[str] | None] | None = None,
) -> ParsedPage:
    """Split a page's records into rows and dead letters, keeping stream order.

    ``raw_texts``, when given, returns the exact text of each item as received (called only
    if the page has a dead letter); otherwise dead letters hold a lossless re-serialisation.
    """
    page = ParsedPage(
        after_cursor=after_cursor,
        cursor=cursor,
        received=len(raw_records),
        raw_texts=raw_texts,
    )
    newest: datetime | None = None
    texts: list[Sequence[str] | None] = []

    def dead(index: int, raw: Any, reason: str) -> DeadLetter:
        if raw_texts is not None and not texts:
            texts.append(raw_texts())
        exact = texts[0] if texts else None
        text = exact[index] if exact is not None and len(exact) == len(raw_records) else None
        return _dead(raw, reason, after_cursor, text)

    for index, raw in enumerate(raw_records):
        try:
            record, sanitised = validate(raw)
        except InvalidRecord as exc:
            page.dead_letters.append(dead(index, raw, str(exc)))
            continue
        except (RecursionError, OverflowError, ValueError, TypeError) as exc:
            # Not foreseen by validate(): keep the record and go on, rather than let one
            # record stop the stream on every restart.
            reason = f"record could not be processed: {type(exc).__name__}: {exc}"
            page.dead_letters.append(dead(index, raw, reason[:500]))
            continue
        if sanitised:
            reason = "data contained NUL or a lone surrogate; stored with U+FFFD in their place"
            page.dead_letters.append(dead(index, raw, reason))
        record.index = index
        page.records.append(record)
        if newest is None or record.upstream_updated_at > newest:
            newest = record.upstream_updated_at
    page.newest = newest
    return page


def _dead(raw: Any, reason: str, after_cursor: str | None, text: str | None = None) -> DeadLetter:
    collection_id = upstream_id = None
    if isinstance(raw, dict):
        c, u = raw.get("collection_id"), raw.get("upstream_id")
        collection_id = c if isinstance(c, str) and not _has_bad_chars(c) else None
        upstream_id = u if isinstance(u, str) and not _has_bad_chars(u) else None
    return DeadLetter(
        raw=text if text is not None else dumps_verbatim(raw),
        reason=reason,
        after_cursor=after_cursor,
        collection_id=collection_id,
        upstream_id=upstream_id,
    )


def provider_of(collection_id: str) -> str:
    """The provider slug of a collection: the part before the first ``:``."""
    return collection_id.split(":", 1)[0]
