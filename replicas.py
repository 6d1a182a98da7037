"""Read replicas that never show a client the past (DATABASE_REPLICA_URLS).

A read that starts after a write was acknowledged, on any instance, must not see the
state before that write. So a read goes to a replica only when that replica has
replayed every write acknowledged before the read began:

- after its commit, a writer records the primary's WAL position in Redis next to its
  cache invalidation, max-merged atomically (`cache.BookCache.invalidate`); when the key
  is missing (Redis restarted), the first instance to notice seeds it with the primary's
  current position, which no acknowledged write is past;
- a reader fetches that position with the cache lookup it makes anyway (one round trip),
  and reads from a replica whose replay position, which each instance watches every
  WATCH_INTERVAL, is at least that; otherwise, and whenever Redis is off or failing,
  from the primary.

A replica that is down, lagging or refusing is skipped; a read it fails is read again
from the primary, so no client sees its trouble.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from cache import BookCache, within
from database import reader
from metrics import READS
from settings import Settings

# How often each instance asks its replicas how far they have replayed.
WATCH_INTERVAL = 0.05
# A WAL position as a number of bytes, which Redis can compare.
POSITION_SQL = "SELECT {function}() - '0/0'::pg_lsn"
logger = logging.getLogger("books.replicas")


@dataclass
class Replica:
    """One replica: its engine, and what the last look at it found."""

    name: str  # its host and port, for /health and the logs (no password)
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    replayed: int | None = None  # WAL bytes replayed; None: down, or not a standby
    latency_ms: float | None = None
    lag_seconds: float | None = None  # since the last transaction it replayed


@dataclass
class Replicas:
    """The replicas of the primary `engine`, and which of them may serve a read."""

    primary: AsyncEngine
    cache: BookCache
    replicas: list[Replica] = field(default_factory=list)
    _turns: Any = field(default_factory=lambda: itertools.count())

    @property
    def enabled(self) -> bool:
        return bool(self.replicas) and self.cache.enabled

    def choose(self, at_least: int | None) -> Replica | None:
        """A replica that has replayed position `at_least`, in turns; None: the primary
        (no replicas, Redis off or failing, or none has come that far)."""
        if at_least is None or not self.replicas:
            return None
        ready = [r for r in self.replicas if r.replayed is not None and r.replayed >= at_least]
        return ready[next(self._turns) % len(ready)] if ready else None

    async def primary_position(self) -> int | None:
        """The primary's WAL position now: at least that of every commit acknowledged."""
        if not self.enabled:
            return None
        async with self.primary.connect() as connection:
            return int(
                await connection.scalar(text(POSITION_SQL.format(function="pg_current_wal_lsn")))
            )

    async def watch(self) -> None:
        """Forever: each replica's replay position; and the recorded position seeded when
        Redis has none (then no acknowledged write is recorded as newer than the primary)."""
        while True:
            await asyncio.gather(*(self.look_at(replica) for replica in self.replicas))
            if self.cache.enabled and not await self.cache.has_position():
                position = await self.primary_position_or_none()
                if position is not None:
                    await self.cache.record_position(position)
            await asyncio.sleep(WATCH_INTERVAL)

    async def primary_position_or_none(self) -> int | None:
        try:
            return await within(self.primary_position(), 1.0)
        except Exception:  # the primary away: reads fail as they would anyway
            return None

    async def look_at(self, replica: Replica) -> None:
        """How far `replica` has replayed (None if it does not answer, or is no standby)."""
        started = time.perf_counter()
        try:
            async with replica.engine.connect() as connection:
                row = (
                    await within(
                        connection.execute(
                            text(
                                POSITION_SQL.format(function="pg_last_wal_replay_lsn")
                                + ", extract(epoch FROM now() - pg_last_xact_replay_timestamp())"
                            )
                        ),
                        1.0,
                    )
                ).one()
        except Exception as exc:
            if replica.replayed is not None:
                logger.warning("replica %s skipped: %s", replica.name, type(exc).__name__)
            replica.replayed = replica.latency_ms = replica.lag_seconds = None
            return
        replica.replayed = None if row[0] is None else int(row[0])
        replica.lag_seconds = None if row[1] is None else round(float(row[1]), 3)
        replica.latency_ms = round((time.perf_counter() - started) * 1000, 2)

    def health(self) -> dict[str, dict[str, Any]]:
        """Each replica as /health reports it: status, latency, replay lag."""
        return {
            replica.name: {
                "status": "ok" if replica.replayed is not None else "error",
                "latency_ms": replica.latency_ms,
                "replay_lag_seconds": replica.lag_seconds,
            }
            for replica in self.replicas
        }


def served_by(replica: Replica | None) -> None:
    READS.labels("replica" if replica is not None else "primary").inc()


@asynccontextmanager
async def open_replicas(
    settings: Settings,
    primary: AsyncEngine,
    cache: BookCache,
    engine_for: Callable[[str], AsyncEngine],
) -> AsyncIterator[Replicas]:
    """The replicas of DATABASE_REPLICA_URLS (none: every read on the primary), watched
    while the block runs, their engines disposed of at the end. `engine_for(url)` makes
    an engine with the primary's settings for another URL."""
    replicas = Replicas(primary, cache)
    for url in settings.database_replica_urls:
        engine = engine_for(url)
        name = f"{engine.url.host}:{engine.url.port or 5432}"
        sessions = async_sessionmaker(reader(engine, settings))
        replicas.replicas.append(Replica(name, engine, sessions))
    watching = asyncio.create_task(replicas.watch()) if replicas.replicas else None
    try:
        yield replicas
    finally:
        if watching is not None:
            watching.cancel()
        await asyncio.gather(*(replica.engine.dispose() for replica in replicas.replicas))
