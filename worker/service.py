"""Wiring: builds the client, store, lease and loop from :class:`Settings` and runs them.

``run`` and ``backfill`` are the same procedure: migrate, become the consumer's leader
(waiting as a standby while another process leads), sync. ``run`` goes back to standby if
leadership is lost and keeps going until stopped; ``backfill`` returns once caught up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from worker.api import SequinClient, client_from_settings
from worker.config import MAX_RETRIES, NOTIFY_CHANNEL, Settings
from worker.errors import ConsumerBusy, FailureClass, StoreFailure
from worker.failures import FailureHandler
from worker.metrics import Metrics
from worker.model import ApplyResult, ConsumerConfig
from worker.pg.connection import DbTimeouts
from worker.pg.lease import Lease
from worker.pg.locks import consumer_lock_key
from worker.pg.store import PgStore
from worker.pg.viewkeeper import ViewKeeper
from worker.sync import LoopState, Mode, SyncLoop, Totals

log = structlog.get_logger("worker.service")


# After a stop (SIGTERM, lost leadership) the batch in flight has this long to finish by
# itself; then it is cancelled (see PgStore.interrupt).
STOP_GRACE = 1.0


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
    max_retries: int | None = MAX_RETRIES,
    on_wait: Callable[[], object] | None = None,
) -> Callable[[], SequinClient]:
    """Builds one client per session. ``stop`` (the process's) and the session's own
    :meth:`SequinClient.abort` both end its retry waits; ``on_wait`` is called during them
    (the heartbeat: a documented backoff is a live worker)."""

    def factory() -> SequinClient:
        return client_from_settings(
            settings,
            max_retries=max_retries,
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
    on_failure: Callable[[FailureClass, float], None] | None = None,
) -> list[int] | None:
    """Apply migrations, handling failures as the sync loop does (one policy:
    :class:`worker.failures.FailureHandler`). Returns the versions applied, or None if ``stop``
    was set while waiting. Raises :class:`worker.sync.DatabaseRefused` (e.g. no privilege
    to create the schema) or :class:`worker.sync.DatabaseUnavailable` (budget spent)."""
    failures = FailureHandler(max_retries, stop, state, on_failure=on_failure)
    while not stop.is_set():
        state.beat("migrating")
        try:
            applied = store.migrate()
        except StoreFailure as exc:
            if stop.is_set():
                break
            failures.failed(exc)
            continue
        failures.recovered()
        return applied
    return None


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
    timeouts = DbTimeouts.from_settings(settings)
    store = PgStore(
        dsn,
        settings.db_schema,
        consumer_config(settings),
        notify_channel=NOTIFY_CHANNEL if settings.notify else None,
        timeouts=timeouts,
    )
    state = state or LoopState()
    metrics = metrics or Metrics(settings.consumer)
    loop_state = state
    metrics.caught_up.set_function(lambda: 1.0 if loop_state.caught_up else 0.0)
    # Live, so that it reads 0 as soon as a failure is over, commit or not (e.g. a reconnect
    # while idle), and grows between the retries of a long backoff.
    metrics.batch_failing.set_function(
        lambda: 0.0 if (t := loop_state.failing_since) is None else time.monotonic() - t
    )
    keeper = ViewKeeper(dsn, settings.db_schema, timeouts) if settings.auto_views else None

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
    applied = migrate_with_retry(store, stop, budget, state, metrics.observe_batch_failure)
    if applied is None:
        return Outcome(totals or Totals(), caught_up=False)
    state.migrated = True
    log.info("migrations_ready", applied=applied, schema=settings.db_schema)

    lease = Lease(
        dsn,
        consumer_lock_key(settings.db_schema, settings.consumer),
        name=settings.consumer,
        retry_interval=settings.lock_retry_interval,
        timeouts=timeouts,
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
            loop_done = threading.Event()
            relay = threading.Thread(
                target=_relay,
                args=(stop, lease.lost, session_stop, loop_done, store),
                daemon=True,
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
                on_failure=metrics.observe_batch_failure,
                state=state,
                totals=totals,
                batch_log_level=batch_log_level,
            )
            try:
                done = loop.run()
            finally:
                loop_done.set()
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
        if keeper is not None:
            if stop.is_set():
                # Shutdown must stay short whatever the database does: queued view upkeep
                # waits for the next run, and a refresh in flight is not waited for (its
                # thread is a daemon; its transaction rolls back when the process exits).
                threading.Thread(target=keeper.close, args=(0.0,), daemon=True).start()
            else:
                keeper.close()


def _relay(
    stop: threading.Event,
    lost: threading.Event,
    session_stop: threading.Event,
    loop_done: threading.Event,
    store: PgStore,
) -> None:
    # Either event ends the session; polling keeps this free of extra machinery.
    while not session_stop.is_set():
        if stop.is_set() or lost.is_set():
            session_stop.set()
            break
        session_stop.wait(0.1)
    # The loop notices at its next step. A call that does not return (a batch waiting on a
    # lock, a server gone silent) is cancelled after a short grace, so that stopping is
    # bounded whatever the database is doing.
    while not loop_done.wait(STOP_GRACE):
        store.interrupt()
