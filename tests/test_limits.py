"""REQUEST_TIMEOUT (504, and PostgreSQL's statement timeout) and CORS_ORIGINS."""

import asyncio
import sqlite3
import time

import asyncpg
import httpx
import pytest
from responder.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app import api
from settings import Settings
from tests.conftest import BOOK, app_client, asyncpg_dsn
from tests.servers import serving

TIMEOUT = 0.5


async def hold_the_book(database_url: str, book_id: int) -> tuple[object, object]:
    """Another client that locks the book's row (PostgreSQL) or the database (SQLite)."""
    if make_url(database_url).get_backend_name() == "sqlite":
        holder = sqlite3.connect(str(make_url(database_url).database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        return holder, None
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT 1 FROM books WHERE id = $1 FOR UPDATE", book_id)
    return holder, transaction


async def release(holder: object, transaction: object) -> None:
    if isinstance(holder, sqlite3.Connection):
        holder.execute("ROLLBACK")
        holder.close()
        return
    assert isinstance(holder, asyncpg.Connection) and transaction is not None
    await transaction.rollback()  # type: ignore[attr-defined]
    await holder.close()


async def test_a_request_that_takes_too_long_is_a_504_and_changes_nothing(settings: Settings):
    async with app_client(settings, request_timeout=TIMEOUT) as client:
        created = await client.post("/books", json=BOOK)
        path = created.headers["Location"]
        holder, transaction = await hold_the_book(settings.database_url, created.json()["id"])
        try:
            started = time.monotonic()
            response = await client.patch(path, json={"title": "Never"})
            took = time.monotonic() - started
        finally:
            await release(holder, transaction)
        assert response.status_code == 504, response.text
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert response.json()["status"] == 504
        assert TIMEOUT <= took < TIMEOUT + 1.5
        # The service goes on: reads, and the write that now gets its lock.
        stored = await client.get(path)
        assert stored.json()["title"] == BOOK["title"]
        assert stored.headers["ETag"] == created.headers["ETag"]
        for _ in range(50):  # SQLite: the abandoned BEGIN may hold its connection a moment
            retried = await client.patch(path, json={"title": "Now"})
            if retried.status_code != 504:
                break
        assert retried.status_code == 200, retried.text


async def test_postgresql_statements_get_the_same_timeout(client: AsyncTestClient):
    if api.state.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no statement timeout (its busy timeout is capped instead)")
    async with api.state.engine.connect() as connection:
        assert (await connection.execute(text("SHOW statement_timeout"))).scalar() == "0"
    async with (
        app_client(api.state.settings, request_timeout=TIMEOUT),
        api.state.engine.connect() as connection,
    ):
        shown = (await connection.execute(text("SHOW statement_timeout"))).scalar()
        assert shown == "500ms"
        # And a statement that outlives it is cancelled by the server itself.
        started = time.monotonic()
        try:
            await connection.execute(text("SELECT pg_sleep(3)"))
            raise AssertionError("pg_sleep(3) was not cancelled")
        except Exception as exc:
            assert getattr(getattr(exc, "orig", None), "sqlstate", None) == "57014"
        assert time.monotonic() - started < 2


def test_cors_exposes_the_headers_clients_need(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}",
        "CORS_ORIGINS": "https://books.example, https://admin.example",
    }
    with serving(env) as server:
        base = server.url
        preflight = httpx.options(
            f"{base}/books/1",
            headers={
                "Origin": "https://books.example",
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "Content-Type, Authorization, If-Match",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://books.example"
        allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
        for header in ("content-type", "authorization", "if-match", "if-none-match"):
            assert header in allowed
        assert "PATCH" in preflight.headers["Access-Control-Allow-Methods"]

        created = httpx.post(
            f"{base}/books", json=BOOK, headers={"Origin": "https://admin.example"}
        )
        assert created.headers["Access-Control-Allow-Origin"] == "https://admin.example"
        exposed = created.headers["Access-Control-Expose-Headers"].lower().replace(" ", "")
        wanted = {"etag", "location", "link", "x-total-count", "x-request-id"}
        assert set(exposed.split(",")) >= wanted
        assert created.headers["X-Content-Type-Options"] == "nosniff"

        stranger = httpx.get(f"{base}/books", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in stranger.headers


def test_without_cors_origins_there_are_no_cors_headers(tmp_path):
    with serving({"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"}) as server:
        response = httpx.get(f"{server.url}/books", headers={"Origin": "https://x.example"})
        assert not any(name.lower().startswith("access-control-") for name in response.headers)


async def test_timeouts_leave_the_pool_whole(settings: Settings):
    """Ten abandoned requests in a row do not use up the connections."""
    async with app_client(settings, request_timeout=TIMEOUT) as client:
        created = await client.post("/books", json=BOOK)
        holder, transaction = await hold_the_book(settings.database_url, created.json()["id"])
        try:
            results = await asyncio.gather(
                *(client.patch(created.headers["Location"], json={"year": y}) for y in range(10))
            )
        finally:
            await release(holder, transaction)
        assert {response.status_code for response in results} == {504}
        for _ in range(50):
            if (await client.get("/health")).status_code == 200:
                break
        listing = await client.get("/books")
        assert listing.status_code == 200 and listing.json()["total"] == 1
