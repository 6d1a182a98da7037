"""The shared Redis cache: hits, invalidation, coherence across instances, and Redis faults.

In-process tests use SQLite and the machine's Redis (TEST_REDIS_URL) under a key
prefix of their own; the fault tests start a redis-server of their own.
"""

import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio
from responder.testing import AsyncTestClient
from sqlalchemy import text

from app import api
from cache import (
    BOOKS_GENERATION,
    CALL_TIMEOUT,
    FAILURES_BEFORE_BYPASS,
    RETRY_INTERVAL,
    BookCache,
    Entry,
    book_generation,
    book_key,
    open_cache,
)
from settings import Settings
from tests.conftest import BOOK, TEST_REDIS_URL, needs_postgres, needs_redis
from tests.servers import ROOT, RedisServer, TcpProxy, free_port, start, wait_until_healthy

AUTHOR = str(BOOK["author"])


def sqlite_settings(tmp_path: Path, redis_url: str | None, prefix: str = "books:") -> Settings:
    url = f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"
    return Settings(database_url=url, redis_url=redis_url, cache_prefix=prefix)


@pytest.fixture
async def cached(tmp_path: Path, cache_prefix: str) -> AsyncIterator[AsyncTestClient]:
    """The app on SQLite with the cache on the machine's Redis."""
    api.state.settings = sqlite_settings(tmp_path, TEST_REDIS_URL, cache_prefix)
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop, restart and pause."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def counters(client: AsyncTestClient) -> dict[str, int]:
    """The books_cache_*_total counters from /metrics."""
    metrics = (await client.get("/metrics")).text
    found = re.findall(r"^books_cache_(\w+)_total ([0-9.e+]+)$", metrics, re.MULTILINE)
    return {name: int(float(value)) for name, value in found}


async def change_behind_the_api(sql: str) -> None:
    """Change the database directly: only a read that reaches it can see the change."""
    async with api.state.engine.begin() as connection:
        await connection.execute(text(sql))


async def test_a_repeated_read_is_a_hit_that_skips_the_database(cached: AsyncTestClient):
    book = (await cached.post("/books", json=BOOK)).json()
    first = await cached.get(f"/books/{book['id']}")
    before = await counters(cached)
    await change_behind_the_api("UPDATE books SET title = 'changed behind the API'")

    second = await cached.get(f"/books/{book['id']}")
    assert second.json() == first.json()
    assert second.headers["ETag"] == first.headers["ETag"]
    assert (await counters(cached))["hits"] == before["hits"] + 1

    not_modified = await cached.get(
        f"/books/{book['id']}", headers={"If-None-Match": first.headers["ETag"]}
    )
    assert not_modified.status_code == 304
    assert not_modified.headers["ETag"] == first.headers["ETag"]


async def test_a_listing_written_differently_hits_the_same_entry(cached: AsyncTestClient):
    for year in (1965, 1969, 1976):
        await cached.post("/books", json={**BOOK, "year": year, "isbn": None})
    first = await cached.get("/books", params={"author": AUTHOR, "sort": "-year"})
    before = await counters(cached)
    await change_behind_the_api("DELETE FROM books")

    same = await cached.get("/books?sort=-year,id&page=1&size=20&author=" + AUTHOR)
    assert same.json() == first.json()
    assert same.headers["X-Total-Count"] == "3"
    assert 'rel="last"' in same.headers["Link"] and "sort=-year%2Cid" in same.headers["Link"]
    assert (await counters(cached))["hits"] == before["hits"] + 2  # the page and its total


async def test_pages_of_one_listing_share_the_cached_total(cached: AsyncTestClient):
    for year in (1965, 1969, 1976):
        await cached.post("/books", json={**BOOK, "year": year, "isbn": None})
    assert (await cached.get("/books", params={"size": 2})).json()["total"] == 3
    await change_behind_the_api(
        "INSERT INTO books (title, author, year, created_at, updated_at,"
        " version) VALUES ('x', 'y', 1, '2026-01-01', '2026-01-01', 1)"
    )
    other = await cached.get("/books", params={"size": 2, "sort": "-id"})  # another page
    assert other.json()["total"] == 3  # the count came from the cache
    assert [book["year"] for book in other.json()["items"]] == [1, 1976]  # the rows did not


