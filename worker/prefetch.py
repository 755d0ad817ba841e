"""The prefetch thread of a sync session: fetch, parse and check pages ahead of the writer.

The next request needs only the previous response's cursor, so fetching overlaps writing;
a bounded queue keeps memory flat. Every page is parsed (:func:`worker.records.parse_page`)
and checked by the session's :class:`worker.paging.Paginator` before it is queued.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from worker.errors import Stopped
from worker.model import ParsedPage
from worker.paging import Paginator, poll_delay
from worker.ports import Source
from worker.records import parse_page

Mode = Literal["run", "backfill"]


@dataclass(slots=True)
class Fetched:
    page: ParsedPage
    caught_up: bool


class Prefetcher:
    """Fetches and validates pages ahead of the writer on a daemon thread.

    Items on :attr:`queue` are :class:`Fetched` pages in stream order, or the exception that
    ended the thread. The queue is bounded by ``depth`` pages. The fetch cursor and the checks
    of the pagination contract belong to ``paginator`` (the prefetcher holds no cursor of its
    own); ``on_progress`` is called after each page fetched and during poll waits (the
    heartbeat).
    """

    def __init__(
        self,
        source: Source,
        paginator: Paginator,
        *,
        mode: Mode,
        poll_interval: float,
        depth: int,
        stop: threading.Event,
        on_progress: Callable[[], object] | None = None,
    ) -> None:
        self.queue: queue.Queue[Fetched | BaseException] = queue.Queue(maxsize=depth)
        self._source = source
        self._paginator = paginator
        self._on_progress = on_progress
        self._mode = mode
        self._poll_interval = poll_interval
        self._stop = stop
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def halt(self) -> None:
        """Stop fetching at once: the request in flight or the retry wait is aborted and the
        thread exits. Its source is closed by the thread itself, never shared with a later
        prefetcher."""
        self._halt.set()
        self._source.abort()

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _beat(self) -> None:
        if self._on_progress is not None:
            self._on_progress()

    def _wait(self, seconds: float) -> bool:
        """A deliberate wait (beating); True if told to stop meanwhile."""
        end = time.monotonic() + seconds
        while not self._stopping():
            self._beat()
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._halt.wait(min(left, 0.25))
        return True

    def _stopping(self) -> bool:
        return self._halt.is_set() or self._stop.is_set()

    def _put(self, item: Fetched | BaseException) -> bool:
        while not self._stopping():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        paginator = self._paginator
        try:
            while not self._stopping():
                page = self._source.fetch_page(paginator.cursor)
                parsed = parse_page(
                    page.records,
                    cursor=page.cursor,
                    after_cursor=page.after_cursor,
                    raw_texts=page.raw_texts,
                )
                step = paginator.advance(page, parsed)  # before the page can be applied
                self._beat()
                if not self._put(Fetched(parsed, caught_up=step == "caught_up")):
                    return
                if step == "caught_up":
                    if self._mode == "backfill":
                        return
                    if self._wait(poll_delay(self._poll_interval)):
                        return
        except Stopped:
            # The source was told to stop (the process's stop event may reach it before the
            # relay sets this session's): the writer sees its own stop; nothing to report.
            return
        except BaseException as exc:
            if not self._stopping():
                self._put(exc)
        finally:
            self._source.close()
