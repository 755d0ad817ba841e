"""The worker's errors: one base class, each error carrying the exit code the CLI ends with.

The CLI has a single ``except WorkerError``: it prints each of :meth:`WorkerError.lines`
(``prefix + str(error)``; one line per problem for :class:`ConfigError`; nothing for
:class:`Stopped`, an ordinary stop) and exits with ``error.exit_code``. Anything else that
reaches it is a bug (exit 1, with a traceback in the log). Messages never hold a secret (the
API token, a database password): they are shown to the operator as they are.

Exit codes: 0 done (or stopped), 1 a bug, 2 configuration, 3 token rejected, 4 request
rejected or the API broke its contract, 5 the API stayed unavailable, 6 the database failed
or refused, 7 the consumer is busy, 8 ``check`` found a problem. A psycopg error never
reaches the CLI: the Postgres adapters translate it into :class:`StoreFailure`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

FailureClass = Literal["connection_lost", "transient", "resource", "permanent"]


class WorkerError(Exception):
    """Base of every expected failure. ``exit_code`` is what the command exits with."""

    exit_code: ClassVar[int] = 1
    prefix: ClassVar[str] = ""

    def lines(self) -> list[str]:
        """What the CLI prints, one line each, after ``sequin-worker: ``."""
        return [f"{self.prefix}{self}"]


class ConfigError(WorkerError):
    """The configuration is unusable. ``problems`` holds one line per variable."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return [f"config: {p}" for p in self.problems]


class SchemaMissing(WorkerError):
    """The configured schema has not been migrated in this database."""

    exit_code = 6


class ConsumerBusy(WorkerError):
    """Another process leads this consumer and the caller asked not to wait."""

    exit_code = 7


class CommandRefused(WorkerError):
    """The command cannot run as asked (a confirmation missing, the ops port taken)."""

    exit_code = 2


class CheckFailed(WorkerError):
    """``sequin-worker check`` found at least one problem (each already printed)."""

    exit_code = 8


# -- the API ----------------------------------------------------------------------------


class ApiError(WorkerError):
    """Base of the API client's errors."""


class TokenRejected(ApiError):
    """401/403: the API does not accept the token."""

    exit_code = 3

    def __init__(self, status: int, message: str) -> None:
        super().__init__(
            f"the Sequin API rejected the token (HTTP {status}: {message}). Check SEQUIN_API_TOKEN."
        )
        self.status = status


class RequestRejected(ApiError):
    """A 4xx other than 401/403/429: the request itself is wrong."""

    exit_code = 4

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the Sequin API refused the request (HTTP {status}): {message}")
        self.status = status


class InvalidRequest(ApiError):
    """The request cannot be sent as configured (no retry can help)."""

    exit_code = 4


class ApiUnavailable(ApiError):
    """Transient failures outlasted the retry budget."""

    exit_code = 5


class Stopped(ApiError):
    """The caller asked to stop while the client was waiting to retry (not a failure: the
    command ends normally)."""

    exit_code = 0


# -- the pagination contract and the database, as the loop sees them ----------------------


class ProtocolViolation(WorkerError):
    """The API answered in a way that would make the loop spin or skip data."""

    exit_code = 4


class DatabaseUnavailable(WorkerError):
    """The database kept failing through the retry budget."""

    exit_code = 6
    prefix = "database: "


class DatabaseRefused(WorkerError):
    """A permanent database failure (a privilege, a missing table): retrying cannot help.
    The message says what to fix."""

    exit_code = 6
    prefix = "database: "


class StoreFailure(WorkerError):
    """A database error, with its class (see :mod:`worker.failures`) and SQLSTATE."""

    exit_code = 6
    prefix = "database: "

    failure_class: FailureClass = "transient"

    def __init__(
        self,
        message: str,
        *,
        failure_class: FailureClass | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        if failure_class is not None:
            self.failure_class = failure_class
        self.sqlstate = sqlstate


class StoreUnavailable(StoreFailure):
    """The database cannot be reached or the connection was lost."""

    failure_class: FailureClass = "connection_lost"


class CursorConflict(WorkerError):
    """Another writer moved this consumer's cursor; the batch was not applied. The loop
    handles it (a new session from the stored cursor); it never reaches the CLI."""

    exit_code = 6


class ConsumerMismatch(WorkerError):
    """The consumer exists with different filters."""

    exit_code = 2