@needs_postgres
@needs_redis
@pytest.mark.parametrize("settings", ["postgresql+cache"], indirect=True)
async def test_a_cached_total_reads_back_as_the_number_counted(client: AsyncTestClient):
    """Found by `bench cache`: PostgreSQL's sum of the count slots was a numeric, which
    asyncpg reads as Decimal('1E+4') at 10,000 books; cached as that text, every page
    that took the total from the cache was a 500."""
    await change_behind_the_api(
        "INSERT INTO books (title, author, year, created_at, updated_at, version)"
        " SELECT 't', 'a', 1, now(), now(), 1 FROM generate_series(1, 10000)"
    )
    for page in (1, 2):  # the second takes the total the first stored
        response = await client.get("/books", params={"page": page})
        assert response.status_code == 200, response.text
        assert response.json()["total"] == 10_000


async def test_not_found_is_not_cached(cached: AsyncTestClient, cache_prefix: str):
    assert (await cached.get("/books/999")).status_code == 404
    assert TEST_REDIS_URL
    async with redis.asyncio.Redis.from_url(TEST_REDIS_URL) as server:
        assert [key async for key in server.scan_iter(match=f"{cache_prefix}book:*")] == []
    created = (await cached.post("/books", json=BOOK)).json()
    assert (await cached.get(f"/books/{created['id']}")).status_code == 200


WRITES = {
    "POST": ("post", "/books", {**BOOK, "title": "Dune Messiah", "isbn": None}),
    "PUT": ("put", "/books/{id}", {**BOOK, "title": "Dune Messiah"}),
    "PATCH": ("patch", "/books/{id}", {"title": "Dune Messiah"}),
    "DELETE": ("delete", "/books/{id}", None),
}


@pytest.mark.parametrize("write", WRITES)
async def test_every_write_invalidates_the_book_its_pages_and_totals(
    cached: AsyncTestClient, write: str
):
    book = (await cached.post("/books", json=BOOK)).json()
    reads = [f"/books/{book['id']}", "/books", f"/books?author={AUTHOR}", "/books?sort=-title"]

    async def read_all() -> list[httpx.Response]:
        return [await cached.get(url) for url in reads]

    await read_all()
    before = await counters(cached)
    await read_all()
    assert (await counters(cached))["hits"] == before["hits"] + 7  # warm: 1 book, 3 pages+totals

    method, url, body = WRITES[write]
    kwargs = {} if body is None else {"json": body}
    response = await getattr(cached, method)(url.format(id=book["id"]), **kwargs)
    assert response.status_code < 300

    single, everything, by_author, by_title = await read_all()
    expected_total = {"POST": 2, "DELETE": 0}.get(write, 1)
    for page in (everything, by_author, by_title):
        assert page.json()["total"] == expected_total
        titles = [item["title"] for item in page.json()["items"]]
        assert ("Dune Messiah" in titles) == (write != "DELETE")
    if write == "DELETE":
        assert single.status_code == 404
    else:
        assert single.json()["title"] == ("Dune" if write == "POST" else "Dune Messiah")


async def test_a_late_store_from_a_slow_reader_is_never_served(cached: AsyncTestClient):
    """The race: a reader fetched the old row before a write committed and stores it after
    the write's invalidation. Played here step by step through the cache itself."""
    book = (await cached.post("/books", json=BOOK)).json()
    cache: BookCache = api.state.cache
    url = f"/books/{book['id']}"
    page_key = "page:slow-reader-page"

    # 1. The slow reader looks up (a miss) and reads the old state from the database.
    book_lookup = await cache.lookup(book_generation(book["id"]), book_key(book["id"]))
    list_lookup = await cache.lookup(BOOKS_GENERATION, page_key)
    old = await cached.get(url)
    # 2. A write commits and is acknowledged.
    assert (await cached.patch(url, json={"title": "Dune Messiah"})).status_code == 200
    # 3. The slow reader stores the old state, after the invalidation.
    await cache.store(book_lookup, {book_key(book["id"]): Entry(old.text, old.headers["ETag"])})
    await cache.store(list_lookup, {page_key: Entry(old.text)})

    # The old entries are in Redis, but under a generation nobody looks for any more.
    assert (await cached.get(url)).json()["title"] == "Dune Messiah"
    late = await cache.lookup(BOOKS_GENERATION, page_key)
    assert late.entries == [None]


