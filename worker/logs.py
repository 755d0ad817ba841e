"""Logging: structlog with stable event names and fields, and redaction of secrets.

Events are names (``page_applied``, ``api_retry``, ``caught_up``...) with fields, never prose,
so that they can be counted and alerted on. ``auto`` format renders for humans on a TTY and
as JSON lines otherwise (containers, CI).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

REDACTED = "[REDACTED]"
_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Register a secret: any log field containing it is redacted from then on."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(value: Any) -> Any:
    """Replace every registered secret inside ``value`` (strings, lists, dicts)."""
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in list(event_dict.items()):
            if isinstance(value, BaseException):
                value = f"{type(value).__name__}: {value}"
            event_dict[key] = redact(value)
    return event_dict


def _json_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def renders_for_humans(fmt: str, stream: TextIO | None = None) -> bool:
    """Whether ``fmt`` renders for a person at ``stream`` (console) rather than JSON lines."""
    out = stream or sys.stderr
    return fmt == "console" or (fmt == "auto" and out.isatty())


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Set up structlog for the process. Safe to call more than once."""
    for s in secrets:
        add_secret(s)
    out = stream or sys.stderr
    use_console = renders_for_humans(fmt, out)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    if use_console:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_json_dumps))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
