"""Bad input through the installed command: hostile pages end to end, exit codes, nothing lost."""

from __future__ import annotations

import json
from decimal import Decimal

import psycopg
import pytest

from tests.conftest import fetch_rows
from tests.helpers import (
    assert_table_matches,
    cursor_row,
    run_cli,
    worker_env,
)
from tests.integration.test_bad_input import (
    EXACT_NUMBERS,
    PAGE,
    ScriptedAPI,
    _squeeze,
    assert_cursor_at_the_end,
    at,
    dead_letters,
    page_body,
    spec_record,
)
from worker.simulator import Simulator

# 200 base records, so the bad ones arrive on a later page (with an after_cursor).
pytestmark = pytest.mark.sim(seed=101, records=200, record_size=200)


def test_a_cursor_rejected_mid_stream_exits_4_keeping_only_what_came_before(
    sim: Simulator, db: str
) -> None:
    """The API accepts two pages, then rejects the cursor it handed out (400): the process
    exits 4 with the server's message, the two pages stay applied, the cursor is the last one
    accepted, and nothing else is applied."""
    pages = {
        None: (page_body([spec_record("m-1", 1), spec_record("m-2", 2)], "p1")),
        "p1": (page_body([spec_record("m-3", 3), spec_record("m-4", 4)], "p2")),
    }
    rejection = b'{"error": {"code": "invalid_cursor", "message": "cursor p2 has expired"}}'

    def answer(after: str | None, n: int) -> tuple[int, bytes]:
        if after in pages:
            return 200, pages[after]
        return 400, rejection

    with ScriptedAPI(answer) as api:
        env = worker_env(sim, db, SEQUIN_BASE_URL=api.base_url, SEQUIN_PAGE_SIZE="2")
        proc = run_cli(["backfill"], env, timeout=60)

    assert proc.returncode == 4, proc.stderr
    assert "HTTP 400" in proc.stderr and "cursor p2 has expired" in proc.stderr
    assert "Traceback" not in proc.stderr and "backfill complete" not in proc.stdout
    assert [r.get("after_cursor") for r in api.requests] == [None, "p1", "p2"]
    assert {uid for _, uid in fetch_rows(db)} == {"m-1", "m-2", "m-3", "m-4"}
    row = cursor_row(db)
    assert row.cursor == "p2" and row.records_applied == 4
    assert dead_letters(db) == []


def test_a_big_integer_next_to_an_out_of_range_number_does_not_block_the_stream(
    sim: Simulator, db: str
) -> None:
    """One record whose ``data`` holds both an integer beyond 64 bits and ``1e400``: the rest
    of its page must still land and the stream go on (the record stored exactly or
    dead-lettered), rather than the database refusing the whole batch on every attempt."""
    fragment = json.dumps(spec_record("mixed-1", 2, data={"big": 0, "huge": 1})).replace(
        '"big": 0, "huge": 1', '"big": 123456789012345678901234, "huge": 1e400'
    )
    sim.append([sim.make_record("stripe:customer", "before", at(1), {"v": 1})])
    sim.append_raw(fragment, sort_ts=at(2))
    sim.append([sim.make_record("stripe:customer", "after", at(3), {"v": 3})])

    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_MAX_RETRIES="1"), timeout=60)

    assert proc.returncode == 0, proc.stderr
    rows = fetch_rows(db)
    assert ("stripe:customer", "after") in rows
    dead = [json.loads(d["raw"]) for d in dead_letters(db)]
    row = rows.get(("stripe:customer", "mixed-1"))
    exact = row is not None and (
        row["data"]["big"] == 123456789012345678901234
        and Decimal(row["data"]["huge"]) == Decimal("1e400")
    )
    assert exact or dead == [json.loads(fragment)]
    assert_cursor_at_the_end(sim, db, rows=sim.record_count() + (0 if dead else 1))


