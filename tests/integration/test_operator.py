"""Operator experience: status, per-collection views, progress, NOTIFY, check."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest

from tests.conftest import fetch_one
from tests.helpers import backfill, view_columns
from worker.pg.views import view_name
from worker.simulator import Simulator

pytestmark = pytest.mark.sim(seed=31, records=1500)


# -- status ---------------------------------------------------------------------------------


# -- views ----------------------------------------------------------------------------------


def test_views_expose_typed_columns_over_live_rows(sim: Simulator, db: str) -> None:
    ts = "2030-01-01T00:00:00Z"
    sim.append(
        [
            sim.make_record(
                "acme:widget",
                "w1",
                ts,
                {
                    "name": "a",
                    "price": 1.5,
                    "active": True,
                    "made_at": "2029-05-01T10:00:00Z",
                    "tags": ["x"],
                    "meta": {"k": 1},
                },
            ),
            sim.make_record(
                "acme:widget",
                "w2",
                ts,
                {
                    "name": "b",
                    "price": 2,
                    "active": False,
                    "made_at": "2029-05-02T10:00:00+02:00",
                    "tags": [],
                    "meta": None,
                },
            ),
            sim.make_record("acme:widget", "w3", ts, {"name": "gone"}, deleted=True),
        ]
    )
    backfill(sim, db)  # auto views: created when collections appear, refreshed at catch-up
    cols = dict(view_columns(db, "acme_widget"))
    assert cols == {
        "upstream_id": "text",
        "upstream_updated_at": "timestamp with time zone",
        "active": "boolean",
        "made_at": "timestamp with time zone",
        "meta": "jsonb",
        "name": "text",
        "price": "numeric",
        "tags": "jsonb",
    }
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT upstream_id, price, active, made_at FROM sequin.acme_widget ORDER BY 1"
        ).fetchall()
    assert [r[0] for r in rows] == ["w1", "w2"]  # w3 is deleted
    assert float(rows[0][1]) == 1.5 and rows[1][2] is False
    assert rows[1][3] == datetime(2029, 5, 2, 8, 0, tzinfo=UTC)
    for coll in {k[0] for k in sim.expected_state()}:
        assert view_columns(db, view_name(coll)), coll


def test_hostile_names_are_sanitised_and_quoted(sim: Simulator, db: str) -> None:
    evil = 'x"; drop table y;--'
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.y (id int)")
    sim.append(
        [sim.make_record(f"{evil}:{evil}", evil, "2031-01-01T00:00:00Z", {evil: "v", "ok": 1})]
    )
    backfill(sim, db)
    assert fetch_one(db, "SELECT to_regclass('public.y') IS NOT NULL") == (True,)
    name = view_name(f"{evil}:{evil}")
    cols = dict(view_columns(db, name))
    assert cols["x_drop_table_y"] == "text" and cols["ok"] == "numeric"
    with psycopg.connect(db) as conn:
        assert conn.execute(f'SELECT x_drop_table_y FROM sequin."{name}"').fetchall() == [("v",)]


# -- progress -------------------------------------------------------------------------------


# -- notifications --------------------------------------------------------------------------


def test_notify_after_each_commit(sim: Simulator, db: str) -> None:
    listener = psycopg.connect(db, autocommit=True)
    listener.execute("LISTEN sequin_worker")
    backfill(sim, db, SEQUIN_NOTIFY=True, SEQUIN_PAGE_SIZE=500, SEQUIN_BATCH_MAX_RECORDS=500)
    payloads = [json.loads(n.payload) for n in listener.notifies(timeout=1.0)]
    listener.close()
    assert len(payloads) == 3  # 1500 records, one page per batch
    assert all(p["consumer"] == "default" for p in payloads)
    assert payloads[-1]["cursor"] == fetch_one(db, "SELECT cursor FROM sequin.cursors")[0]  # type: ignore[index]
    changed = sum(sum(p["changed"].values()) for p in payloads)
    assert changed > 0 and set().union(*(p["changed"] for p in payloads)) <= {
        k[0] for k in sim.expected_state()
    }


def test_no_notify_when_off(sim: Simulator, db: str) -> None:
    listener = psycopg.connect(db, autocommit=True)
    listener.execute("LISTEN sequin_worker")
    backfill(sim, db)
    assert list(listener.notifies(timeout=0.5)) == []
    listener.close()


# -- check ----------------------------------------------------------------------------------
