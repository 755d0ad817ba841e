"""The Postgres store against a real Postgres: one transaction per batch, the guards."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.conftest import SCHEMA, fetch_one, fetch_rows
from tests.helpers import cursor_row, record, stored_cursor
from worker.errors import ConsumerMismatch, CursorConflict, StoreFailure
from worker.model import Batch, ConsumerConfig
from worker.pg import sqlfiles
from worker.pg.store import PgStore
from worker.records import parse_page


def raw(
    uid: str, ts: str, n: int = 0, *, coll: str = "stripe:customer", **over: Any
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "sync_id": "e6bd2ca5-36aa-4fce-9730-5543509a7747",
        "collection_id": coll,
        "data": {"n": n},
        "created_at": ts,
    }
    return record(**({"upstream_id": uid, "upstream_updated_at": ts} | fields | over))


def T(sec: int) -> str:
    return f"2024-01-01T00:00:{sec:02d}Z"


def make_store(dsn: str, *, mode: str = "soft", name: str = "default", **filters: Any) -> PgStore:
    store = PgStore(
        dsn,
        SCHEMA,
        ConsumerConfig(
            name=name,
            sync_id=filters.get("sync_id"),
            provider=filters.get("provider"),
            collection=filters.get("collection"),
            delete_mode=mode,  # type: ignore[arg-type]
        ),
    )
    store.connect()
    store.open_consumer()
    return store


def stored_position(store: PgStore) -> str | None:
    """The consumer's cursor as stored (the store keeps none of its own)."""
    return stored_cursor(store.conn.info.dsn, store.consumer.name)


_UNSET: Any = object()


def apply_pages(store: PgStore, *pages: list[dict[str, Any]], start: Any = _UNSET) -> Any:
    """Apply ``pages`` as one batch fetched at ``start`` (default: the stored cursor)."""
    if start is _UNSET:
        start = stored_position(store)
    parsed = []
    after = start
    for i, records in enumerate(pages):
        cursor = f"{start or 'c'}.{i}"
        parsed.append(parse_page(records, cursor=cursor, after_cursor=after))
        after = cursor
    return store.apply(Batch(after_cursor=start, pages=parsed))


def data_n(dsn: str) -> dict[str, Any]:
    return {
        k[1]: (None if v["data"] is None else v["data"]["n"], v["deleted"])
        for k, v in fetch_rows(dsn).items()
    }


def test_rows_and_cursor_commit_together(db: str) -> None:
    store = make_store(db)
    result = apply_pages(store, [raw("a", T(1), 1), raw("b", T(2), 2)])
    assert result.upserted == 2
    assert data_n(db) == {"a": (1, False), "b": (2, False)}
    cur, applied, pages, dead, newest = cursor_row(db)
    assert cur == stored_position(store) == "c.0"
    assert (applied, pages, dead) == (2, 1, 0)
    assert newest is not None and newest.isoformat().startswith("2024-01-01T00:00:02")


