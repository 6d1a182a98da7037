"""The optional shared cache: read-through entries in Redis, coherent across instances.

Every entry is guarded by a *generation*: a random token stored under its own
key (one per book, for the book, its reviews and their pages; one for every list
of books and total). A reader fetches the
generation together with the entries in one round trip, and stores what it
read from the database tagged with the generation it saw *before* that read.
A writer, after its commit and before its response, gives the generations it
affects new tokens. So a reader that fetched a row before a write committed
can still store it, even after the write's invalidation, but under a token
nobody looks for any more: a read that starts after a write was acknowledged
never sees the state before it.

The guarantee holds whenever Redis answers, however busy the CPU: a write is
answered only after Redis has confirmed its invalidation. What bounds the wait
is time this process could have run (see `within`), not the wall clock: on a
saturated machine our own event loop is late, and a wall-clock timer would give
up on replies that had arrived.

Redis is never allowed to fail a request, and an unresponsive one delays no
request by much: a read waits for Redis at most `CALL_TIMEOUT` (then reads the
database; after a few failures in a row the cache is bypassed for
`BACKOFF_SECONDS`), a write at most `INVALIDATION_TIMEOUT`. An invalidation
that could not be delivered (Redis down or unreachable from this instance) is
retried every `RETRY_INTERVAL`, and until it is delivered this instance reads
from the database only; other instances may serve the old entry until then
(or until it expires, `CACHE_TTL_SECONDS`, if this instance stops first).
"""

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from metrics import CACHE_ERRORS, CACHE_HITS, CACHE_MISSES
from settings import Settings

