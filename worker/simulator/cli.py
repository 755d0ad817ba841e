"""``sequin-worker simulate`` (and ``python -m worker.simulator``): serve until signalled.

Fault flags are declared with the faults (:data:`worker.simulator.faults.FLAGS`), so a
new fault mode gets its flag without a change here.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from worker.simulator.facade import Simulator
from worker.simulator.faults import FLAGS, FaultConfig, non_negative
from worker.simulator.server import RECORDS_PATH

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sequin-worker simulate",
        description="Serve a local fake of Sequin's GET /v1/records with a deterministic dataset.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free)")
    parser.add_argument(
        "--token",
        default=os.environ.get("SEQUIN_API_TOKEN") or "dev-token",
        help="bearer token to accept (default: $SEQUIN_API_TOKEN, else dev-token)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset and fault seed (default 0)")
    parser.add_argument("--records", type=int, default=1000, help="base records (default 1000)")
    parser.add_argument("--keys", type=int, default=None, help="distinct keys (default records/5)")
    parser.add_argument("--record-size", type=int, default=800, help="approx. bytes of data")
    parser.add_argument(
        "--append-rate",
        type=non_negative,
        default=0.0,
        help="live records per second (default 0)",
    )
    parser.add_argument(
        "--hostile-items",
        action="store_true",
        help="end the stream with one item of each kind a client must dead-letter alone "
        "(non-objects, NaN, Infinity, invalid UTF-8, a NUL byte)",
    )
    _add_fault_arguments(parser)
    return parser


def _add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every fault flag of :data:`FLAGS`, defaulting to FaultConfig's defaults."""
    defaults = FaultConfig()
    for flag in FLAGS:
        if flag.parse is None:  # a switch
            parser.add_argument(flag.flag, dest=flag.field, action="store_true", help=flag.help)
            continue
        default = getattr(defaults, flag.field)
        parser.add_argument(
            flag.flag,
            dest=flag.field,
            metavar=flag.flag[2:].upper().replace("-", "_"),
            type=flag.parse,
            default=default if flag.per == 1 else default * flag.per,
            help=flag.help,
        )


def _fault_config(args: argparse.Namespace, seed: int) -> FaultConfig:
    """The FaultConfig the parsed flags ask for.  Raises ValueError if it is invalid."""
    values: dict[str, Any] = {}
    for flag in FLAGS:
        value = getattr(args, flag.field)
        # Unscaled values keep their type (an int stays an int, a switch a bool).
        values[flag.field] = value if flag.per == 1 else value / flag.per
    return FaultConfig(seed=seed, **values)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then return 0.

    Returns 2 for invalid options (argparse exits 2 itself for unparsable ones) and 1
    when the address cannot be bound; both with a one-line message on stderr.
    """
    args = _build_parser().parse_args(argv)
    try:
        sim = Simulator(
            token=args.token,
            seed=args.seed,
            records=args.records,
            keys=args.keys,
            record_size=args.record_size,
            faults=_fault_config(args, seed=args.seed),
            append_rate=args.append_rate,
            host=args.host,
            port=args.port,
        )
    except ValueError as exc:
        print(f"sequin-worker simulate: {exc}", file=sys.stderr)
        return 2
    if args.hostile_items:
        sim.append_hostile()
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:
        pass  # not the main thread: stop with KeyboardInterrupt instead
    try:
        try:
            sim.start()
        except OSError as exc:
            print(
                f"sequin-worker simulate: cannot listen on {args.host}:{args.port}: {exc}",
                file=sys.stderr,
            )
            return 1
        print(
            f"Sequin simulator serving {sim.base_url}{RECORDS_PATH} "
            f"({args.records} records, seed {args.seed}); "
            f"use base URL {sim.base_url} with token {args.token!r} "
            f"(Authorization: Bearer {args.token})",
            flush=True,
        )
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
