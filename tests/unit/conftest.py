"""The unit tier opens no sockets: any attempt to connect fails the test at once.

Unit tests run the pure rules and the loop against in-memory fakes; a test that needs
Postgres or the simulator belongs in ``tests/integration``."""

from __future__ import annotations

import socket
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a unit test opened a connection to {args!r}: not a unit test")

    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, name, refuse)
