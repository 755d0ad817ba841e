"""Wiring: builds the client, store, lease and loop from :class:`Settings` and runs them.

``run`` and ``backfill`` are the same procedure: migrate, become the consumer's leader
(waiting as a standby while another process leads), sync. ``run`` goes back to standby if
leadership is lost and keeps going until stopped; ``backfill`` returns once caught up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import structlog

from worker import views
from worker.api import SequinClient
from worker.config import NOTIFY_CHANNEL, Settings
from worker.lease import Lease
from worker.locks import consumer_lock_key
from worker.metrics import Metrics
from worker.store import ApplyResult, ConsumerConfig, PgStore, StoreUnavailable, connect
from worker.sync import DatabaseUnavailable, LoopState, Mode, SyncLoop, Totals, backoff_delay

log = structlog.get_logger("worker.service")


class ConsumerBusy(Exception):
    """Another process leads this consumer and the caller asked not to wait."""


@dataclass
class Outcome:
    totals: Totals
    caught_up: bool


def consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        name=settings.consumer,
        sync_id=settings.sync_id,
        provider=settings.provider,
        collection=settings.collection,
        delete_mode=settings.delete_mode,
    )


def retry_budget(settings: Settings, mode: Mode) -> int | None:
    """``run`` is a service: it retries transient failures for ever (backing off, logging each
    retry, staying alive for /healthz). ``backfill`` gives up after SEQUIN_MAX_RETRIES."""
    return None if mode == "run" else settings.max_retries


def make_client_factory(
    settings: Settings,
    stop: threading.Event,
    metrics: Metrics | None = None,
    max_retries: int | None = 20,
    on_wait: Callable[[], object] | None = None,
) -> Callable[[], SequinClient]:
    """Builds one client per session. ``stop`` (the process's) and the session's own
    :meth:`SequinClient.abort` both end its retry waits; ``on_wait`` is called during them
    (the heartbeat: a documented backoff is a live worker)."""
    assert settings.api_token is not None
    token = settings.api_token.get_secret_value()

    def factory() -> SequinClient:
        return SequinClient(
            settings.base_url,
            token,
            filters=settings.filters,
            page_size=settings.page_size,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            request_timeout=settings.request_timeout,
            max_retries=max_retries,
            allow_insecure_http=settings.allow_insecure_http,
            stop=stop,
            on_request=metrics.observe_request if metrics else None,
            on_retry=metrics.observe_retry if metrics else None,
            on_wait=on_wait,
        )

    return factory


def migrate_with_retry(
    store: PgStore,
    stop: threading.Event,
    max_retries: int | None,
    state: LoopState,
) -> list[int] | None:
    """Apply migrations, retrying while the database is unreachable. Returns the versions
    applied, or None if ``stop`` was set while waiting."""
    attempt = 0
    while not stop.is_set():
        state.beat("migrating")
        try:
            return store.migrate()
        except StoreUnavailable as exc:
            attempt += 1
            if max_retries is not None and attempt > max_retries:
                raise DatabaseUnavailable(f"cannot reach the database: {exc}") from None
            wait = backoff_delay(attempt)
            log.warning("db_retry", reason=str(exc), attempt=attempt, wait_s=round(wait, 3))
            state.beat("db_retry")
            stop.wait(wait)
    return None


class ViewKeeper:
    """Keeps per-collection views current from inside the loop (``SEQUIN_AUTO_VIEWS``).

    A view is created when a collection first appears, and every view is refreshed once when
    the stream is first caught up (by then the sample holds more than the first page). A
    failure is logged and never stops the sync: views are a convenience, rows are the
    product.
    """

    def __init__(self, dsn: str, schema: str) -> None:
        self._dsn = dsn
        self._schema = schema
        self._known: set[str] | None = None

    def _run(self, collections: list[str] | None) -> None:
        try:
            with connect(self._dsn, autocommit=True, application_name="sequin-worker:views") as c:
                if self._known is None:
                    self._known = views.known_collections(c, self._schema)
                if collections is not None:
                    collections = [x for x in collections if x not in self._known]
                    if not collections:
                        return
                for done in views.refresh_views(c, self._schema, collections):
                    self._known.add(done.collection_id)
        except (psycopg.Error, StoreUnavailable) as exc:
            log.warning("view_refresh_failed", reason=str(exc).splitlines()[0] if str(exc) else "")

    def on_batch(self, result: ApplyResult) -> None:
        new = {coll for (coll, _) in result.changed}
        if self._known is None or new - self._known:
            self._run(sorted(new))

    def on_caught_up(self) -> None:
        self._run(None)


def run_consumer(
    settings: Settings,
    mode: Mode,
    stop: threading.Event,
    *,
    wait_for_lock: bool = True,
    state: LoopState | None = None,
    metrics: Metrics | None = None,
    totals: Totals | None = None,
    batch_log_level: str = "info",
) -> Outcome:
    """Migrate, lead, sync. Returns when ``stop`` is set or (backfill) when caught up.

    ``state`` and ``metrics``, when given, are kept up to date for the ops endpoint and the
    progress display.
    """
    assert settings.database_url is not None
    dsn = settings.database_url.get_secret_value()
    store = PgStore(
        dsn,
        settings.db_schema,
        consumer_config(settings),
        notify_channel=NOTIFY_CHANNEL if settings.notify else None,
    )
    state = state or LoopState()
    metrics = metrics or Metrics(settings.consumer)
    loop_state = state
    metrics.caught_up.set_function(lambda: 1.0 if loop_state.caught_up else 0.0)
    keeper = ViewKeeper(dsn, settings.db_schema) if settings.auto_views else None

    def on_batch(r: ApplyResult) -> None:
        assert metrics is not None
        metrics.observe_batch(
            received=r.received,
            pages=r.pages,
            seconds=r.seconds,
            changed=r.changed,
            dead_by_collection=r.dead_by_collection,
            newest=r.newest,
        )
        if keeper is not None:
            keeper.on_batch(r)

    budget = retry_budget(settings, mode)
    applied = migrate_with_retry(store, stop, budget, state)
    if applied is None:
        return Outcome(totals or Totals(), caught_up=False)
    state.migrated = True
    log.info("migrations_ready", applied=applied, schema=settings.db_schema)

    lease = Lease(
        dsn,
        consumer_lock_key(settings.db_schema, settings.consumer),
        name=settings.consumer,
        retry_interval=settings.lock_retry_interval,
    )
    client_factory = make_client_factory(settings, stop, metrics, budget, on_wait=state.beat)
    totals = totals or Totals()
    try:
        while not stop.is_set():
            state.beat("standby")
            if not lease.acquire(stop, wait=wait_for_lock, on_wait=state.beat):
                if stop.is_set():
                    break
                raise ConsumerBusy(
                    f"consumer {settings.consumer!r} is being synced by another process"
                )
            state.leader = True
            metrics.set_leader(True)
            # The session ends when we are told to stop or when leadership is lost.
            session_stop = threading.Event()
            relay = threading.Thread(
                target=_relay, args=(stop, lease.lost, session_stop), daemon=True
            )
            relay.start()
            loop = SyncLoop(
                client_factory,
                store,
                mode=mode,
                stop=session_stop,
                poll_interval=settings.poll_interval,
                batch_max_records=settings.batch_max_records,
                prefetch_pages=settings.prefetch_pages,
                max_db_retries=budget,
                on_batch=on_batch,
                on_caught_up=keeper.on_caught_up if keeper is not None else None,
                state=state,
                totals=totals,
                batch_log_level=batch_log_level,
            )
            try:
                done = loop.run()
            finally:
                session_stop.set()
                lease.release()
                state.leader = False
                metrics.set_leader(False)
            if done:
                return Outcome(totals, caught_up=True)
            if lease.lost.is_set() and not stop.is_set():
                log.warning("leadership_lost_resuming_standby", consumer=settings.consumer)
        return Outcome(totals, caught_up=False)
    finally:
        lease.release()
        store.close()


def _relay(stop: threading.Event, lost: threading.Event, session_stop: threading.Event) -> None:
    # Either event ends the session; polling keeps this free of extra machinery.
    while not session_stop.is_set():
        if stop.is_set() or lost.is_set():
            session_stop.set()
            return
        session_stop.wait(0.1)
