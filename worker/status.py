"""What operators look at: ``status`` (where each consumer stands), ``check`` (is this setup
going to work), and the backfill progress line. Reads only; never writes the data tables.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg
import structlog
from psycopg.rows import dict_row

from worker.errors import SchemaMissing
from worker.pg import sqlfiles
from worker.pg.connection import translated
from worker.pg.locks import consumer_lock_key
from worker.sync import LoopState, Totals

log = structlog.get_logger("worker.status")


@dataclass
class ConsumerStatus:
    consumer: str
    filters: dict[str, str]
    delete_mode: str
    cursor: str | None
    records_applied: int
    newest_applied: datetime | None
    lag_seconds: float | None
    last_commit: datetime
    leader_alive: bool
    leader: dict[str, Any] | None
    dead_letters: int


@dataclass
class CollectionStatus:
    collection_id: str
    live: int
    deleted: int
    newest: datetime | None


@dataclass
class Status:
    schema: str
    consumers: list[ConsumerStatus] = field(default_factory=list)
    collections: list[CollectionStatus] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        def conv(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, dict):
                return {k: conv(v) for k, v in value.items()}
            if isinstance(value, list):
                return [conv(v) for v in value]
            return value

        return {
            "schema": self.schema,
            "consumers": [conv(asdict(c)) for c in self.consumers],
            "collections": [conv(asdict(c)) for c in self.collections],
        }


def read_status(conn: psycopg.Connection[Any], schema: str) -> Status:
    """Everything ``sequin-worker status`` shows. Raises :class:`SchemaMissing`, and
    :class:`~worker.errors.StoreFailure` when a query fails."""
    with translated():
        return _read_status(conn, schema)


def _read_status(conn: psycopg.Connection[Any], schema: str) -> Status:
    if not sqlfiles.table_exists(conn, schema, "cursors"):
        raise SchemaMissing(
            f"schema {schema!r} has no worker tables in this database: run "
            "`sequin-worker migrate` (or check SEQUIN_DB_SCHEMA and DATABASE_URL)"
        )
    now = datetime.now(UTC)
    status = Status(schema)
    with conn.cursor(row_factory=dict_row) as cur:
        consumers = cur.execute(sqlfiles.query("status_consumers", schema)).fetchall()
        for c in consumers:
            key = consumer_lock_key(schema, c["consumer"])
            holder = cur.execute(
                sqlfiles.query("lock_holder", schema),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
            ).fetchone()
            newest = c["last_upstream_updated_at"]
            status.consumers.append(
                ConsumerStatus(
                    consumer=c["consumer"],
                    filters={
                        k: c[k] for k in ("sync_id", "provider", "collection") if c[k] is not None
                    },
                    delete_mode=c["delete_mode"],
                    cursor=c["cursor"],
                    records_applied=int(c["records_applied"]),
                    newest_applied=newest,
                    lag_seconds=(now - newest).total_seconds() if newest else None,
                    last_commit=c["updated_at"],
                    leader_alive=holder is not None,
                    leader=(
                        {
                            "pid": holder["pid"],
                            "application_name": holder["application_name"],
                            "client_addr": holder["client_addr"],
                            "since": holder["backend_start"],
                        }
                        if holder
                        else None
                    ),
                    dead_letters=int(c["dead_letters"]),
                )
            )
        for row in cur.execute(sqlfiles.query("status_collections", schema)).fetchall():
            status.collections.append(
                CollectionStatus(
                    row["collection_id"], int(row["live"]), int(row["deleted"]), row["newest"]
                )
            )
    return status


def human_duration(seconds: float | None) -> str:
    """``42 s``, ``7 min``, ``3.5 h``, ``12 d``."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def _ts(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def table(
    header: tuple[str, ...],
    rows: Sequence[tuple[str, ...]],
    right: set[int],
    footer: tuple[str, ...] | None = None,
) -> str:
    """A plain fixed-width table (the one renderer of ``status`` and the demo): columns in
    ``right`` are right-aligned; ``footer`` (a totals row) comes after a second rule."""
    widths = [
        max(len(r[i]) for r in [header, *rows, *([footer] if footer else [])])
        for i in range(len(header))
    ]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(header), rule, *map(fmt, rows)]
    if footer is not None:
        lines += [rule, fmt(footer)]
    return "\n".join(lines)


def render_status(status: Status) -> str:
    if not status.consumers:
        consumers = f"no consumers yet in schema {status.schema}"
    else:
        consumers = table(
            (
                "consumer",
                "filters",
                "cursor",
                "records",
                "newest applied",
                "lag",
                "last commit",
                "leader",
                "dead letters",
            ),
            [
                (
                    c.consumer,
                    ",".join(f"{k}={v}" for k, v in c.filters.items()) or "(all)",
                    _short(c.cursor),
                    str(c.records_applied),
                    _ts(c.newest_applied),
                    human_duration(c.lag_seconds),
                    _ts(c.last_commit),
                    f"yes (pid {c.leader['pid']})" if c.leader else "no",
                    str(c.dead_letters),
                )
                for c in status.consumers
            ],
            right={3, 5, 8},
        )
    if not status.collections:
        collections = "no rows yet"
    else:
        collections = table(
            ("collection", "live", "deleted", "newest"),
            [
                (c.collection_id, str(c.live), str(c.deleted), _ts(c.newest))
                for c in status.collections
            ],
            right={1, 2},
        )
    return f"{consumers}\n\n{collections}"


def _short(cursor: str | None, width: int = 16) -> str:
    if cursor is None:
        return "(start)"
    return cursor if len(cursor) <= width else cursor[: width - 1] + "…"


class Progress:
    """Backfill progress: a live line on a TTY, a ``progress`` event every few seconds else.

    The API gives no total, so this shows rate and how far behind now the stream position is,
    never a percentage.
    """

    def __init__(
        self,
        totals: Totals,
        state: LoopState,
        *,
        tty: bool,
        stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:
        self._totals = totals
        self._state = state
        self.tty = tty
        self._stream = stream or sys.stderr
        self._interval = interval or (0.5 if tty else 5.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._last = (time.monotonic(), 0)

    def line(self) -> str:
        t, s = self._totals, self._state
        now_m = time.monotonic()
        last_t, last_n = self._last
        rate = (t.received - last_n) / (now_m - last_t) if now_m > last_t else 0.0
        self._last = (now_m, t.received)
        reached = _ts(s.newest_applied)
        behind = (
            human_duration((datetime.now(UTC) - s.newest_applied).total_seconds())
            if s.newest_applied
            else "-"
        )
        return (
            f"backfill: {t.received:,} records, {rate:,.0f}/s, reached {reached} "
            f"({behind} behind now), {t.dead_lettered} dead-lettered"
        )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.emit()

    def emit(self) -> None:
        if self.tty:
            self._stream.write("\r\x1b[K" + self.line())
            self._stream.flush()
        else:
            t, s = self._totals, self._state
            lag = (
                (datetime.now(UTC) - s.newest_applied).total_seconds() if s.newest_applied else None
            )
            log.info(
                "progress",
                records=t.received,
                records_per_s=round(t.rate(), 1),
                reached=s.newest_applied.isoformat() if s.newest_applied else None,
                lag_s=round(lag, 1) if lag is not None else None,
                dead_lettered=t.dead_lettered,
            )

    def start(self) -> Progress:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self.tty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