# The contract: a cache call never delays a request by more than 100 ms, and an
# unresponsive Redis adds at most 250 ms to any request (a write's invalidation).
CALL_TIMEOUT = 0.1
INVALIDATION_TIMEOUT = 0.2
# How `within` tells our own lateness from Redis's: it waits in steps this long, and a
# step that took longer (the event loop could not run us) counts as this long.
STEP = 0.01
# Past this much wall-clock time, give up however late the loop was.
WALL_CLOCK_LIMIT = 5.0
# The client's own socket timeouts are wall-clock timers too: they only catch a
# connection that is dead, `within` bounds every call.
SOCKET_TIMEOUT = 2.0
# After this many failed calls in a row, requests skip the cache for
# BACKOFF_SECONDS instead of each paying the timeout again.
FAILURES_BEFORE_BYPASS = 3
BACKOFF_SECONDS = 1.0
# How often undelivered invalidations are retried.
RETRY_INTERVAL = 0.5
# The generation of every list page and total: any write changes it.
BOOKS_GENERATION = "generation:books"
# The primary's WAL position of the latest acknowledged write (see replicas.py).
POSITION = "wal:primary"
# Keeps the larger of the stored position and ARGV[1], atomically.
MAX_MERGE = """
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > stored then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""

logger = logging.getLogger("books.cache")
T = TypeVar("T")


def book_generation(book_id: int) -> str:
    return f"generation:book:{book_id}"


def book_key(book_id: int) -> str:
    return f"book:{book_id}"


def review_key(book_id: int, review_id: int) -> str:
    """A review is guarded by its book's generation, as are the book's review pages."""
    return f"review:{book_id}:{review_id}"


@dataclass(frozen=True)
class Entry:
    """What a cached response needs: its serialised body and, for a book, its ETag."""

    body: str
    etag: str | None = None


@dataclass(frozen=True)
class Lookup:
    """The entries found (None for a miss), the generation token to store them under, and
    the WAL position a database read must have reached (None: unknown, read the primary)."""

    entries: list[Entry | None]
    tag: str | None = None
    storable: bool = False
    position: int | None = None


@dataclass
class BookCache:
    """Read-through entries for books, pages and totals; `redis=None` turns it off."""

    redis: Redis | None
    prefix: str = "books:"
    ttl: int = 300
    _failures: int = 0
    _bypass_until: float = 0.0
    # Generations whose invalidation failed, each with a unique mark, so that the
    # retry only clears what it delivered (not a mark added while it ran).
    _undelivered: dict[str, int] = field(default_factory=dict)
    _undelivered_position: int | None = None  # the highest one an invalidation failed with
    _marks: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        # The script that max-merges a WAL position; with Redis off, never called.
        self._merge: Any = self.redis.register_script(MAX_MERGE) if self.redis else None

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    @property
    def bypassed(self) -> bool:
        """Skip the cache: it failed a moment ago, or this instance owes it an invalidation."""
        return bool(self._undelivered) or time.monotonic() < self._bypass_until

    async def lookup(self, generation: str, *names: str) -> Lookup:
        """The entries `names`, valid only if stored under `generation`'s current token."""
        misses = Lookup([None] * len(names))
        if self.redis is None:
            return misses
        values = None
        if not self.bypassed:
            keys = [self.prefix + key for key in (generation, POSITION, *names)]
            values = await self._call(self.redis.mget(keys), CALL_TIMEOUT)
        if values is None:
            CACHE_MISSES.inc(len(names))
            return misses
        tag = values[0].decode() if isinstance(values[0], bytes) else values[0]
        position = None if values[1] is None else int(values[1])
        entries = [_entry(value, tag) for value in values[2:]]
        found = sum(entry is not None for entry in entries)
        CACHE_HITS.inc(found)
        CACHE_MISSES.inc(len(names) - found)
        return Lookup(entries, tag, storable=True, position=position)

    async def store(self, lookup: Lookup, entries: dict[str, Entry]) -> None:
        """Keep `entries`, tagged with the generation `lookup` saw before the database read."""
        if self.redis is None or not lookup.storable:
            return
        pipeline = self.redis.pipeline(transaction=False)
        for name, entry in entries.items():
            value = orjson.dumps([lookup.tag, entry.body, entry.etag])
            pipeline.set(self.prefix + name, value, ex=self.ttl)
        await self._call(pipeline.execute(), CALL_TIMEOUT)

    async def invalidate(self, book_id: int | None = None, position: int | None = None) -> None:
        """After a committed write: new tokens for every list and total, and for the book
        (and so its reviews); and the primary's WAL `position` after the commit, if reads
        go to replicas.

        Tried even while reads bypass the cache: a bypass opened by a slow moment
        must not turn into stale reads on the other instances.
        """
        if self.redis is None:
            return
        generations = {BOOKS_GENERATION}
        if book_id is not None:
            generations.add(book_generation(book_id))
        if not await self._renew(generations, position):
            for generation in generations:
                self._undelivered[generation] = next(self._marks)
            if position is not None:
                self._undelivered_position = max(position, self._undelivered_position or 0)

    async def has_position(self) -> bool:
        """Whether a WAL position is recorded (False too when Redis does not answer)."""
        assert self.redis is not None
        return bool(await self._call(self.redis.exists(self.prefix + POSITION), CALL_TIMEOUT))

    async def record_position(self, position: int) -> None:
        """Max-merge `position` into the recorded one."""
        assert self.redis is not None
        await self._call(self._merge(keys=[self.prefix + POSITION], args=[position]), CALL_TIMEOUT)

    @property
    def owes_invalidations(self) -> bool:
        """Whether an invalidation is still undelivered (other instances may serve old entries)."""
        return bool(self._undelivered)

    async def deliver(self) -> None:
        """Retry the invalidations that failed (run by one background task only)."""
        undelivered, position = dict(self._undelivered), self._undelivered_position
        if undelivered and await self._renew(set(undelivered), position):
            for generation, mark in undelivered.items():
                if self._undelivered.get(generation) == mark:
                    del self._undelivered[generation]
            if self._undelivered_position == position:
                self._undelivered_position = None

    async def _renew(self, generations: set[str], position: int | None = None) -> bool:
        assert self.redis is not None
        pipeline = self.redis.pipeline(transaction=False)
        if position is not None:
            # First: a reader that sees a new generation sees this position too (MGET is
            # atomic, Redis runs a pipeline in order), so it never stores, under that
            # generation, a replica's state from before this write.
            await self._merge(keys=[self.prefix + POSITION], args=[position], client=pipeline)
        for generation in generations:
            # Generations outlive the entries they guard (see `_entry`).
            pipeline.set(self.prefix + generation, secrets.token_hex(8), ex=2 * self.ttl)
        return await self._call(pipeline.execute(), INVALIDATION_TIMEOUT) is not None

    async def ping(self) -> bool:
        return (
            self.redis is not None and await self._call(self.redis.ping(), CALL_TIMEOUT) is not None
        )

    async def _call(self, call: Awaitable[T], seconds: float) -> T | None:
        """Run one Redis call for at most `seconds` (see `within`); None if it fails.

        A few failures in a row open a bypass of the reads.
        """
        try:
            result = await within(call, seconds)
        except (RedisError, TimeoutError, OSError) as exc:
            CACHE_ERRORS.inc()
            self._failures += 1
            if self._failures >= FAILURES_BEFORE_BYPASS:
                self._bypass_until = time.monotonic() + BACKOFF_SECONDS
            if self._failures == FAILURES_BEFORE_BYPASS:
                logger.warning("cache unavailable (%r): reading from the database", exc)
            return None
        if self._failures >= FAILURES_BEFORE_BYPASS:
            logger.warning("cache available again")
        self._failures = 0
        return result


