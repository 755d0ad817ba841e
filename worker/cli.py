"""The ``sequin-worker`` command line.

Exit codes (also in the README; each carried by its error, see :mod:`worker.errors`):

==  ===========================================================================
0   success; or stopped by SIGTERM/SIGINT (within 10 s: the batch in flight is given
    a second to finish, then cancelled and rolled back)
1   unexpected internal error (a bug: the traceback is logged)
2   configuration error: a bad or missing setting, or a consumer whose stored filters
    differ from the configured ones; ``reset`` without ``--yes``; the ops port taken;
    ``demo`` with neither DATABASE_URL nor the ``embedded`` extra
3   the API rejected the token (401/403)
4   the API rejected a request (another 4xx, e.g. an invalid cursor), or answered in a
    way that breaks the pagination contract (a cursor that does not advance, cycles or
    goes back), or the request cannot be sent at all (no retry can help)
5   ``backfill``: the API stayed unavailable through SEQUIN_MAX_RETRIES (``run`` retries)
6   the database: a permanent failure (no privilege, a missing table: the message says
    what to fix), in ``run`` too; or ``backfill``: a batch kept failing through
    SEQUIN_MAX_RETRIES (``run`` retries); or a migration failed
7   ``backfill --no-wait``: another process is syncing this consumer
8   ``check``: at least one check failed
==  ===========================================================================
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

import orjson
import psycopg
import structlog

from worker import __version__, logs
from worker.config import Settings, load_settings
from worker.errors import CheckFailed, CommandRefused, SchemaMissing, WorkerError
from worker.metrics import Metrics
from worker.ops import OpsServer
from worker.pg.connection import Conn, DbTimeouts
from worker.pg.migrations import migrate
from worker.pg.sqlfiles import table_exists
from worker.status import Progress
from worker.sync import LoopState, Totals

log = structlog.get_logger("worker.cli")

EXIT_OK = 0
EXIT_BUG = 1
# Every other exit code is carried by its error (worker.errors: WorkerError.exit_code).


# A stop that has not ended the process by then ends it (exit 0: every write is transactional,
# so dropping the connections rolls back whatever is in flight). The promise is 10 s.
SHUTDOWN_DEADLINE = 8.0


def install_signal_handlers(
    stop: threading.Event, on_deadline: Callable[[], None] | None = None
) -> None:
    """SIGTERM/SIGINT ask the loop to stop (the batch in flight gets a second, then is
    cancelled); a second signal forces. ``on_deadline`` runs if the process is still there
    :data:`SHUTDOWN_DEADLINE` seconds after the first signal, then the process exits 0."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()
        timer = threading.Timer(SHUTDOWN_DEADLINE, _deadline, args=(on_deadline,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _deadline(on_deadline: Callable[[], None] | None) -> None:
    log.warning("shutdown_deadline_exceeded", seconds=SHUTDOWN_DEADLINE)
    try:
        if on_deadline is not None:
            on_deadline()
    finally:
        os._exit(EXIT_OK)


class Ending:
    """Writes the summary line (backfill) and ``worker_stopped`` exactly once, however the
    command ends: caught up, stopped (also during an API retry wait), failed, or cut short
    by the shutdown deadline."""

    def __init__(self, mode: str, totals: Totals) -> None:
        self._mode = mode
        self._totals = totals
        self._lock = threading.Lock()
        self._done = False

    def __call__(self, *, caught_up: bool, **fields: object) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._mode == "backfill":
            line = summary_line(self._totals)
            if not caught_up:
                line = line.replace("complete", "interrupted", 1)
            print(line, flush=True)
        log.info("worker_stopped", mode=self._mode, caught_up=caught_up, **fields)


def _settings(require: tuple[str, ...]) -> Settings:
    settings = load_settings(require=require)
    secrets = [settings.api_token.get_secret_value()] if settings.api_token else []
    if settings.database_url is not None:
        secrets.append(_db_password(settings.database_url.get_secret_value()))
    logs.configure(settings.log_level, settings.log_format, secrets=[s for s in secrets if s])
    return settings


def _db_password(dsn: str) -> str:
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("password") or ""  # type: ignore[return-value]
    except psycopg.ProgrammingError:
        return ""


def summary_line(totals: Totals) -> str:
    return (
        f"backfill complete: {totals.received} records in {totals.elapsed:.1f} s "
        f"({totals.rate():.0f} records/s): {totals.upserted} upserted, {totals.deleted} deleted, "
        f"{totals.skipped} unchanged, {totals.dead_lettered} dead-lettered"
    )


def cmd_sync(args: argparse.Namespace, mode: str) -> int:
    from worker.errors import Stopped
    from worker.service import run_consumer

    settings = _settings(("api_token", "database_url"))
    stop = threading.Event()
    totals = Totals()
    ending = Ending(mode, totals)
    install_signal_handlers(stop, lambda: ending(caught_up=False, cut_short=True))
    log.info(
        "worker_started",
        mode=mode,
        consumer=settings.consumer,
        schema=settings.db_schema,
        base_url=settings.base_url,
        filters={k: v for k, v in settings.filters.items() if v},
        delete_mode=settings.delete_mode,
    )
    state = LoopState()
    metrics = Metrics(settings.consumer, __version__)
    ops = None
    if mode == "run" and settings.http_port:
        ops = _start_ops(settings, state, metrics)
    progress = None
    if mode == "backfill":
        tty = logs.renders_for_humans(settings.log_format)
        progress = Progress(totals, state, tty=tty).start()
    caught_up = False
    failed: str | None = None
    try:
        outcome = run_consumer(
            settings,
            "backfill" if mode == "backfill" else "run",
            stop,
            wait_for_lock=not getattr(args, "no_wait", False),
            state=state,
            metrics=metrics,
            totals=totals,
            # On a TTY the progress line says it all; per-batch events would scroll it away.
            batch_log_level="debug" if progress is not None and progress.tty else "info",
        )
        caught_up = outcome.caught_up
    except Stopped:
        pass  # stopped during an API retry wait: an ordinary stop
    except BaseException as exc:
        failed = type(exc).__name__
        raise
    finally:
        if ops is not None:
            ops.stop()
        if progress is not None:
            progress.stop()
        if failed is None:
            ending(caught_up=caught_up)
        else:
            ending(caught_up=False, error=failed)
    return EXIT_OK


def _start_ops(settings: Settings, state: LoopState, metrics: Metrics) -> OpsServer:
    from worker.pg.connection import ping

    assert settings.database_url is not None
    dsn = settings.database_url.get_secret_value()
    try:
        ops = OpsServer(
            settings.http_host,
            settings.http_port,
            metrics=metrics,
            state=state,
            db_ping=lambda: ping(dsn),
            heartbeat_timeout=settings.heartbeat_timeout,
        ).start()
    except OSError as exc:
        raise CommandRefused(
            f"SEQUIN_HTTP_PORT: cannot listen on {settings.http_host}:{settings.http_port} "
            f"({exc.strerror})",
        ) from None
    log.info("ops_listening", host=settings.http_host, port=ops.port)
    return ops


@contextmanager
def _database(settings: Settings) -> Iterator[Conn]:
    """The one preamble of the database commands (migrate, reset, status, views): an
    autocommit connection bounded by the settings' timeouts. Every database error inside
    leaves as :class:`StoreFailure` (exit 6), never as a psycopg error."""
    from worker.pg.connection import connect, translated

    assert settings.database_url is not None
    with (
        connect(
            settings.database_url.get_secret_value(),
            autocommit=True,
            timeouts=DbTimeouts.from_settings(settings),
        ) as conn,
        translated(),
    ):
        yield conn


def cmd_migrate(_args: argparse.Namespace) -> int:
    settings = _settings(("database_url",))
    with _database(settings) as conn:
        applied = migrate(conn, settings.db_schema, DbTimeouts.from_settings(settings))
    print(
        f"schema {settings.db_schema}: applied {applied}"
        if applied
        else f"schema {settings.db_schema}: up to date"
    )
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    from worker.pg.store import reset_consumer

    settings = _settings(("database_url",))
    name = args.consumer or settings.consumer
    if not args.yes:
        raise CommandRefused(
            f"this deletes the cursor of consumer {name!r}: its next run starts from the "
            "beginning of the stream. Repeat with --yes to do it.",
        )
    with _database(settings) as conn:
        found = reset_consumer(conn, settings.db_schema, name)
    print(f"consumer {name!r}: " + ("cursor deleted" if found else "no such consumer"))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from worker.status import read_status, render_status

    settings = _settings(("database_url",))
    with _database(settings) as conn:
        status = read_status(conn, settings.db_schema)
    if args.json:
        print(orjson.dumps(status.as_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_status(status))
    return EXIT_OK


def cmd_views(_args: argparse.Namespace) -> int:
    from worker.pg.views import LOCK_TIMEOUT_MS, all_collections, refresh_views

    settings = _settings(("database_url",))
    with _database(settings) as conn:
        if not table_exists(conn, settings.db_schema, "cursors"):
            raise SchemaMissing(
                f"schema {settings.db_schema!r} has no worker tables: run `sequin-worker migrate`"
            )
        # The views registry arrived in a later migration.
        migrate(conn, settings.db_schema, DbTimeouts.from_settings(settings))
        # Every collection, by a skip scan of the primary key (cheap): this command is also
        # how views get made for rows stored while SEQUIN_AUTO_VIEWS was off.
        done = refresh_views(conn, settings.db_schema, all_collections(conn, settings.db_schema))
    for r in done:
        if r.skipped:
            print(f"skipped {settings.db_schema}.{r.view} ({r.collection_id}): {r.skipped}")
        elif r.action == "deferred":
            print(
                f"deferred {settings.db_schema}.{r.view} ({r.collection_id}): a transaction "
                f"held it for over {LOCK_TIMEOUT_MS} ms; left as it was, run again later"
            )
        else:
            print(f"{settings.db_schema}.{r.view}: {r.collection_id}, {r.columns} data columns")
    if not done:
        print("no collections yet: nothing to do")
    return EXIT_OK


def cmd_check(_args: argparse.Namespace) -> int:
    from worker.check import run_checks

    return EXIT_OK if run_checks() else CheckFailed.exit_code  # each problem already printed


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import main as demo_main

    return demo_main(records=args.records)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sequin-worker",
        description="Keep a Postgres table exactly in step with Sequin's records stream.",
        epilog="Settings come from the environment (or .env); see .env.example.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="sync forever (the container's default command)")
    p = sub.add_parser("backfill", help="sync until caught up, print a summary, exit 0")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="exit 7 instead of waiting when another process is syncing this consumer",
    )
    sub.add_parser("migrate", help="apply pending migrations and exit")
    p = sub.add_parser("status", help="where each consumer stands; rows per collection")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("views", help="create or refresh the per-collection views")
    sub.add_parser("check", help="check settings, API token, database and migrations")
    p = sub.add_parser("reset", help="delete a consumer's cursor so that it starts over")
    p.add_argument("--consumer", help="consumer name (default: SEQUIN_CONSUMER)")
    p.add_argument("--yes", action="store_true", help="really do it")
    p = sub.add_parser(
        "simulate",
        help="serve a local fake of GET /v1/records (see `simulate --help`)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("demo", help="backfill a simulated account into a throwaway Postgres")
    p.add_argument("--records", type=int, default=20000, help="records to simulate")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": lambda a: cmd_sync(a, "run"),
    "backfill": lambda a: cmd_sync(a, "backfill"),
    "migrate": cmd_migrate,
    "status": cmd_status,
    "views": cmd_views,
    "check": cmd_check,
    "reset": cmd_reset,
    "demo": cmd_demo,
}


def _say(line: str) -> None:
    print(f"sequin-worker: {logs.redact(line)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        # The simulator parses its own options (argparse's REMAINDER would not pass them on).
        from worker import simulator

        return simulator.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except WorkerError as exc:
        # Every expected failure: its lines, and the exit code it carries (Stopped: 0, an
        # ordinary stop, said nothing).
        if exc.exit_code != EXIT_OK:
            for line in exc.lines():
                _say(line)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("internal_error")
        _say("internal error (a bug; the log above has the traceback)")
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
