"""The operations endpoint of ``run``: ``/metrics``, ``/healthz``, ``/readyz``.

(Named ``ops`` rather than ``http`` so that it never shadows the standard library.)

* ``/metrics``: Prometheus exposition of :class:`worker.metrics.Metrics`.
* ``/healthz``: liveness. 200 while the loop's heartbeat is fresh, which it is whenever the
  loop makes progress or is deliberately waiting (caught up, backing off, standing by);
  503 when the heartbeat is older than the timeout (the loop is stuck), or when the
  database has been failing for longer than the timeout (the loop keeps retrying, but an
  orchestrator should see it: the batch makes no progress).
* ``/readyz``: 200 once migrations are applied and the database answers a query.

The server runs on a daemon thread and never touches the sync loop's state except to read
it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from worker.metrics import CONTENT_TYPE, Metrics
from worker.sync import LoopState


class OpsServer:
    """Serves the three endpoints on ``host:port`` (port 0: any free port)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        state: LoopState,
        db_ping: Callable[[], bool],
        heartbeat_timeout: float,
    ) -> None:
        self.metrics = metrics
        self.state = state
        self.db_ping = db_ping
        self.heartbeat_timeout = heartbeat_timeout
        # Evaluated at each scrape: one short database ping (<= about 2 s), like a probe.
        metrics.ready.set_function(lambda: 1.0 if self.ready()[0] == 200 else 0.0)
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def health(self) -> tuple[int, dict[str, object]]:
        age = time.monotonic() - self.state.heartbeat
        body: dict[str, object] = {
            "status": self.state.status,
            "heartbeat_age_s": round(age, 3),
            "leader": self.state.leader,
            "caught_up": self.state.caught_up,
            "cursor": self.state.cursor,
        }
        if age > self.heartbeat_timeout:
            body["error"] = f"no loop heartbeat for {age:.0f} s"
            return 503, body
        since = self.state.failing_since
        if since is not None:
            failing = time.monotonic() - since
            body["failing_s"] = round(failing, 3)
            body["failure_class"] = self.state.failure_class
            if failing > self.heartbeat_timeout:
                body["error"] = (
                    f"the database has been failing for {failing:.0f} s "
                    f"({self.state.failure_class})"
                )
                return 503, body
        return 200, body

    def ready(self) -> tuple[int, dict[str, object]]:
        if not self.state.migrated:
            return 503, {"ready": False, "reason": "migrations not applied yet"}
        if not self.db_ping():
            return 503, {"ready": False, "reason": "database does not answer"}
        return 200, {"ready": True}


def _make_handler(ops: OpsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sequin-worker"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, ops.metrics.render(), CONTENT_TYPE)
            elif path == "/healthz":
                self._json(*ops.health())
            elif path == "/readyz":
                self._json(*ops.ready())
            else:
                self._json(404, {"error": "not found"})

        def _json(self, status: int, body: dict[str, object]) -> None:
            self._send(status, orjson.dumps(body), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would drown the event log

    return Handler
