"""Prometheus metrics of one worker process (``sequin_worker_`` prefix, base units).

Each :class:`Metrics` owns its registry, so tests and several in-process workers never share
counters. Nothing here imports the rest of the worker: callers pass plain values.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """The worker's metric objects and the hooks that update them."""

    def __init__(self, consumer: str = "default", version: str = "0") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info("sequin_worker", "Worker build and consumer.", registry=r)
        self.info.info({"version": version, "consumer": consumer})
        self.records_received = Counter(
            "sequin_worker_records_received_total",
            "Records received from the API (valid or not).",
            registry=r,
        )
        self.records_applied = Counter(
            "sequin_worker_records_applied_total",
            "Rows inserted or updated (live versions written).",
            ["collection"],
            registry=r,
        )
        self.records_deleted = Counter(
            "sequin_worker_records_deleted_total",
            "Deletes that took effect (soft: tombstoned; hard: row removed).",
            ["collection"],
            registry=r,
        )
        self.records_dead_lettered = Counter(
            "sequin_worker_records_dead_lettered_total",
            "Records kept in dead_letters.",
            ["collection"],
            registry=r,
        )
        self.pages = Counter("sequin_worker_pages_total", "Pages committed.", registry=r)
        self.api_requests = Counter(
            "sequin_worker_api_requests_total",
            "Requests to the records API, by HTTP status (or error kind).",
            ["status"],
            registry=r,
        )
        self.api_retries = Counter(
            "sequin_worker_api_retries_total",
            "Retried API requests, by reason.",
            ["reason"],
            registry=r,
        )
        self.api_request_duration = Histogram(
            "sequin_worker_api_request_duration_seconds",
            "Time to fetch one page.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_duration = Histogram(
            "sequin_worker_batch_apply_duration_seconds",
            "Time to apply one batch (one transaction).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.last_commit = Gauge(
            "sequin_worker_last_commit_timestamp_seconds",
            "Unix time of the last committed batch.",
            registry=r,
        )
        self.newest_applied = Gauge(
            "sequin_worker_newest_applied_timestamp_seconds",
            "upstream_updated_at of the newest record applied, as Unix time.",
            registry=r,
        )
        self.lag = Gauge(
            "sequin_worker_lag_seconds",
            "Seconds between now and the newest upstream_updated_at applied.",
            registry=r,
        )
        self.lag.set_function(self._lag)
        self.leader = Gauge(
            "sequin_worker_leader",
            "1 while this process is the consumer's leader, else 0.",
            registry=r,
        )
        self.caught_up = Gauge(
            "sequin_worker_caught_up",
            "1 when the last page was not full (the stream is drained).",
            registry=r,
        )
        self.batch_failures = Counter(
            "sequin_worker_batch_failures_total",
            "Failed attempts to apply a batch, by failure class "
            "(connection_lost, transient, resource, permanent).",
            ["class"],
            registry=r,
        )
        self.batch_failing = Gauge(
            "sequin_worker_batch_failing_seconds",
            "Seconds the batch now being applied has been failing (0 after a commit).",
            registry=r,
        )
        # Set by the ops endpoint (OpsServer) to its /readyz answer, so that readiness can be
        # alerted on; 0 where no ops endpoint runs.
        self.ready = Gauge(
            "sequin_worker_ready",
            "1 while /readyz answers 200 (migrated, database answers), else 0.",
            registry=r,
        )
        self._newest: float | None = None

    def _lag(self) -> float:
        return 0.0 if self._newest is None else max(0.0, time.time() - self._newest)

    # -- hooks ----------------------------------------------------------------------------

    def observe_request(self, status: int | str, seconds: float) -> None:
        self.api_requests.labels(status=str(status)).inc()
        self.api_request_duration.observe(seconds)

    def observe_retry(self, reason: str) -> None:
        self.api_retries.labels(reason=reason).inc()

    def observe_batch(
        self,
        *,
        received: int,
        pages: int,
        seconds: float,
        changed: Mapping[tuple[str, bool], int],
        dead_by_collection: Mapping[str, int],
        newest: datetime | None,
    ) -> None:
        self.records_received.inc(received)
        self.pages.inc(pages)
        self.batch_duration.observe(seconds)
        for (collection, deleted), n in changed.items():
            (self.records_deleted if deleted else self.records_applied).labels(
                collection=collection
            ).inc(n)
        for collection, n in dead_by_collection.items():
            self.records_dead_lettered.labels(collection=collection).inc(n)
        self.last_commit.set(time.time())
        self.batch_failing.set(0)
        if newest is not None:
            ts = newest.timestamp()
            if self._newest is None or ts > self._newest:
                self._newest = ts
                self.newest_applied.set(ts)

    def observe_batch_failure(self, failure_class: str, failing_for: float) -> None:
        """One failed attempt of the current batch, failing for ``failing_for`` seconds."""
        self.batch_failures.labels(**{"class": failure_class}).inc()
        self.batch_failing.set(failing_for)

    def set_leader(self, is_leader: bool) -> None:
        self.leader.set(1 if is_leader else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
