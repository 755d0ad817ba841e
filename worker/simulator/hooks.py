"""What a fault mode is: the hooks it overrides, what it sees of the server, how it is found.

The modes themselves are declared in :mod:`worker.simulator.faults`; this module holds the
interface they implement (:class:`Fault`, :class:`Reply`), the :class:`Group` that says when
a mode is rolled, and the :class:`Flag` that sets a mode's knob from the command line.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple, Protocol

from worker.simulator.stream import PageQuery

if TYPE_CHECKING:  # only a type here: faults.py imports this module
    from worker.simulator.faults import FaultConfig

__all__ = ["NO_FAULT", "Fault", "Flag", "Group", "Reply"]


class Reply(Protocol):
    """The server's side of one exchange, as a fault sees it (see server._Handler).

    ``log`` must be called before anything is sent, so that a client holding an
    answer always finds its request in the request log.
    """

    received: float  # time.monotonic() when the request arrived

    def log(self, status: int | str, retry_after: float | None = None) -> None:
        """Record the request with ``status`` (an HTTP status or a fault's name)."""

    def head(
        self,
        status: int,
        length: int,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bytes:
        """The status line and headers of an answer with ``Content-Length: length``."""

    def write(self, data: bytes) -> bool:
        """Put raw bytes on the wire now; False if the client has gone away."""

    def idle(self, seconds: float) -> bool:
        """Wait ``seconds``; False (at once) if the server is stopping or the client left."""

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
        cut: int | None = None,
    ) -> None:
        """``write(head(...) + body[:cut])``: a full Content-Length, maybe less body."""

    def send_api_error(
        self, status: int, code: str, message: str, *, extra: dict[str, str] | None = None
    ) -> None:
        """Send the API's JSON error body."""

    def hang_up(self) -> None:
        """Close the connection after this exchange (before ``send``: says so in a header)."""

    def reason(self, status: int) -> str:
        """The reason phrase of ``status`` (``"Service Unavailable"``)."""


class Fault:
    """A fault decided for one request.  A mode overrides the hooks it needs.

    Hooks, in the order a request meets them: ``answer`` (for a mode of an ``arrival``
    group), ``shape_page`` (for a mode of a ``page`` group), ``deliver``.
    """

    rate: ClassVar[str]  # the FaultConfig field holding this mode's probability
    # How the request log names a 200 this fault altered, when no fault changed how the
    # answer went out (a page fault's name; see shape_page).
    label: ClassVar[str | None] = None

    @classmethod
    def decide(cls, rng: random.Random, config: FaultConfig, query: PageQuery | None) -> Fault:
        """This mode's fault for one request; draws its own choices from ``rng``.

        ``query`` is the page being served for a mode of a ``page`` group, else None.
        """
        return cls()

    def answer(self, reply: Reply, config: FaultConfig) -> bool:
        """Answer in place of the server and return True, or return False to go on."""
        return False

    def shape_page(self, query: PageQuery, earlier: str | None) -> bytes | None:
        """The body of a page this fault alters, or None to serve the true page.

        ``earlier`` is the latest cursor a request sent before the one of ``query``
        (from any client; None if there is none).  Return None when the fault cannot
        apply to this page: the page is then served and logged as not faulty.
        """
        return None

    def deliver(
        self,
        reply: Reply,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bool:
        """Send the server's answer (status and body) another way and return True, or
        return False to let the faults rolled before this one (and then the server) send it.

        A request's faults are asked latest rolled first.
        """
        return False


NO_FAULT = Fault()  # the hooks' defaults: a request answered as it should be


class Group(NamedTuple):
    """Modes drawn together: one draw of the fault RNG picks at most one of them.

    Their rates are tried in order from that draw (so their sum must not exceed 1).  An
    ``arrival`` group is rolled when the request arrives, if no group before it answered;
    a ``page`` group when a valid page query is about to be served.  A group is drawn only
    when one of its rates is set, unless ``always``.
    """

    stage: Literal["arrival", "page"]
    modes: tuple[type[Fault], ...]
    always: bool = False


class Flag(NamedTuple):
    """A command-line flag setting one FaultConfig field to its value divided by ``per``.

    Without ``parse``, a switch: present, the field is True.
    """

    flag: str
    field: str
    parse: Callable[[str], float] | None
    help: str
    per: float = 1.0  # flag units per field unit (1000 for a flag in ms of a field in s)