async def test_health_and_metrics_report_the_cache(cached: AsyncTestClient):
    health = (await cached.get("/health")).json()
    assert health["status"] == "ok"
    assert health["checks"]["cache"]["status"] == "ok"
    assert isinstance(health["checks"]["cache"]["latency_ms"], int | float)
    assert set(await counters(cached)) == {"hits", "misses", "errors"}


async def test_after_a_lost_invalidation_staleness_ends_within_the_ttl(
    tmp_path: Path, cache_prefix: str
):
    api.state.settings = sqlite_settings(tmp_path, TEST_REDIS_URL, cache_prefix).model_copy(
        update={"cache_ttl_seconds": 1}
    )
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        book = (await client.post("/books", json=BOOK)).json()
        url = f"/books/{book['id']}"
        await client.get(url)
        # A change whose invalidation never reached Redis, as after a fault.
        await change_behind_the_api("UPDATE books SET title = 'changed', version = version + 1")
        assert (await client.get(url)).json()["title"] == "Dune"  # stale, from the cache
        await asyncio.sleep(1.2)
        fresh = await client.get(url)
        assert fresh.json()["title"] == "changed"
        assert fresh.headers["ETag"] == f'"{book["id"]}-2"'


async def test_the_service_starts_and_serves_while_redis_is_unreachable(tmp_path: Path):
    api.state.settings = sqlite_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        created = await client.post("/books", json=BOOK)
        assert created.status_code == 201
        assert (await client.get(f"/books/{created.json()['id']}")).status_code == 200
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["checks"]["cache"]["status"] == "error"


async def timed_get(client: AsyncTestClient, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.get(url)
    return response, time.monotonic() - started


async def test_redis_stopped_and_restarted_never_fails_a_request(
    tmp_path: Path, own_redis: RedisServer
):
    api.state.settings = sqlite_settings(tmp_path, own_redis.url)
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        book = (await client.post("/books", json=BOOK)).json()
        url = f"/books/{book['id']}"
        await client.get(url)
        await client.get("/books")

        errors = (await counters(client))["errors"]
        own_redis.stop()
        for _ in range(3):
            for target in (url, "/books", f"/books?author={AUTHOR}"):
                response, elapsed = await timed_get(client, target)
                assert response.status_code == 200 and elapsed < 1.0
        changed = await client.patch(url, json={"title": "Dune Messiah"})
        assert changed.status_code == 200
        assert (await client.get(url)).json()["title"] == "Dune Messiah"
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["checks"]["cache"]["status"] == "error"
        assert (await counters(client))["errors"] > errors

        own_redis.start()  # same port, empty: the client reconnects by itself
        deadline = time.monotonic() + 10
        while (await client.get("/health")).json()["checks"]["cache"]["status"] != "ok":
            assert time.monotonic() < deadline, "the cache did not come back"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.1)  # past the bypass after the last error
        before = await counters(client)
        await client.get(url)
        again = await client.get(url)
        assert again.json()["title"] == "Dune Messiah"
        assert (await counters(client))["hits"] == before["hits"] + 1


