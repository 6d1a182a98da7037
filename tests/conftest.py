"""Fixtures: every API test runs on SQLite and, when TEST_DATABASE_URL is set, on PostgreSQL,
and with TEST_REDIS_URL too, on PostgreSQL with the shared cache on.

PostgreSQL tests get a database of their own per test session (created here,
dropped at the end); each test starts from an empty `books` table and, with
the cache, a key prefix of its own (its keys are deleted afterwards).
"""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import redis
from responder.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app import api
from settings import Settings
from tests.servers import PgBouncer, have_pgbouncer

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL")
# With TEST_POOLER=1 every API test runs once more through Debian's PgBouncer, in
# transaction mode, with DATABASE_POOLER=transaction.
TEST_POOLER = bool(os.environ.get("TEST_POOLER"))
needs_postgres = pytest.mark.skipif(
    not TEST_DATABASE_URL, reason="set TEST_DATABASE_URL to a PostgreSQL server"
)
needs_redis = pytest.mark.skipif(not TEST_REDIS_URL, reason="set TEST_REDIS_URL to a Redis server")
needs_pooler = pytest.mark.skipif(
    not (TEST_DATABASE_URL and TEST_POOLER and have_pgbouncer()),
    reason="set TEST_POOLER=1 and TEST_DATABASE_URL, with Debian's pgbouncer installed",
)
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=needs_postgres),
    pytest.param("postgresql+cache", marks=[needs_postgres, needs_redis]),
    pytest.param("postgresql+pooler", marks=needs_pooler),
]


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy URL as the plain DSN asyncpg takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def admin_query(sql: str, *args: object) -> object:
    """Run one statement on the server's admin database; returns its first value."""
    assert TEST_DATABASE_URL
    dsn = asyncpg_dsn(Settings(database_url=TEST_DATABASE_URL).database_url)
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


def new_postgres_database() -> str:
    """Create a uniquely named database; returns its SQLAlchemy URL."""
    assert TEST_DATABASE_URL
    name = f"books_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_query(f'CREATE DATABASE "{name}"'))
    base = make_url(Settings(database_url=TEST_DATABASE_URL).database_url)
    return base.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    asyncio.run(admin_query(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    if not TEST_DATABASE_URL:
        pytest.skip("set TEST_DATABASE_URL to a PostgreSQL server")
    url = new_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of either kind (PostgreSQL: created for this test, dropped after)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def shared_postgres_url() -> Iterator[str | None]:
    """One PostgreSQL database for this run's API tests (tables emptied between tests)."""
    if not TEST_DATABASE_URL:
        yield None
        return
    url = new_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the test PostgreSQL, for this run."""
    if not (TEST_DATABASE_URL and have_pgbouncer()):
        pytest.skip("needs TEST_DATABASE_URL and Debian's pgbouncer")
    bouncer = PgBouncer(target_port=make_url(TEST_DATABASE_URL).port or 5432)
    bouncer.start()
    yield bouncer
    bouncer.stop()


@pytest.fixture
def cache_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the test Redis, its keys deleted afterwards."""
    if not TEST_REDIS_URL:
        pytest.skip("set TEST_REDIS_URL to a Redis server")
    prefix = f"books-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    with redis.Redis.from_url(TEST_REDIS_URL) as server:
        for key in server.scan_iter(match=f"{prefix}*"):
            server.delete(key)


@pytest.fixture(params=BACKENDS)
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, shared_postgres_url: str | None
) -> Settings:
    """The settings of one backend; the cache stays off unless the backend names it."""
    database, _, layer = request.param.partition("+")
    if database == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"
    else:
        assert shared_postgres_url
        url = shared_postgres_url
    if layer == "pooler":
        through = request.getfixturevalue("pgbouncer").url(url)
        return Settings(database_url=through, redis_url=None, database_pooler="transaction")
    if not layer:
        return Settings(database_url=url, redis_url=None)
    prefix = request.getfixturevalue("cache_prefix")
    return Settings(database_url=url, redis_url=TEST_REDIS_URL, cache_prefix=prefix)


@pytest.fixture
def database_url(settings: Settings) -> str:
    return settings.database_url


@asynccontextmanager
async def app_client(settings: Settings, **options: object) -> AsyncIterator[AsyncTestClient]:
    """The app with `settings` (plus `options`), its lifespan run, on an empty books table."""
    if options:
        backend = settings.model_dump(
            include={"database_url", "redis_url", "cache_prefix", "database_pooler"}
        )
        settings = Settings(**backend, **options)  # type: ignore[arg-type]
    api.state.settings = settings
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        async with api.state.engine.begin() as connection:
            await connection.execute(text("DELETE FROM books"))
        yield client


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    """The app, its lifespan run, on an empty books table."""
    async with app_client(settings) as client:
        yield client


BOOK = {"title": "Dune", "author": "Frank Herbert", "year": 1965, "isbn": "9780441172719"}


@pytest.fixture
async def book(client: AsyncTestClient) -> dict:
    """One stored book, as the API returned it (with its ETag)."""
    response = await client.post("/books", json=BOOK)
    assert response.status_code == 201
    return {**response.json(), "etag": response.headers["ETag"]}