async def within(call: Awaitable[T], seconds: float) -> T:
    """`call`'s result, waited for at most `seconds` of time this process could run,
    else TimeoutError.

    A wall-clock timer cannot tell an unresponsive Redis from our own late event
    loop: on a saturated CPU the reply has arrived, but the timer fires before the
    loop reads it. (Seen: 14 invalidations given up with Redis healthy, and a read
    40 ms after an acknowledged write that returned the state before it.) So time
    is counted in steps of `STEP`, and a step that took longer counts as one step.
    """
    task = asyncio.ensure_future(call)
    loop = asyncio.get_running_loop()
    started = loop.time()
    waited = 0.0
    while waited < seconds and loop.time() - started < WALL_CLOCK_LIMIT:
        step_started = loop.time()
        done, _ = await asyncio.wait({task}, timeout=STEP)
        if done:
            return task.result()
        waited += min(loop.time() - step_started, STEP)
    task.cancel()
    raise TimeoutError


def _entry(value: bytes | str | None, tag: str | None) -> Entry | None:
    """The entry stored in `value` if it was stored under generation `tag`.

    A missing generation (never written, or expired) counts as a tag of its
    own. Generations live twice as long as entries, so an entry stored under
    "missing" before a write cannot outlive that write's token and match again.
    """
    if value is None:
        return None
    try:
        stored_tag, body, etag = orjson.loads(value)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return Entry(body, etag) if stored_tag == tag else None


async def _deliver_invalidations(cache: BookCache) -> None:
    while True:
        await asyncio.sleep(RETRY_INTERVAL)
        await cache.deliver()


@asynccontextmanager
async def open_cache(settings: Settings) -> AsyncIterator[BookCache]:
    """The cache for this event loop (off without `REDIS_URL`), closed at exit."""
    if settings.redis_url is None:
        yield BookCache(None)
        return
    redis = Redis.from_url(
        str(settings.redis_url),
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        # One immediate retry lets a pooled connection that Redis closed reconnect.
        retry=Retry(NoBackoff(), 1),
    )
    cache = BookCache(redis, prefix=settings.cache_prefix, ttl=settings.cache_ttl_seconds)
    retrying = asyncio.create_task(_deliver_invalidations(cache))
    try:
        yield cache
    finally:
        retrying.cancel()
        await cache.deliver()
        await redis.aclose()
