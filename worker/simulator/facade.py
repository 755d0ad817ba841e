"""``Simulator``: one object that owns a dataset, its stream, the faults and the server.

It wires the parts together, runs the server and live mode in background threads and
keeps the public surface the tests, benchmarks and demo use; the work itself is done
by :mod:`~worker.simulator.dataset`, :mod:`~worker.simulator.stream`,
:mod:`~worker.simulator.faults` (rolled by :mod:`~worker.simulator.injector`) and
:mod:`~worker.simulator.server`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from worker.simulator.bodies import COLLECTIONS
from worker.simulator.dataset import Dataset
from worker.simulator.faults import FaultConfig
from worker.simulator.hostile import hostile_items
from worker.simulator.injector import Faults
from worker.simulator.server import RECORDS_PATH, RequestLog, Server
from worker.simulator.stream import DEFAULT_LIMIT, MAX_LIMIT, Stream

__all__ = ["Simulator"]


class Simulator:
    """A local Sequin ``GET /v1/records`` server with a deterministic dataset.

    Base dataset (all a pure function of ``seed``; see :class:`Dataset`): ``records``
    records over ``keys`` distinct ``(collection_id, upstream_id)`` pairs (default
    ``records // 5``), in the collections stripe:subscription, stripe:customer,
    salesforce:task, salesforce:contact, hubspot:deal, with one ``sync_id`` per
    provider; ``data`` is an object of roughly ``record_size`` bytes.  With
    ``append_rate`` > 0, live mode appends that many records per second while serving.

    ``faults`` may be replaced or mutated while serving; ``request_log`` lists
    every request, appended just before its answer is sent (so a client that
    has an answer finds its request logged).  The server is a
    ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive.  Raises ValueError
    for an empty token or a negative count or rate.
    """

    def __init__(
        self,
        *,
        token: str = "dev-token",  # noqa: S107 -- a local development token, by design
        seed: int = 0,
        records: int = 1000,
        keys: int | None = None,
        record_size: int = 800,
        faults: FaultConfig | None = None,
        append_rate: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not token:
            raise ValueError("token must not be empty")
        if append_rate < 0:
            raise ValueError("append_rate must be >= 0")
        self.token = token
        self.seed = seed
        self.host = host
        self.port = port
        self.append_rate = append_rate
        self.record_size = record_size
        self._dataset = Dataset(seed, records, keys, record_size)
        self._stream = Stream(self._dataset)
        self._faults = Faults(faults)
        self.request_log = RequestLog()

        self._server: Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._live_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Simulator:
        """Bind and serve in a background thread (and start live mode if enabled).

        Raises OSError if the address cannot be bound, RuntimeError if already started.
        """
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        self._server = Server(
            (self.host, self.port),
            stream=self._stream,
            token=self.token,
            faults=self._faults,
            log=self.request_log,
            stopping=self._stopping,
        )
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="sequin-simulator",
            daemon=True,
        )
        self._serve_thread.start()
        if self.append_rate > 0:
            self._live_thread = threading.Thread(
                target=self._live_loop, name="sequin-simulator-live", daemon=True
            )
            self._live_thread.start()
        return self

    def stop(self) -> None:
        """Stop live mode and the server, closing open keep-alive connections.

        Idempotent.  Records added so far are kept (the object stays queryable).
        """
        self._stopping.set()
        if self._live_thread is not None:
            self._live_thread.join()
            self._live_thread = None
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join()
            self._serve_thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _live_loop(self) -> None:
        """Append ``append_rate`` records/second stamped "now" until stopped."""
        rate = self.append_rate
        interval = min(0.1, max(0.005, 1.0 / rate))
        owed = 0.0
        last = time.monotonic()
        while not self._stopping.wait(interval):
            now = time.monotonic()
            owed += (now - last) * rate
            last = now
            count = int(owed)
            owed -= count
            if count:
                self._stream.append_live(count)

    # ------------------------------------------------------------------ properties

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server (without ``/v1/records``)."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        if ":" in host_text:  # IPv6 literal
            host_text = f"[{host_text}]"
        return f"http://{host_text}:{port}"

    @property
    def records_url(self) -> str:
        """The full endpoint URL, ``base_url + "/v1/records"``."""
        return self.base_url + RECORDS_PATH

    @property
    def connection_count(self) -> int:
        """TCP connections accepted so far (to check that clients keep them alive)."""
        return self._server.accepted if self._server is not None else 0

    @property
    def faults(self) -> FaultConfig:
        """The live fault configuration (mutable; see :class:`FaultConfig`)."""
        return self._faults.config

    @faults.setter
    def faults(self, value: FaultConfig) -> None:
        # A new configuration restarts the fault RNG from its seed, so a test that
        # switches faults on gets the same sequence every run.
        self._faults.config = value

    @property
    def sync_ids(self) -> dict[str, str]:
        """The base dataset's ``sync_id`` per provider slug."""
        return dict(self._dataset.sync_ids)

    @property
    def collections(self) -> list[str]:
        """The base dataset's collection ids."""
        return [c.name for c in COLLECTIONS]

    # ------------------------------------------------------------------ the stream

    def make_record(
        self,
        collection_id: str,
        upstream_id: str,
        upstream_updated_at: str,
        data: Mapping[str, Any] | None = None,
        *,
        deleted: bool = False,
        sync_id: str | None = None,
        created_at: str | None = None,
    ) -> dict[str, Any]:
        """Build a well-formed record for :meth:`append`; see :meth:`Stream.make_record`."""
        return self._stream.make_record(
            collection_id,
            upstream_id,
            upstream_updated_at,
            data,
            deleted=deleted,
            sync_id=sync_id,
            created_at=created_at,
        )

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Add well-formed records by timestamp; see :meth:`Stream.append` (ValueError)."""
        self._stream.append(records)

    def append_raw(self, fragment: str | bytes, sort_ts: str | None = None) -> None:
        """Add a raw JSON text fragment, served verbatim; see :meth:`Stream.append_raw`."""
        self._stream.append_raw(fragment, sort_ts)

    def append_hostile(
        self, kinds: Iterable[str] | None = None, sort_ts: str | None = None
    ) -> list[bytes]:
        """Append the :data:`~worker.simulator.hostile.HOSTILE_ITEMS` named in ``kinds``
        (default: all), in that order, each as one raw item (see :meth:`append_raw`);
        returns the bytes appended.  ValueError for an unknown name (nothing appended)."""
        items = hostile_items(kinds)
        for item in items:
            self._stream.append_raw(item, sort_ts)
        return items

    def page(
        self,
        after_cursor: str | None = None,
        limit: int = DEFAULT_LIMIT,
        *,
        sync_id: str | None = None,
        provider: str | None = None,
        collection: str | None = None,
    ) -> bytes:
        """The response body ``GET /v1/records`` would send for these parameters.

        In-process access for benchmarks and debugging (no HTTP, no faults, no
        auth).  Raises ValueError for an invalid cursor or limit.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        flt = self._stream.make_filter(sync_id, provider, collection)
        return self._stream.page(after_cursor, limit, flt)

    def expected_state(
        self,
        sync_id: str | None = None,
        provider: str | None = None,
        collection: str | None = None,
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The last version of every key, as served; see :meth:`Stream.expected_state`."""
        return self._stream.expected_state(self._stream.make_filter(sync_id, provider, collection))

    def record_count(
        self,
        sync_id: str | None = None,
        provider: str | None = None,
        collection: str | None = None,
        *,
        include_raw: bool = False,
    ) -> int:
        """How many records a full drain returns now; see :meth:`Stream.record_count`."""
        flt = self._stream.make_filter(sync_id, provider, collection)
        return self._stream.record_count(flt, include_raw=include_raw)
