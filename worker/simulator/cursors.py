"""The cursor codec: a cursor names a position ``(ts_micros, seq)`` of the stream.

Cursor format
-------------
A cursor is the unpadded URL-safe base64 of ``"<ts_micros>:<seq>"`` naming the
position of a record that exists in the stream; records strictly after that
position are returned.  The start of the stream is the base64 of ``"start"``
(``"c3RhcnQ"``).  Anything else (not canonical base64, another payload, or a
position where there is no record, e.g. a cursor of another seed) is rejected with
InvalidCursor, which the server answers with ``400 invalid_cursor``.  Clients must treat
cursors as opaque.
"""

from __future__ import annotations

import base64
import binascii
import re

from worker.simulator.dataset import Pos

__all__ = ["START_CURSOR", "InvalidCursor", "decode_cursor", "position_cursor"]


class InvalidCursor(ValueError):
    """A cursor this stream did not issue (the server answers ``400 invalid_cursor``)."""


_START_PAYLOAD = b"start"
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")
_POSITION_RE = re.compile(rb"(-?[0-9]{1,20}):([0-9]{1,20})")


def _encode_cursor(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


START_CURSOR = _encode_cursor(_START_PAYLOAD)


def position_cursor(pos: Pos) -> str:
    """The cursor naming ``pos`` (records strictly after it come next)."""
    return _encode_cursor(f"{pos[0]}:{pos[1]}".encode("ascii"))


def decode_cursor(cursor: str) -> Pos | None:
    """Return the position a cursor names, ``None`` for the start cursor.

    Raises InvalidCursor if the text is not a cursor this server could have issued
    (whether the position exists is checked by the caller).
    """
    if not _CURSOR_RE.fullmatch(cursor):
        raise InvalidCursor("not base64url")
    try:
        payload = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidCursor("not base64url") from exc
    # Only the canonical spelling is accepted, so one position has one cursor.
    if _encode_cursor(payload) != cursor:
        raise InvalidCursor("not canonical")
    if payload == _START_PAYLOAD:
        return None
    match = _POSITION_RE.fullmatch(payload)
    if match is None:
        raise InvalidCursor("not a position")
    return int(match.group(1)), int(match.group(2))
