"""Operator-facing pure rules: durations, view names and types, the progress line. No sockets."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from structlog.testing import capture_logs

from worker.pg.views import infer_type, plan_columns, sanitise_name, view_name
from worker.status import Progress, human_duration
from worker.sync import LoopState, Totals


def test_human_duration() -> None:
    assert [human_duration(s) for s in (None, 5, 600, 7200, 86400 * 3)] == [
        "-",
        "5 s",
        "10 min",
        "2.0 h",
        "3 d",
    ]


def test_view_rules_are_pure() -> None:
    assert view_name("stripe:subscription") == "stripe_subscription"
    assert view_name("Sales-Force:Task Item") == "sales_force_task_item"
    assert view_name('x"; drop table y;--') == "x_drop_table_y"
    assert view_name("records") == "records_view"
    assert sanitise_name("9lives") == "_9lives"
    assert sanitise_name("日本") == "col"
    assert len(sanitise_name("a" * 200)) == 63
    assert infer_type({"number"}, True) == "numeric"
    assert infer_type({"string"}, True) == "timestamptz"
    assert infer_type({"string"}, False) == "text"
    assert infer_type({"string", "null"}, False) == "text"
    assert infer_type({"object"}, True) == "jsonb"
    assert infer_type({"array", "string"}, False) == "jsonb"
    assert infer_type({"number", "string"}, False) == "text"
    assert infer_type({"null"}, True) == "text"
    cols = plan_columns(
        [("upstream_id", "string", False), ("A b", "number", True), ("a_b", "boolean", True)]
    )
    assert [(c.name, c.key, c.pg_type) for c in cols] == [
        ("a_b", "A b", "numeric"),
        ("a_b_2", "a_b", "boolean"),
        ("data_upstream_id", "upstream_id", "text"),
    ]


def test_progress_event_in_json_mode() -> None:
    totals, state = Totals(), LoopState()
    totals.received, totals.dead_lettered = 1234, 2
    state.newest_applied = datetime.now(UTC) - timedelta(hours=3)
    with capture_logs() as logs:
        Progress(totals, state, tty=False).emit()
    (event,) = logs
    assert event["event"] == "progress"
    assert event["records"] == 1234 and event["dead_lettered"] == 2
    assert 3 * 3600 - 5 < event["lag_s"] < 3 * 3600 + 5


def test_progress_line_on_a_tty() -> None:
    out = io.StringIO()
    totals, state = Totals(), LoopState()
    totals.received = 5000
    state.newest_applied = datetime.now(UTC) - timedelta(days=2)
    Progress(totals, state, tty=True, stream=out).emit()
    line = out.getvalue()
    assert line.startswith("\r\x1b[K") and "5,000 records" in line and "2 d behind now" in line
    assert "%" not in line  # no fake percentage: the API gives no total
