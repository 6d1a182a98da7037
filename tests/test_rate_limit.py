"""RATE_LIMIT: per-client budgets on /books, shared through Redis, never failing on Redis."""

from pathlib import Path

import httpx
import pytest
from responder.testing import AsyncTestClient

from settings import Settings
from tests.conftest import BOOK, TEST_REDIS_URL, app_client
from tests.servers import RedisServer, serving


async def spend(client: AsyncTestClient, budget: int, requests: int | None = None) -> None:
    """Make `requests` (default: all) of a budget of `budget`, checking the headers."""
    for used in range(1, (requests or budget) + 1):
        response = await client.get("/books")
        assert response.status_code == 200, response.text
        assert response.headers["X-RateLimit-Limit"] == str(budget)
        assert response.headers["X-RateLimit-Remaining"] == str(budget - used)


def assert_refused(response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert response.headers["X-RateLimit-Limit"]
    assert int(response.headers["X-RateLimit-Reset"]) >= 0
    assert response.json()["status"] == 429


async def test_over_the_limit_is_a_429_and_operations_stay_open(settings: Settings):
    async with app_client(settings, rate_limit="3/minute") as client:
        await spend(client, 3)
        assert_refused(await client.get("/books/1"))
        refused = await client.post("/books", json=BOOK)
        assert_refused(refused)
        for path in ["/health", "/metrics", "/docs", "/schema.yml"] * 3:
            assert (await client.get(path)).status_code == 200, path
    async with app_client(settings) as client:  # nothing was stored by the refused POST
        assert (await client.get("/books")).json()["total"] == 0
        assert "X-RateLimit-Limit" not in (await client.get("/books")).headers


async def test_the_budget_is_shared_through_redis(settings: Settings):
    """A second instance (here: the app started again) sees the same client's count."""
    if settings.redis_url is None:
        pytest.skip("the budget is shared only with the cache (REDIS_URL) on")
    async with app_client(settings, rate_limit="3/minute") as client:
        await spend(client, 3)
    async with app_client(settings, rate_limit="3/minute") as other_instance:
        assert_refused(await other_instance.get("/books"))


async def test_without_redis_each_process_counts_alone(settings: Settings):
    if settings.redis_url is not None:
        pytest.skip("with the cache on, counts are shared")
    async with app_client(settings, rate_limit="2/minute") as client:
        await spend(client, 2)
        assert_refused(await client.get("/books"))
    async with app_client(settings, rate_limit="2/minute") as restarted:
        await spend(restarted, 2)


@pytest.mark.skipif(not TEST_REDIS_URL, reason="set TEST_REDIS_URL to a Redis server")
async def test_when_redis_fails_the_limit_falls_back_to_memory(tmp_path: Path):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'books.db'}",
        redis_url=redis_server.url,
        rate_limit="4/minute",
    )
    try:
        async with app_client(settings) as client:
            await spend(client, 4, requests=2)  # counted in Redis
            redis_server.stop()
            statuses = []
            for _ in range(4):  # counted in memory from now on; never failed
                response = await client.get("/books")
                assert response.status_code in (200, 429), response.text
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert_refused(response)
                    break
            else:
                raise AssertionError("the in-memory count never refused")
            # Memory had counted the two made through Redis: two more, not a fresh four.
            assert statuses == [200, 200, 429]
            assert (await client.get("/health")).status_code == 200
    finally:
        redis_server.stop()


@pytest.mark.parametrize("trusted", [False, True])
def test_the_client_is_the_peer_unless_proxy_headers_are_trusted(tmp_path: Path, trusted: bool):
    """Without TRUST_PROXY_HEADERS a client cannot pick a fresh budget by sending
    X-Forwarded-For; with it (behind a proxy) each forwarded address is a client."""
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}",
        "RATE_LIMIT": "2/minute",
        "TRUST_PROXY_HEADERS": str(trusted).lower(),
    }
    with serving(env) as server:

        def get_as(address: str) -> httpx.Response:
            return httpx.get(f"{server.url}/books", headers={"X-Forwarded-For": address})

        assert [get_as("203.0.113.1").status_code for _ in range(2)] == [200, 200]
        other = get_as("203.0.113.2")
        if trusted:
            assert other.status_code == 200 and other.headers["X-RateLimit-Remaining"] == "1"
            assert_refused(get_as("203.0.113.1"))
        else:
            assert_refused(other)