async def test_a_slow_redis_adds_no_more_than_its_timeout_and_misses_no_invalidation(
    tmp_path: Path, own_redis: RedisServer
):
    settings = sqlite_settings(tmp_path, own_redis.url)
    api.state.settings = settings
    async with (
        AsyncTestClient(api, base_url="http://testserver") as client,
        open_cache(settings) as other_instance,
        redis.asyncio.Redis.from_url(own_redis.url) as admin,
    ):
        book = (await client.post("/books", json=BOOK)).json()
        url = f"/books/{book['id']}"
        await client.get(url)
        generation, key = book_generation(book["id"]), book_key(book["id"])
        assert (await other_instance.lookup(generation, key)).entries[0] is not None

        await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # Redis stops answering
        paused_at = time.monotonic()
        timings = []
        for _ in range(5):
            response, elapsed = await timed_get(client, url)
            assert response.status_code == 200
            timings.append(elapsed)
        assert max(timings) < 0.25  # the contract: an unresponsive Redis adds at most 250 ms
        # Only the calls before the bypass opens pay the timeout.
        assert sum(elapsed >= CALL_TIMEOUT for elapsed in timings) <= FAILURES_BEFORE_BYPASS
        changed = await client.patch(url, json={"title": "Dune Messiah"})
        assert changed.status_code == 200  # its invalidation could not be delivered
        assert (await client.get(url)).json()["title"] == "Dune Messiah"
        assert time.monotonic() - paused_at < 2.5, "the requests waited for Redis"

        # Once Redis answers again the undelivered invalidation reaches it, so the
        # other instance, which never saw the write, no longer finds the old entry.
        await admin.ping()  # answered when the pause ends
        deadline = time.monotonic() + 10
        while True:
            lookup = await other_instance.lookup(generation, key)
            if lookup.storable and lookup.entries[0] is None:  # Redis answered: no entry
                break
            assert time.monotonic() < deadline, "the invalidation was never delivered"
            await asyncio.sleep(0.2)
        assert time.monotonic() - paused_at < 6


@contextlib.asynccontextmanager
async def two_instances(env: dict[str, str]) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Two app processes with `env`, and a client for each."""
    ports = [free_port(), free_port()]
    servers = [start([str(ROOT / "app.py")], {**env, "PORT": str(port)}) for port in ports]
    try:
        for port, server in zip(ports, servers, strict=True):
            wait_until_healthy(port, server)
        clients = [
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) for port in ports
        ]
        yield clients
        for client in clients:
            await client.aclose()
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=15)


async def test_two_instances_never_serve_a_read_older_than_an_acknowledged_write(
    postgres_url: str, cache_prefix: str
):
    """Two app processes on one PostgreSQL and one Redis, concurrent writers and readers:
    every read must show each book at least at the version acknowledged before it began."""
    assert TEST_REDIS_URL
    env = {"DATABASE_URL": postgres_url, "REDIS_URL": TEST_REDIS_URL, "CACHE_PREFIX": cache_prefix}
    async with two_instances(env) as clients:
        violations, reads = await run_coherence_check(clients, seconds=6)
        hits = [await counters(client) for client in clients]  # type: ignore[arg-type]
    assert reads > 100  # enough traffic for the check to mean something
    assert all(counter["hits"] > 0 for counter in hits), hits  # the cache took part
    assert violations == []


@contextlib.contextmanager
def busy_cores(per_core: int = 2) -> Iterator[None]:
    """Other processes keeping every core busy, as on a machine shared with other work."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(per_core * (os.cpu_count() or 1))
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


# Rounds of the coherence check under load; .ci/run sets more than a developer's default.
LOAD_ROUNDS = int(os.environ.get("TEST_LOAD_ROUNDS", "2"))


@pytest.mark.parametrize("round_number", range(1, LOAD_ROUNDS + 1))
async def test_two_instances_stay_coherent_while_every_core_is_busy(
    postgres_url: str, cache_prefix: str, round_number: int
):
    """The same check while other processes saturate the CPU: our event loops run late,
    Redis stays healthy, and no read may be older than a write acknowledged before it."""
    assert TEST_REDIS_URL
    env = {"DATABASE_URL": postgres_url, "REDIS_URL": TEST_REDIS_URL, "CACHE_PREFIX": cache_prefix}
    async with two_instances(env) as clients:
        with busy_cores():
            violations, reads = await run_coherence_check(clients, seconds=8, readers=16)
        figures = [await counters(client) for client in clients]  # type: ignore[arg-type]
    assert reads > 50, reads
    assert violations == []
    # Redis was healthy, though starved of CPU too: a call that waited longer than its bound
    # of time this process could run is rare (with wall-clock bounds: several a round).
    assert sum(figure["errors"] for figure in figures) <= 2, figures