@pytest.mark.parametrize("depth", [300, 600, 1100])
def test_deeply_nested_data_does_not_block_the_stream(sim: Simulator, db: str, depth: int) -> None:
    """``data`` nested ``depth`` levels deep (valid JSON, and jsonb takes it) between two good
    records of one page: the page lands and the run ends 0, with the deep record stored
    exactly or dead-lettered verbatim (a crash with exit 1 would repeat on every restart)."""
    nested = "[" * depth + "]" * depth
    deep = (
        '{"sync_id": null, "collection_id": "stripe:customer", "upstream_id": "deep", '
        f'"upstream_updated_at": "{at(2)}", "deleted": false, "data": {{"d": {nested}}}}}'
    )
    body = (
        '{"records": ['
        + ", ".join(
            (json.dumps(spec_record("before", 1)), deep, json.dumps(spec_record("after", 3)))
        )
        + '], "cursor": "d1"}'
    ).encode()

    def answer(after: str | None, n: int) -> tuple[int, bytes]:
        return 200, (body if after is None else page_body([], "d1"))

    with ScriptedAPI(answer) as api:
        env = worker_env(
            sim, db, SEQUIN_BASE_URL=api.base_url, SEQUIN_PAGE_SIZE="10", SEQUIN_MAX_RETRIES="1"
        )
        proc = run_cli(["backfill"], env, timeout=60)

    assert proc.returncode == 0, proc.stderr[-3000:]
    with psycopg.connect(db) as conn:  # as text: json.loads itself gives up at ~1000 levels
        rows: dict[str, str] = dict(
            conn.execute("SELECT upstream_id, data::text FROM sequin.records").fetchall()
        )
        raws = [r[0] for r in conn.execute("SELECT raw FROM sequin.dead_letters").fetchall()]
    assert {"before", "after"} <= rows.keys()
    stored = _squeeze(rows.get("deep") or "") == _squeeze(f'{{"d": {nested}}}')
    assert stored or [_squeeze(r) for r in raws] == [_squeeze(deep)]
    assert cursor_row(db).cursor == "d1"


@pytest.mark.parametrize("companion", [b"null", b'"a string item"', b"[1]"])
def test_numbers_are_exact_whatever_else_the_page_holds(
    sim: Simulator, db: str, companion: bytes
) -> None:
    """One non-object item on a page must not change how the other records' numbers are read:
    each valid record's ``data`` reaches jsonb equal to the text sent (compared by Postgres),
    and the odd item is dead-lettered with its text."""
    sent: dict[str, str] = {}
    for i, number in enumerate(EXACT_NUMBERS):
        data = f'{{"n": {number}, "list": [{number}, 1.0], "i": {i}}}'
        sent[f"exact-{i}"] = data
        fragment = json.dumps(spec_record(f"exact-{i}", 1 + i, data={"x": 0}))
        sim.append_raw(fragment.replace('{"x": 0}', data), sort_ts=at(1 + i))
    sim.append_raw(companion, sort_ts=at(2))  # on the same page as the numbers

    proc = run_cli(["backfill"], worker_env(sim, db, SEQUIN_MAX_RETRIES="1"), timeout=60)

    assert proc.returncode == 0, proc.stderr[-3000:]
    with psycopg.connect(db) as conn:
        for uid, data in sent.items():
            row = conn.execute(
                "SELECT data = %s::jsonb, data::text FROM sequin.records WHERE upstream_id = %s",
                (data, uid),
            ).fetchone()
            assert row is not None and row[0], (uid, data, row)
    assert [d["raw"] for d in dead_letters(db)] == [companion.decode()]
    assert_cursor_at_the_end(sim, db, rows=sim.record_count() + len(sent))


def test_no_item_can_stop_the_stream(sim: Simulator, db: str) -> None:
    """NaN, Infinity, invalid UTF-8 (in a key field and in data), a raw NUL byte and items that
    are not objects, between good records: the installed command applies the good records,
    dead-letters each bad item with its bytes (escaped where not UTF-8), and ends 0 at the end
    of the stream, with no retry."""
    from worker.simulator import HOSTILE_ITEMS

    sim.append([sim.make_record("stripe:customer", "before", at(1), {"v": 1})])
    sent = sim.append_hostile(sort_ts=at(2))
    sim.append([sim.make_record("hubspot:deal", "after", at(3), {"v": 3})])

    env = worker_env(sim, db, SEQUIN_MAX_RETRIES="1", SEQUIN_PAGE_SIZE=str(PAGE))
    proc = run_cli(["backfill"], env, timeout=60)

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "api_retry" not in proc.stdout + proc.stderr
    assert_table_matches(db, sim.expected_state())
    dead = dead_letters(db)
    assert len(dead) == len(HOSTILE_ITEMS)
    for d, item in zip(dead, sent, strict=True):
        escaped = item.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
        assert d["raw"] == escaped, (d["raw"], item)
        assert d["after_cursor"] is not None
    by_item = dict(zip(HOSTILE_ITEMS, dead, strict=True))
    assert "NaN is not valid JSON" in by_item["nan"]["reason"]
    assert "Infinity is not valid JSON" in by_item["infinity"]["reason"]
    assert "not valid UTF-8" in by_item["invalid-utf8-key"]["reason"]
    assert "not valid UTF-8" in by_item["invalid-utf8-data"]["reason"]
    assert "not valid JSON" in by_item["nul-byte"]["reason"]
    assert "record must be an object, got null" in by_item["null"]["reason"]
    assert by_item["number"]["raw"] == "12345678.12345678901"
    assert_cursor_at_the_end(sim, db, rows=sim.record_count())
    assert cursor_row(db).dead_letters == len(HOSTILE_ITEMS)
