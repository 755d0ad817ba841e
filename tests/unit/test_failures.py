"""Failure classification, what to fix, the retry budget: pure tables, no database."""

from __future__ import annotations

import pytest

from worker.failures import FAILURE_CLASSES, RetryBudget, classify, what_to_fix


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        (None, "connection_lost"),  # libpq: could not connect, connection closed
        ("08006", "connection_lost"),  # connection_failure
        ("08001", "connection_lost"),
        ("57P01", "connection_lost"),  # admin_shutdown (pg_terminate_backend)
        ("57P03", "connection_lost"),  # cannot_connect_now
        ("25P03", "connection_lost"),  # idle_in_transaction_session_timeout
        ("25006", "connection_lost"),  # read-only: a standby after a failover
        ("53300", "connection_lost"),  # too_many_connections
        ("40001", "transient"),  # serialization_failure
        ("40P01", "transient"),  # deadlock_detected
        ("55P03", "transient"),  # lock_not_available (lock_timeout)
        ("57014", "resource"),  # query_canceled (statement_timeout)
        ("53100", "resource"),  # disk_full
        ("53200", "resource"),  # out_of_memory
        ("54000", "resource"),  # program_limit_exceeded
        ("58030", "resource"),  # io_error
        ("42501", "permanent"),  # insufficient_privilege
        ("42P01", "permanent"),  # undefined_table
        ("42703", "permanent"),  # undefined_column
        ("3D000", "permanent"),  # invalid_catalog_name
        ("3F000", "permanent"),  # invalid_schema_name
        ("28P01", "permanent"),  # invalid_password
        ("23514", "permanent"),  # check_violation (a constraint added by someone)
        ("57P04", "permanent"),  # database_dropped
        ("XX001", "permanent"),  # data_corrupted
        ("XX000", "transient"),  # internal_error: unknown, retried under the budget
        ("zz999", "transient"),
    ],
)
def test_classification_by_sqlstate(sqlstate: str | None, expected: str) -> None:
    assert classify(sqlstate) == expected
    assert expected in FAILURE_CLASSES


def test_each_permanent_failure_says_what_to_fix() -> None:
    assert "GRANT" in what_to_fix("42501").upper()
    assert "SEQUIN_DB_SCHEMA" in what_to_fix("42P01")
    assert "DATABASE_URL" in what_to_fix("3D000")
    assert "DATABASE_URL" in what_to_fix("28P01")
    assert what_to_fix("99999")  # never empty


def test_the_budget_is_reset_only_by_success_and_permanent_gives_up_at_once() -> None:
    budget = RetryBudget(max_retries=2, initial=0.001)
    assert [budget.decide("transient").give_up for _ in range(3)] == [False, False, True]
    budget.succeeded()
    first = budget.decide("resource")
    assert not first.give_up and first.split and first.attempt == 1
    assert budget.decide("permanent").give_up
    forever = RetryBudget(max_retries=None)
    assert not any(forever.decide("connection_lost").give_up for _ in range(100))
    assert max(forever.decide("connection_lost").wait for _ in range(5)) <= 30.0