async def test_after_redis_was_unreachable_staleness_ends_once_it_is_reachable(
    tmp_path: Path, own_redis: RedisServer
):
    """The staleness bound after a real fault: this instance reaches Redis through a link
    that is cut; its write succeeds without its invalidation, which another instance
    (reaching Redis directly) misses until the link is back and the retry delivers it."""
    proxy = TcpProxy(target_port=own_redis.port)
    await proxy.start()
    through_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    api.state.settings = sqlite_settings(tmp_path, through_proxy)
    async with (
        AsyncTestClient(api, base_url="http://testserver") as client,
        open_cache(sqlite_settings(tmp_path, own_redis.url)) as other_instance,
    ):
        book = (await client.post("/books", json=BOOK)).json()
        url = f"/books/{book['id']}"
        await client.get(url)
        generation, key = book_generation(book["id"]), book_key(book["id"])
        assert (await other_instance.lookup(generation, key)).entries[0] is not None

        await proxy.cut()
        changed = await client.patch(url, json={"title": "Dune Messiah"})
        assert changed.status_code == 200
        assert (await client.get(url)).json()["title"] == "Dune Messiah"  # this instance knows
        assert (await other_instance.lookup(generation, key)).entries[0] is not None  # stale

        await proxy.start()
        back = time.monotonic()
        while (await other_instance.lookup(generation, key)).entries[0] is not None:
            assert time.monotonic() - back < 4 * RETRY_INTERVAL, "the retry was not delivered"
            await asyncio.sleep(0.02)
        stale_for = time.monotonic() - back
    await proxy.cut()
    assert stale_for < 4 * RETRY_INTERVAL


async def run_coherence_check(
    clients: list[httpx.AsyncClient], seconds: float, readers: int = 8
) -> tuple[list[str], int]:
    """Writers bump each book's title `v<n>`; readers check what was acknowledged before them."""
    books = []
    for _ in range(4):
        response = await clients[0].post("/books", json={**BOOK, "title": "v0", "isbn": None})
        books.append(response.json()["id"])
    acknowledged = {book: [(0.0, 0)] for book in books}  # (time acknowledged, version)
    created: list[float] = []
    violations: list[str] = []
    reads = 0
    stop_at = time.monotonic() + seconds

    def required(book: int, started: float) -> int:
        return max(version for at, version in acknowledged[book] if at < started)

    async def write(book: int) -> None:
        version = 0
        while time.monotonic() < stop_at:
            version += 1
            client = random.choice(clients)
            response = await client.patch(f"/books/{book}", json={"title": f"v{version}"})
            assert response.status_code == 200, response.text
            acknowledged[book].append((time.monotonic(), version))

    async def create() -> None:
        while time.monotonic() < stop_at:
            response = await random.choice(clients).post("/books", json={**BOOK, "isbn": None})
            assert response.status_code == 201
            created.append(time.monotonic())
            await asyncio.sleep(0.05)

    async def read() -> None:
        nonlocal reads
        while time.monotonic() < stop_at:
            client = random.choice(clients)
            book = random.choice(books)
            started = time.monotonic()
            if random.random() < 0.5:
                response = await client.get(f"/books/{book}")
                seen = {book: response.json()["title"]}
            else:
                response = await client.get("/books", params={"size": 4})
                page = response.json()
                seen = {item["id"]: item["title"] for item in page["items"]}
                if page["total"] < len(books) + sum(at < started for at in created):
                    violations.append(f"total {page['total']} older than the creates before it")
            reads += 1
            for book_id, title in seen.items():
                if int(title[1:]) < required(book_id, started):
                    violations.append(f"book {book_id}: read {title}, older than acknowledged")

    await asyncio.gather(
        *(write(book) for book in books), create(), *(read() for _ in range(readers))
    )
    return violations, reads
