"""Rolling the faults: the live configuration, the fault RNG, and the faults of one request.

:class:`Faults` is shared by every request; :meth:`Faults.request` hands each request a
:class:`RequestFaults`, which rolls each group of :data:`~worker.simulator.faults.GROUPS`
when the request reaches that group's stage and calls the hooks of what it rolled.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque

from worker.simulator.faults import GROUPS, FaultConfig
from worker.simulator.hooks import NO_FAULT, Fault, Group, Reply
from worker.simulator.stream import PageQuery

__all__ = ["Faults", "RequestFaults"]

_CURSOR_MEMORY = 64  # cursors of recent requests kept for faults that go back


class Faults:
    """The live fault configuration, the RNG that rolls faults, and recent cursors.

    Thread-safe.  Replacing :attr:`config` restarts the RNG from the new seed, so a
    test that switches faults on gets the same sequence every run.
    """

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._config = config if config is not None else FaultConfig()
        self._rng = random.Random(self._config.seed)
        self._lock = threading.Lock()
        # The cursors valid page queries sent, latest last (repeats collapsed).
        self._sent_cursors: deque[str] = deque(maxlen=_CURSOR_MEMORY)

    @property
    def config(self) -> FaultConfig:
        return self._config

    @config.setter
    def config(self, value: FaultConfig) -> None:
        with self._lock:
            self._config = value
            self._rng = random.Random(value.seed)

    def request(self) -> RequestFaults:
        """Sleep the configured latency; then the faults of one request, not yet rolled."""
        if self._config.latency > 0:
            time.sleep(self._config.latency)
        return RequestFaults(self)

    def roll(self, group: Group, query: PageQuery | None = None) -> tuple[Fault, FaultConfig]:
        """One draw for ``group``: the fault it picks (:data:`NO_FAULT` if none), and the
        configuration the fault's hooks are to read.  No draw for a group with no rate set
        (unless ``always``), so that its modes change no other group's sequence."""
        with self._lock:
            config, rng = self._config, self._rng
            rates: list[float] = [getattr(config, mode.rate) for mode in group.modes]
            if not group.always and not any(rate > 0 for rate in rates):
                return NO_FAULT, config
            u = rng.random()
            for mode, rate in zip(group.modes, rates, strict=True):
                if u < rate:
                    return mode.decide(rng, config, query), config
                u -= rate
            return NO_FAULT, config

    def remember(self, sent: str | None) -> str | None:
        """Note the cursor a valid page query sent; return the latest other one before it."""
        with self._lock:
            earlier = next((c for c in reversed(self._sent_cursors) if c != sent), None)
            if sent is not None and (not self._sent_cursors or self._sent_cursors[-1] != sent):
                self._sent_cursors.append(sent)
            return earlier


class RequestFaults:
    """The faults of one request, each group rolled when the request gets that far.

    The server calls :meth:`answer` first, passes :meth:`serve_page` to the stream to
    serve a page, and :meth:`deliver` to send its answer.
    """

    def __init__(self, faults: Faults) -> None:
        self._faults = faults
        self._rolled: list[Fault] = []  # what changed or may change this request's answer

    def answer(self, reply: Reply) -> bool:
        """Roll the ``arrival`` groups in order until a fault answers; True if one did."""
        for group in GROUPS:
            if group.stage == "arrival":
                fault, config = self._faults.roll(group)
                if fault is not NO_FAULT:
                    self._rolled.append(fault)
                if fault.answer(reply, config):
                    return True
        return False

    def serve_page(self, query: PageQuery) -> bytes:
        """The body for a valid page query: rolls the ``page`` groups; the first fault
        that alters the page serves it, else the true page."""
        earlier = self._faults.remember(query.sent)
        body: bytes | None = None
        for group in GROUPS:
            if group.stage == "page":
                fault, _config = self._faults.roll(group, query)
                if body is None and fault is not NO_FAULT:
                    body = fault.shape_page(query, earlier)
                    if body is not None:
                        self._rolled.append(fault)
        return body if body is not None else query.answer()

    def deliver(
        self,
        reply: Reply,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        """Send the server's answer: the latest rolled fault that takes it sends it, or it
        goes out as it is, logged under the label of a fault that altered it if any."""
        for fault in reversed(self._rolled):
            if fault.deliver(reply, status, body, content_type=content_type, extra=extra):
                return
        label = next((f.label for f in reversed(self._rolled) if f.label is not None), None)
        reply.log(label if label is not None else status)
        reply.send(status, body, content_type=content_type, extra=extra)
