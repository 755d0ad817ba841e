"""A local fake of Sequin's ``GET /v1/records`` endpoint.

This package is an independent reading of the API document
(``shared/spec/sequin-records-api.txt``) and deliberately imports nothing from the
rest of the ``worker`` package: when the client and the simulator agree, it is
because both follow the document, not because they share code.  It is used by the
tests (over real sockets), the benchmarks, the demo and ``sequin-worker simulate``.

Modules, one job each (each imports only the ones above it):

* :mod:`~worker.simulator.timestamps`: the API's timestamp format.
* :mod:`~worker.simulator.bodies`: collections and realistic ``data`` bodies.
* :mod:`~worker.simulator.dataset`: base record ``i`` as a pure function of ``(seed, i)``.
* :mod:`~worker.simulator.cursors`: the cursor codec (a cursor names a stream position).
* :mod:`~worker.simulator.stream`: the ordered stream (base records plus appended and
  live ones), paging, and the expected-state oracle.
* :mod:`~worker.simulator.hostile`: named items a client must isolate one by one.
* :mod:`~worker.simulator.hooks`: what a fault mode is (its hooks, what it sees; it
  names FaultConfig, below it, as a type only).
* :mod:`~worker.simulator.faults`: injected faults, each mode declared in one place.
* :mod:`~worker.simulator.injector`: rolls the faults of each request.
* :mod:`~worker.simulator.server`: the HTTP server and its request log.
* :mod:`~worker.simulator.facade`: :class:`Simulator`, wiring the above together.
* :mod:`~worker.simulator.cli`: ``sequin-worker simulate`` / ``python -m worker.simulator``.
"""

from worker.simulator.cli import main
from worker.simulator.facade import Simulator
from worker.simulator.faults import FaultConfig
from worker.simulator.hostile import HOSTILE_ITEMS
from worker.simulator.server import RequestLogEntry
from worker.simulator.timestamps import format_ts, parse_ts

__all__ = [
    "HOSTILE_ITEMS",
    "FaultConfig",
    "RequestLogEntry",
    "Simulator",
    "format_ts",
    "main",
    "parse_ts",
]
