"""The pagination contract: one owner of the fetch cursor and of every rule that moves it.

The API document says only an empty page means "no more records": after any other page,
short ones included, the next is fetched at once. :class:`Paginator` holds the cursor the
next request starts from and checks every page before it may be applied; a page that would
make the loop spin or go back in the stream raises :class:`ProtocolViolation` (exit 4).
Pure: no I/O, no clock; :func:`poll_delay` is the wait after a caught-up page.
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Literal

from worker.errors import ProtocolViolation
from worker.model import Page, ParsedPage

Step = Literal["more", "caught_up"]


def next_step(page: Page) -> Step:
    """Pure pagination rule: what to do after ``page``.

    Only an empty page means caught up. A non-empty page that hands back the cursor it was
    asked with would be fetched forever: refused.
    """
    if page.records and page.cursor == page.after_cursor:
        raise ProtocolViolation(
            f"the API returned {len(page.records)} records but did not advance the cursor"
        )
    return "more" if page.records else "caught_up"


class Paginator:
    """Owns the fetch cursor of one session (:attr:`cursor`: where the next request starts),
    and checks every page against the pagination contract before the page may be applied.
    :meth:`advance` raises :class:`ProtocolViolation` for:

    * a non-empty page that hands back the cursor it was asked with (:func:`next_step`);
    * a cycle: a cursor already handed out in this session (among the last ``memory``);
      following it would apply records again while the stored cursor goes back;
    * a rewind: a page that starts with a record older than the last record of the
      previous non-empty page (the stream is ordered by ``upstream_updated_at``): the API
      went back to an earlier position, and following it would put the table ahead of the
      stored cursor. Only the page's first record is compared: a single mis-stamped record
      further on is a bad record, not a change of position (per key, the newer version
      still wins in the store), and must not stop the stream.

    The committed cursor is another fact with another owner: the store (read back by
    ``Sink.open_consumer``), mirrored for status in ``LoopState.cursor``.
    """

    def __init__(self, start: str | None, *, memory: int = 1000) -> None:
        self.cursor = start
        self._memory = memory
        self._seen: dict[str, int] = {}  # cursor -> page number, oldest first
        self._pages = 0
        self._last: datetime | None = None
        if start is not None:
            self._remember(start)

    def advance(self, page: Page, parsed: ParsedPage) -> Step:
        """Check ``page`` (and its parsed records), move the cursor, and say what comes next."""
        step = next_step(page)
        if page.cursor != page.after_cursor and page.cursor in self._seen:
            ago = self._pages - self._seen[page.cursor]
            raise ProtocolViolation(
                f"the API handed back a cursor it had already given {ago} page(s) earlier "
                "in this session: following it would apply records again"
            )
        if parsed.records:
            first = parsed.records[0].upstream_updated_at
            if self._last is not None and first < self._last:
                raise ProtocolViolation(
                    f"the API went back in the stream: a page starting with a record of "
                    f"{first.isoformat()} came after one ending with {self._last.isoformat()} "
                    "(records are ordered by upstream_updated_at)"
                )
            self._last = parsed.records[-1].upstream_updated_at
        self._pages += 1
        self._remember(page.cursor)
        self.cursor = page.cursor
        return step

    def _remember(self, cursor: str) -> None:
        self._seen.pop(cursor, None)
        self._seen[cursor] = self._pages
        if len(self._seen) > self._memory:
            del self._seen[next(iter(self._seen))]


def poll_delay(interval: float, rng: random.Random | None = None) -> float:
    """The wait after a caught-up page: ``interval`` with ±20% jitter, so that many workers
    polling one account do not fall into step."""
    r = rng.random() if rng else random.random()
    return interval * (0.8 + 0.4 * r)
