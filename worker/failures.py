"""Database failures: the class of each error, the action it gets and the budget it spends.

This module is the one owner of that policy; the sync loop and the migration step both go
through :class:`RetryBudget`. It knows nothing of psycopg: errors are classified by their
SQLSTATE (``None`` when libpq gave none: a connection that failed or broke).

===============  ===========================================  ========================
class            action                                       examples (SQLSTATE)
===============  ===========================================  ========================
connection_lost  reconnect, re-read the cursor, resume        08xxx, 57P01-03, 25P03,
                                                              25006 (a standby after a
                                                              failover), no SQLSTATE
transient        roll back, retry the same pages               40001, 40P01, 55P03, 55006
resource         roll back, retry with the batch halved        57014 (statement timeout),
                 (down to one page)                           53xxx (disk full, memory),
                                                              54xxx, 58xxx
permanent        stop at once: exit 6 with what to fix        42xxx (privilege, missing
                                                              table), 28xxx, 3D000, 3F000,
                                                              22xxx, 23xxx, 0Axxx, XX001
===============  ===========================================  ========================

:class:`FailureHandler` applies the policy for the loop and the migration step alike (log,
report, wait).

Budget: consecutive failures while the same batch is pending, counted across reconnects and
reset only by a commit. The wait before each retry grows with that count (exponential with
jitter, capped). ``backfill`` stops after ``SEQUIN_MAX_RETRIES`` of them (exit 6); ``run``
retries for ever, but reports how long the batch has been failing (metric and /healthz).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from worker.errors import DatabaseRefused, DatabaseUnavailable, StoreFailure
from worker.errors import FailureClass as FailureClass

log = structlog.get_logger("worker.failures")

FAILURE_CLASSES: tuple[FailureClass, ...] = (
    "connection_lost",
    "transient",
    "resource",
    "permanent",
)

# Exact SQLSTATEs first, then two-character SQLSTATE classes; anything else is transient
# (retried under the budget: an unknown error must neither stop `run` at once nor be
# retried silently, and the budget, the log and /healthz make it visible).
_EXACT: dict[str, FailureClass] = {
    "57P01": "connection_lost",  # admin_shutdown (server restart, pg_terminate_backend)
    "57P02": "connection_lost",  # crash_shutdown
    "57P03": "connection_lost",  # cannot_connect_now (starting up, recovering)
    "25P03": "connection_lost",  # idle_in_transaction_session_timeout: session closed
    "25P04": "connection_lost",  # transaction_timeout (Postgres 17): session closed
    "25006": "connection_lost",  # read_only_sql_transaction: a standby; reconnect may reach
    #                              the new primary after a failover
    "53300": "connection_lost",  # too_many_connections: refused at connect
    "57P04": "permanent",  # database_dropped
    "55P03": "transient",  # lock_not_available (lock_timeout)
    "55006": "transient",  # object_in_use
    "57014": "resource",  # query_canceled: statement_timeout (a cancel on shutdown is not
    #                       counted: the loop checks its stop event first)
    "XX001": "permanent",  # data_corrupted
    "XX002": "permanent",  # index_corrupted
}
_BY_CLASS: dict[str, FailureClass] = {
    "08": "connection_lost",  # connection_exception
    "40": "transient",  # transaction_rollback: serialization_failure, deadlock_detected
    "53": "resource",  # insufficient_resources: disk_full, out_of_memory
    "54": "resource",  # program_limit_exceeded: a smaller batch may fit
    "58": "resource",  # system_error: io_error
    "42": "permanent",  # syntax_error_or_access_rule_violation: privilege, missing table
    "28": "permanent",  # invalid_authorization_specification
    "3D": "permanent",  # invalid_catalog_name
    "3F": "permanent",  # invalid_schema_name
    "22": "permanent",  # data_exception outside the row-by-row fallback
    "23": "permanent",  # integrity_constraint_violation (a constraint added by someone)
    "0A": "permanent",  # feature_not_supported
    "2B": "permanent",  # dependent_privilege_descriptor_still_exists
    "44": "permanent",  # with_check_option_violation
    "P0": "permanent",  # plpgsql raise (a trigger added by someone)
}


def classify(sqlstate: str | None) -> FailureClass:
    """The failure class of a database error with this SQLSTATE (``None``: no server error,
    i.e. the connection could not be opened or was lost)."""
    if not sqlstate:
        return "connection_lost"
    code = sqlstate.upper()
    return _EXACT.get(code) or _BY_CLASS.get(code[:2], "transient")


# What the operator should do about a permanent failure, by SQLSTATE (exact, then class).
_FIXES: dict[str, str] = {
    "42501": (
        "grant the role in DATABASE_URL USAGE and CREATE on the schema (SEQUIN_DB_SCHEMA) and "
        "SELECT, INSERT, UPDATE, DELETE on its tables, or use the role that owns them"
    ),
    "42P01": (
        "a table the worker needs is missing from SEQUIN_DB_SCHEMA: restore it, or drop the "
        "schema so that the worker creates it again (its rows are then synced again)"
    ),
    "3F000": "the schema in SEQUIN_DB_SCHEMA is missing: run `sequin-worker migrate`",
    "3D000": "the database named in DATABASE_URL does not exist: create it or fix the URL",
    "57P04": "the database was dropped: create it again or fix DATABASE_URL",
    "28": "the server refused the credentials in DATABASE_URL: fix the role or password",
    "42": (
        "the worker's tables differ from what it expects (changed by hand?): check "
        "SEQUIN_DB_SCHEMA and restore them"
    ),
    "23": "a constraint added to the worker's tables refuses its rows: drop the constraint",
    "P0": "a trigger on the worker's tables refuses its rows: fix or drop the trigger",
}


def what_to_fix(sqlstate: str | None) -> str:
    """A one-line instruction for a permanent failure with this SQLSTATE."""
    code = (sqlstate or "").upper()
    return (
        _FIXES.get(code)
        or _FIXES.get(code[:2])
        or "fix the cause named above, then start the worker again"
    )


# The one backoff's shape: the first wait (before jitter) and its ceiling, in seconds.
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0


def backoff_delay(
    attempt: int, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_CAP
) -> float:
    """Wait before retry ``attempt`` (1-based): exponential up to ``cap``, with jitter so that
    several workers do not retry in step. The one backoff: database retries (here) and API
    retries (:mod:`worker.api`) both use it."""
    return min(cap, initial * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after one failure: give up (and why), or wait and retry."""

    give_up: bool
    attempt: int
    wait: float = 0.0
    split: bool = False
    reason: str = ""


