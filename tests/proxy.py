"""A TCP proxy that can black-hole its connections, to test waits on a silent peer.

``pg_terminate_backend`` ends a session with a clean FIN or RST: the client notices at
once. A partition, a frozen host or a stuck middlebox says nothing at all; that is what
:meth:`BlackHoleProxy.blackhole` models. From then on no byte is forwarded in either
direction, yet every socket stays open: no RST, no FIN. The kernel still acknowledges what
arrives (the proxy just stops reading), so TCP keepalives and ``tcp_user_timeout`` are
answered too; only a deadline kept by the peer itself ends its wait. Connections made
while black-holed are accepted and then ignored the same way.

:meth:`resume` forwards again (what was held back flows on), :meth:`close` drops everything.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class BlackHoleProxy:
    """Listens on 127.0.0.1 (a free port) and forwards each connection to ``target``: a
    (host, port), or the path of a Unix socket (an embedded Postgres listens on one only)."""

    def __init__(self, target: tuple[str, int] | str = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    # -- control --------------------------------------------------------------------------

    def start(self) -> BlackHoleProxy:
        self._accepter.start()
        return self

    def blackhole(self) -> None:
        """Stop forwarding in both directions; keep every socket open (no RST, no FIN)."""
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed.set()
        self._forwarding.set()  # wake the pumps so that they notice
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()
        for t in threads:
            t.join(5)

    def dsn(self, dsn: str) -> str:
        """``dsn`` pointed at this proxy instead of the server."""
        params = conninfo_to_dict(dsn)
        params.update(host="127.0.0.1", port=str(self.port))
        params.pop("hostaddr", None)
        return make_conninfo(**params)  # type: ignore[arg-type]

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    # -- forwarding -----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = _connect(self.target)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                with self._lock:
                    self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._closed.is_set():
            if not self._forwarding.is_set():
                # Neither read nor write: the peers' data sits unread in the kernel.
                self._forwarding.wait(0.1)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready or not self._forwarding.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except (OSError, ValueError):
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _connect(target: tuple[str, int] | str) -> socket.socket:
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection(target, timeout=5)


def server_address(dsn: str) -> tuple[str, int] | str:
    """Where the server of ``dsn`` listens: (host, port), or its Unix socket's path."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "/var/run/postgresql").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0])
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host, port)


@contextmanager
def blackhole_proxy(
    target: tuple[str, int] | str = ("127.0.0.1", 5432),
) -> Iterator[BlackHoleProxy]:
    proxy = BlackHoleProxy(target).start()
    try:
        yield proxy
    finally:
        proxy.close()