def test_failure_inside_the_transaction_leaves_neither_rows_nor_cursor(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(db)
    apply_pages(store, [raw("a", T(1), 1)])
    # Break the last statement of the batch (the dead-letter insert) to fail mid-transaction.
    store._q["insert_dead_letter"] = sqlfiles.render(
        "INSERT INTO {schema}.no_such_table VALUES (%(raw)s)", SCHEMA
    )
    with pytest.raises(StoreFailure) as caught:
        apply_pages(store, [raw("a", T(2), 2), raw("b", T(2), 2), "not a record"])
    assert (caught.value.failure_class, caught.value.sqlstate) == ("permanent", "42P01")
    assert data_n(db) == {"a": (1, False)}
    assert cursor_row(db)[0] == "c.0"
    assert fetch_one(db, "SELECT count(*) FROM sequin.dead_letters") == (0,)


def test_same_key_twice_in_one_page_later_wins(db: str) -> None:
    store = make_store(db)
    result = apply_pages(store, [raw("a", T(1), 1), raw("a", T(1), 2), raw("a", T(1), 3)])
    assert data_n(db) == {"a": (3, False)}
    assert (result.upserted, result.skipped) == (1, 2)


def test_same_key_across_pages_of_one_batch(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [raw("a", T(1), 1)], [raw("a", T(1), 2)], [raw("b", T(2), 1)])
    assert data_n(db) == {"a": (2, False), "b": (1, False)}
    assert cursor_row(db)[0] == "c.2"


def test_equal_timestamps_across_batches_stream_order_wins(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [raw("a", T(5), 1)])
    apply_pages(store, [raw("a", T(5), 2)])
    assert data_n(db) == {"a": (2, False)}


def test_stale_version_never_overwrites_a_newer_one(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [raw("a", T(5), 5)])
    result = apply_pages(store, [raw("a", T(4), 4)])
    assert data_n(db) == {"a": (5, False)}
    assert (result.upserted, result.skipped) == (0, 1)
    # ...and the cursor still moved: the stale record was consumed, not retried forever.
    assert cursor_row(db)[0] == "c.0.0"


def test_soft_delete_keeps_a_tombstone_with_the_delete_data(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [raw("a", T(1), 1), raw("b", T(1), 1)])
    result = apply_pages(
        store, [raw("a", T(2), 9, deleted=True), raw("b", T(2), deleted=True, data=None)]
    )
    assert data_n(db) == {"a": (9, True), "b": (None, True)}
    assert result.deleted == 2


def test_soft_delete_of_a_key_never_seen(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [raw("ghost", T(1), deleted=True, data=None)])
    assert data_n(db) == {"ghost": (None, True)}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_stale_delete_does_not_remove_a_newer_row(db: str, mode: str) -> None:
    store = make_store(db, mode=mode, name=mode)
    uid = f"k-{mode}"
    apply_pages(store, [raw(uid, T(5), 5)])
    apply_pages(store, [raw(uid, T(4), deleted=True, data=None)])
    assert data_n(db) == {uid: (5, False)}  # the row, unchanged, and nothing else


def test_hard_delete_removes_the_row(db: str) -> None:
    store = make_store(db, mode="hard")
    apply_pages(store, [raw("a", T(1), 1), raw("b", T(1), 1)])
    result = apply_pages(
        store, [raw("a", T(2), deleted=True, data=None), raw("never", T(2), deleted=True)]
    )
    assert data_n(db) == {"b": (1, False)}
    assert result.deleted == 1
    assert cursor_row(db, "default")[0] == "c.0.0"


def test_hard_delete_then_recreate_in_one_batch(db: str) -> None:
    store = make_store(db, mode="hard")
    apply_pages(store, [raw("a", T(1), 1)])
    apply_pages(store, [raw("a", T(2), deleted=True)], [raw("a", T(3), 3)])
    assert data_n(db) == {"a": (3, False)}


def test_dead_letters_in_the_same_transaction_with_after_cursor(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [raw("a", T(1), 1)])
    result = apply_pages(
        store, [raw("b", T(2), 2), raw("c", "yesterday"), raw("d", T(2), data={"x": "nul\x00"})]
    )
    assert result.dead_lettered == 2
    rows = fetch_rows(db)
    assert rows[("stripe:customer", "d")]["data"] == {"x": "nul\ufffd"}
    assert ("stripe:customer", "c") not in rows
    with psycopg.connect(db) as conn:
        dead = conn.execute(
            "SELECT consumer, after_cursor, collection_id, upstream_id, reason, raw "
            "FROM sequin.dead_letters ORDER BY id"
        ).fetchall()
    assert [(d[0], d[1], d[3]) for d in dead] == [("default", "c.0", "c"), ("default", "c.0", "d")]
    assert "upstream_updated_at is not an ISO 8601 timestamp" in dead[0][4]
    assert '"nul\\u0000"' in dead[1][5]
    assert cursor_row(db)[3] == 2


def test_provider_is_derived_and_sync_id_stored(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [raw("a", T(1), coll="salesforce:task")])
    row = fetch_rows(db)[("salesforce:task", "a")]
    assert row["provider"] == "salesforce"
    assert row["sync_id"] == "e6bd2ca5-36aa-4fce-9730-5543509a7747"


def test_a_second_writer_is_fenced_off(db: str) -> None:
    one = make_store(db)
    two = make_store(db)  # both read cursor None
    apply_pages(one, [raw("a", T(1), 1)])
    with pytest.raises(CursorConflict):
        apply_pages(two, [raw("a", T(1), 99)], start=None)  # what `two` read at its start
    assert data_n(db) == {"a": (1, False)}
    # After re-reading the position the second one continues from the first one's commit.
    assert two.open_consumer() == "c.0"
    apply_pages(two, [raw("b", T(2), 2)])
    assert data_n(db) == {"a": (1, False), "b": (2, False)}


def test_consumer_with_other_filters_refuses_to_start(db: str) -> None:
    make_store(db, provider="stripe")
    with pytest.raises(ConsumerMismatch, match="reset --consumer default"):
        make_store(db, provider="hubspot")
    make_store(db, name="other", provider="hubspot")  # a new consumer is fine


def test_empty_batch_moves_only_the_cursor(db: str) -> None:
    store = make_store(db)
    apply_pages(store, [])
    assert cursor_row(db)[:3] == ("c.0", 0, 1)
    assert data_n(db) == {}


def test_rows_postgres_refuses_are_dead_lettered_and_the_batch_applied(db: str) -> None:
    import secrets

    store = make_store(db)
    huge_key = secrets.token_hex(6000)  # 12000 chars: beyond a btree index entry's maximum
    result = apply_pages(store, [raw("a", T(1), 1), raw(huge_key, T(1), 2), raw("b", T(1), 3)])
    assert data_n(db) == {"a": (1, False), "b": (3, False)}
    assert (result.upserted, result.dead_lettered) == (2, 1)
    with psycopg.connect(db) as conn:
        ((reason, raw_text, after),) = conn.execute(
            "SELECT reason, raw, after_cursor FROM sequin.dead_letters"
        ).fetchall()
    assert reason.startswith("Postgres refused the row: ")
    assert json.loads(raw_text)["upstream_id"] == huge_key
    assert after is None  # the page was fetched from the start
    cur, applied, _, dead, _ = cursor_row(db)
    assert (cur, applied, dead) == ("c.0", 2, 1)
