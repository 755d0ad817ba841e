"""The API's timestamp format: ``2024-11-10T18:39:00.070453Z``, as epoch microseconds here.

Every timestamp the simulator handles is an ``int`` of microseconds since the Unix epoch;
this module converts at the edges (serving records, accepting appended ones).
"""

from __future__ import annotations

import datetime as dt

__all__ = ["EPOCH", "format_ts", "format_ts_bytes", "minute_prefix", "parse_ts"]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_ORDINAL = EPOCH.date().toordinal()
_MINUTE_CACHE_MAX = 200_000  # bounded: about 20 MB at most

# "YYYY-MM-DDTHH:MM:" per minute since the epoch.  Read directly by the generator's
# hot path (dataset.Dataset.record_bytes), which inlines format_ts_bytes.
minute_prefix: dict[int, bytes] = {}


def format_ts_bytes(us: int) -> bytes:
    """Format microseconds since the epoch like the API: ``2024-11-10T18:39:00.070453Z``."""
    # Hot path (twice per served record): the "YYYY-MM-DDTHH:MM:" prefix is cached.
    minute, rest = divmod(us, 60_000_000)
    prefix = minute_prefix.get(minute)
    if prefix is None:
        day, minute_of_day = divmod(minute, 1440)
        date = dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()
        prefix = f"{date}T{minute_of_day // 60:02d}:{minute_of_day % 60:02d}:".encode()
        if len(minute_prefix) >= _MINUTE_CACHE_MAX:
            minute_prefix.clear()
        minute_prefix[minute] = prefix
    secs, frac = divmod(rest, 1_000_000)
    return b"%s%02d.%06dZ" % (prefix, secs, frac)


def format_ts(us: int) -> str:
    """Format microseconds since the epoch like the API: ``2024-11-10T18:39:00.070453Z``."""
    return format_ts_bytes(us).decode()


def parse_ts(value: str) -> int:
    """Parse an ISO-8601 timestamp with a UTC offset (``Z`` or ``+hh:mm``) to epoch micros.

    Raises ValueError for anything else, including timestamps without an offset.
    """
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp without a UTC offset: {value!r}")
    return (parsed - EPOCH) // dt.timedelta(microseconds=1)
