"""What `/metrics` reports: requests, the database pools and the cache, for the whole server.

Responder's collector counts in the memory of one process, so with `--workers N` one
scrape saw one worker. These are prometheus_client metrics instead, recorded by
Responder's own middleware (whose labels are the route patterns). With
`PROMETHEUS_MULTIPROC_DIR` set (prometheus_client's convention for multi-process
servers: a directory the workers share, emptied before the server starts) every worker
writes its figures there, and a scrape of any worker reports all of them: counters and
histograms summed, gauges summed over the live workers. Without it, this process's own.
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from responder.ext.metrics import BUCKETS
from sqlalchemy import QueuePool
from sqlalchemy.ext.asyncio import AsyncEngine

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()  # no `_created` series beside each counter
REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "responder_requests", "Total HTTP requests.", ["method", "path", "status"], registry=REGISTRY
)
DURATION = Histogram(
    "responder_request_duration_seconds",
    "HTTP request latency.",
    ["method", "path"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "responder_requests_in_flight",
    "HTTP requests currently being handled.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
POOL = Gauge(
    "books_db_pool_connections",
    "Connections held by the database pools.",
    ["state"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
READS = Counter(
    "books_reads",
    "Reads from the database, by who served them (DATABASE_REPLICA_URLS).",
    ["served_by"],
    registry=REGISTRY,
)
CACHE_HITS = Counter("books_cache_hits", "Cache entries found.", registry=REGISTRY)
CACHE_MISSES = Counter(
    "books_cache_misses", "Cache entries read from the database instead.", registry=REGISTRY
)
CACHE_ERRORS = Counter(
    "books_cache_errors", "Cache calls that failed or timed out.", registry=REGISTRY
)


class RequestMetrics:
    """The collector Responder's `MetricsMiddleware` records each request into."""

    def track_in_flight(self, delta: int) -> None:
        IN_FLIGHT.inc(delta)

    def record(self, method: str, path: str, status: int, duration: float) -> None:
        REQUESTS.labels(method, path, str(status)).inc()
        DURATION.labels(method, path).observe(duration)


def render() -> str:
    """Every metric in Prometheus text format: of every worker, or of this process."""
    if MULTIPROCESS not in os.environ:
        return generate_latest(REGISTRY).decode()
    workers = CollectorRegistry()
    multiprocess.MultiProcessCollector(workers)
    return generate_latest(workers).decode()


# How often each worker writes down its pool's figures.
POOL_REFRESH_SECONDS = 1.0


def count_pool(engine: AsyncEngine) -> None:
    """This process's pool figures into the gauges (summed over the workers)."""
    pool = engine.sync_engine.pool
    if isinstance(pool, QueuePool):
        POOL.labels("in_use").set(pool.checkedout())
        POOL.labels("idle").set(pool.checkedin())


@asynccontextmanager
async def pool_figures(engine: AsyncEngine) -> AsyncIterator[None]:
    """While the block runs, keep this worker's pool figures written down (every second,
    and at each scrape of this worker); they are taken out at the end."""

    async def refresh() -> None:
        while True:
            count_pool(engine)
            await asyncio.sleep(POOL_REFRESH_SECONDS)

    refreshing = asyncio.create_task(refresh())
    try:
        yield
    finally:
        refreshing.cancel()
        POOL.labels("in_use").set(0)
        POOL.labels("idle").set(0)
        if MULTIPROCESS in os.environ:
            multiprocess.mark_process_dead(os.getpid())