@dataclass
class RetryBudget:
    """Counts consecutive failures of the pending work; :meth:`decide` is the policy.

    ``max_retries`` (``None``: never give up) bounds the retries after the first attempt.
    :meth:`succeeded` is called after a commit and nothing else resets the count, so a batch
    that fails on every connection still spends the budget and backs off further each time.
    """

    max_retries: int | None
    initial: float = BACKOFF_INITIAL
    cap: float = BACKOFF_CAP
    failures: int = 0

    def decide(self, failure_class: FailureClass) -> Decision:
        """Record one failure of ``failure_class`` and return what to do next."""
        self.failures += 1
        if failure_class == "permanent":
            return Decision(give_up=True, attempt=self.failures, reason="permanent")
        if self.max_retries is not None and self.failures > self.max_retries:
            return Decision(give_up=True, attempt=self.failures, reason="budget")
        return Decision(
            give_up=False,
            attempt=self.failures,
            wait=backoff_delay(self.failures, self.initial, self.cap),
            split=failure_class == "resource",
        )

    def succeeded(self) -> None:
        self.failures = 0


class Health(Protocol):
    """What :class:`FailureHandler` writes for health checks (``worker.sync.LoopState``)."""

    failing_since: float | None
    failure_class: str | None

    def beat(self, status: str | None = None) -> None: ...


class FailureHandler:
    """What happens after a database failure, for the loop and the migration step alike.

    :meth:`failed` classifies (the class comes with the :class:`StoreFailure`), spends the
    budget (:class:`RetryBudget`), logs ``db_retry``, reports the failure through
    ``on_failure(class, seconds_failing)``, then waits the backoff (cut short by ``stop``).
    It raises :class:`DatabaseRefused` for a permanent failure and
    :class:`DatabaseUnavailable` when the budget is spent. :meth:`recovered` ends the run of
    failures (after a commit, or when nothing is pending any more).
    """

    def __init__(
        self,
        max_retries: int | None,
        stop: threading.Event,
        state: Health,
        *,
        on_failure: Callable[[FailureClass, float], None] | None = None,
        backoff: float = BACKOFF_INITIAL,
    ) -> None:
        self.budget = RetryBudget(max_retries, initial=backoff)
        self._stop = stop
        self._state = state
        self._on_failure = on_failure

    def failed(self, exc: StoreFailure, *, pages: int = 0) -> Decision:
        cls = exc.failure_class
        decision = self.budget.decide(cls)
        now = time.monotonic()
        if self._state.failing_since is None:
            self._state.failing_since = now
        self._state.failure_class = cls
        failing = now - self._state.failing_since
        if self._on_failure is not None:
            self._on_failure(cls, failing)
        if decision.give_up:
            log.error(
                "db_gave_up",
                **{"class": cls},
                reason=str(exc),
                sqlstate=exc.sqlstate,
                attempt=decision.attempt,
                failing_s=round(failing, 3),
            )
            if decision.reason == "permanent":
                raise DatabaseRefused(f"{exc}; {what_to_fix(exc.sqlstate)}") from None
            raise DatabaseUnavailable(
                f"the database kept failing ({decision.attempt} attempts over "
                f"{failing:.0f} s, last: {cls}): {exc}"
            ) from None
        log.warning(
            "db_retry",
            **{"class": cls},
            reason=str(exc),
            sqlstate=exc.sqlstate,
            attempt=decision.attempt,
            wait_s=round(decision.wait, 3),
            failing_s=round(failing, 3),
            pages=pages,
        )
        self._state.beat("db_retry")
        self._stop.wait(decision.wait)
        return decision

    def recovered(self) -> None:
        self.budget.succeeded()
        self._state.failing_since = None
        self._state.failure_class = None
