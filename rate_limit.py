"""RATE_LIMIT: how many `/books` requests a client may make, per second, minute or hour.

Responder's `RateLimiter` does the counting and answers the 429 problem. Counts
live in Redis when the cache is on (one budget per client across every worker
and instance), in this process's memory otherwise, and also whenever Redis
does not answer within the cache's time bound: Redis trouble costs precision,
never a failed request.
"""

import logging

from redis.exceptions import RedisError
from responder import Request, Response
from responder.ext.ratelimit import AsyncRedisBackend, MemoryBackend, RateLimiter

from cache import CALL_TIMEOUT, BookCache, within
from settings import Settings

logger = logging.getLogger("books")
# Paths that count; health checks, metrics, the docs and the schema never do.
LIMITED_PREFIX = "/books"


class ClientCounts:
    """Hits per client: in Redis while it answers, in process memory when it does not."""

    def __init__(self, cache: BookCache, prefix: str) -> None:
        self.cache = cache
        self.shared = AsyncRedisBackend(cache.redis, prefix=prefix) if cache.enabled else None
        self.local = MemoryBackend()

    async def ahit(self, key: str, max_requests: int, period: int) -> tuple[bool, int, float]:
        # Counted here too, so that when Redis fails this process still knows
        # what it has seen (a client cannot win a fresh budget by an outage).
        local: tuple[bool, int, float] = self.local.hit(key, max_requests, period)
        if self.shared is not None and not self.cache.bypassed:
            try:
                hit = self.shared.ahit(key, max_requests, period)
                allowed, remaining, reset = await within(hit, CALL_TIMEOUT)
                return allowed, remaining, reset
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning(
                    "rate limit: Redis failed (%s), counting in memory", type(exc).__name__
                )
        return local


def rate_limiter(settings: Settings, cache: BookCache) -> RateLimiter | None:
    """The limiter RATE_LIMIT asks for, or None when it is not set."""
    if settings.rate_limit is None:
        return None
    requests, period = settings.rate_limit
    counts = ClientCounts(cache, prefix=f"{settings.cache_prefix}ratelimit:")
    return RateLimiter(requests=requests, period=period, backend=counts)


async def limit_rate(req: Request, resp: Response) -> None:
    """Before every request: a client over RATE_LIMIT on `/books` gets a 429 problem."""
    limiter: RateLimiter | None = req.api.state.rate_limiter  # None: a later app without it
    if limiter is None or not req.url.path.startswith(LIMITED_PREFIX):
        return
    if not await limiter.acheck(req, resp):
        # Responder sets Retry-After and X-RateLimit-Reset on a refusal; the rest too.
        resp.headers["X-RateLimit-Limit"] = str(limiter.max_requests)
        resp.headers["X-RateLimit-Remaining"] = "0"
