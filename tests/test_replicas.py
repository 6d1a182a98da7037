"""Read replicas that never show a client the past: a primary and a hot standby of the
test's own, the standby replaying each commit 300 ms late, so that lag is certain."""

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack

import asyncpg
import httpx
import pytest

from tests.conftest import BOOK, TEST_DATABASE_URL, TEST_REDIS_URL, asyncpg_dsn
from tests.servers import PostgresServer, Server, have_postgres_binaries, serving
from tests.test_operations import figure

APPLY_DELAY = 0.3


@pytest.fixture
def replicated() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A primary with a database `books`, and a hot standby 300 ms behind it."""
    if not (TEST_DATABASE_URL and TEST_REDIS_URL and have_postgres_binaries()):
        pytest.skip("needs TEST_DATABASE_URL, TEST_REDIS_URL, initdb, pg_basebackup and runuser")
    primary = PostgresServer()
    primary.start()
    standby = None
    try:
        asyncio.run(execute(primary.database_url("postgres"), "CREATE DATABASE books"))
        standby = PostgresServer(
            standby_of=primary, recovery_min_apply_delay=f"{int(APPLY_DELAY * 1000)}ms"
        )
        standby.start()
        yield primary, standby
    finally:
        if standby is not None:
            standby.remove()
        primary.remove()


async def execute(url: str, sql: str) -> object:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


def environment(primary: PostgresServer, standby: PostgresServer, prefix: str) -> dict[str, str]:
    return {
        "DATABASE_URL": primary.database_url("books"),
        "DATABASE_REPLICA_URLS": standby.database_url("books"),
        "REDIS_URL": str(TEST_REDIS_URL),
        "CACHE_PREFIX": prefix,
        "LOG_LEVEL": "warning",
    }


async def reads_by(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {
        who: figure(text, f'books_reads_total{{served_by="{who}"}}')
        for who in ("replica", "primary")
    }


async def read_only(client: httpx.AsyncClient, count: int) -> None:
    """`count` listings the cache cannot have (each a search of its own)."""
    for number in range(count):
        response = await client.get("/books", params={"q": f"read {number} {time.time()}"})
        assert response.status_code == 200, response.text


async def write_then_read(writer: httpx.AsyncClient, reader: httpx.AsyncClient) -> list[str]:
    """Writes through one instance, each followed at once by reads through the other: what
    the reads got that was older than the acknowledged write."""
    stale: list[str] = []
    created = await writer.post("/books", json={**BOOK, "isbn": None})
    assert created.status_code == 201, created.text
    url, first = created.headers["Location"], created.headers["ETag"]
    if (await reader.get(url)).status_code != 200:
        stale.append("404 after a 201")
    changed = await writer.patch(url, json={"title": "Changed"})
    assert changed.status_code == 200
    after = await reader.get(url)
    if after.headers.get("ETag") != changed.headers["ETag"] or after.json()["title"] != "Changed":
        stale.append("an old ETag or body after a PATCH")
    if (await reader.get(url, headers={"If-None-Match": first})).status_code == 304:
        stale.append("a 304 for the ETag from before the PATCH")
    listed = (await reader.get("/books", params={"q": "Changed", "size": 100})).json()
    if int(url.rsplit("/", 1)[1]) not in {book["id"] for book in listed["items"]}:
        stale.append("a listing without the change")
    assert (await writer.delete(url)).status_code == 204
    if (await reader.get(url)).status_code != 404:
        stale.append("a deleted book")
    return stale


@pytest.mark.parametrize("workers", [1, 2])
def test_a_read_after_an_acknowledged_write_never_sees_the_past(
    replicated: tuple[PostgresServer, PostgresServer], cache_prefix: str, workers: int
):
    """Two instances, one Redis: writes through one, reads through the other right after
    each acknowledgement: never anything older than the write; and once the writes stop,
    most reads come from the replica (by the metrics and by the standby's own counts)."""
    primary, standby = replicated
    env = environment(primary, standby, cache_prefix)
    with ExitStack() as stack:
        writer_server = stack.enter_context(serving(env))
        reader_server = stack.enter_context(serving(env, workers=workers))

        async def check() -> tuple[list[str], dict[str, float], dict[str, float]]:
            async with (
                httpx.AsyncClient(base_url=writer_server.url) as writer,
                httpx.AsyncClient(base_url=reader_server.url) as reader,
            ):
                stale = []
                for _ in range(25):
                    stale += await write_then_read(writer, reader)
                await asyncio.sleep(APPLY_DELAY + 0.5)  # the replica catches up
                before = await reads_by(reader)
                await read_only(reader, 100)
                return stale, before, await reads_by(reader)

        fetched_before = asyncio.run(standby_tuples(standby))
        stale, before, after = asyncio.run(check())
        fetched = asyncio.run(standby_tuples(standby)) - fetched_before
    assert stale == []
    by_replica = after["replica"] - before["replica"]
    by_primary = after["primary"] - before["primary"]
    assert by_replica > 0.8 * (by_replica + by_primary), (by_replica, by_primary)
    assert fetched > 100  # the standby did read them


async def standby_tuples(standby: PostgresServer) -> int:
    """Rows the standby's own statistics say it returned for database `books`."""
    sql = "SELECT tup_returned FROM pg_stat_database WHERE datname = 'books'"
    return int(await execute(standby.database_url("postgres"), sql) or 0)  # type: ignore[call-overload]


def test_a_replica_that_stops_and_returns_fails_no_request(
    replicated: tuple[PostgresServer, PostgresServer], cache_prefix: str
):
    """Stopped under traffic, the replica is skipped (no request fails); started again,
    it serves reads again."""
    primary, standby = replicated
    with serving(environment(primary, standby, cache_prefix)) as server:
        statuses: Counter[int] = Counter()

        async def traffic(seconds: float) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                stop = time.monotonic() + seconds
                while time.monotonic() < stop:
                    created = await http.post("/books", json={**BOOK, "isbn": None})
                    statuses[created.status_code] += 1
                    statuses[(await http.get(created.headers["Location"])).status_code] += 1
                    statuses[(await http.get("/books")).status_code] += 1
                await asyncio.sleep(APPLY_DELAY + 0.3)
                await read_only(http, 20)

        asyncio.run(traffic(1.5))
        served_before_stop = asyncio.run(replica_reads(server))
        standby.stop("fast")
        asyncio.run(traffic(2))
        standby.start()
        deadline = time.monotonic() + 20
        while (
            httpx.get(f"{server.url}/health").json()["replicas"][standby_name(standby)]["status"]
            != "ok"
        ):
            assert time.monotonic() < deadline, "the replica was not seen again"
            time.sleep(0.1)
        before = asyncio.run(replica_reads(server))
        asyncio.run(traffic(1))
        after = asyncio.run(replica_reads(server))
    assert set(statuses) <= {200, 201}, statuses
    assert served_before_stop > 0
    assert after > before  # back to the replica


def standby_name(standby: PostgresServer) -> str:
    return f"127.0.0.1:{standby.port}"


async def replica_reads(server: Server) -> float:
    async with httpx.AsyncClient(base_url=server.url) as http:
        return (await reads_by(http))["replica"]


def test_without_redis_every_read_is_the_primarys(
    replicated: tuple[PostgresServer, PostgresServer], cache_prefix: str
):
    """No shared record of the writes: no replica can be known to be recent enough."""
    primary, standby = replicated
    env = {**environment(primary, standby, cache_prefix), "REDIS_URL": ""}
    with serving(env) as server:

        async def check() -> tuple[list[str], dict[str, float]]:
            async with httpx.AsyncClient(base_url=server.url) as http:
                stale = [problem for _ in range(5) for problem in await write_then_read(http, http)]
                return stale, await reads_by(http)

        stale, reads = asyncio.run(check())
        health = httpx.get(f"{server.url}/health").json()
    assert stale == [] and reads["replica"] == 0 and reads["primary"] > 0
    assert health["status"] == "ok" and health["replicas"]
