"""The benchmark's yardstick: the same five operations as a bare Starlette app on the raw driver.

No ORM, no validation beyond what the queries need, orjson for JSON: roughly
the fastest a Python ASGI service can answer these requests. Run as
`uvicorn bench.reference:app` with REFERENCE_DATABASE set to a PostgreSQL DSN
or to the path of a SQLite file.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiosqlite
import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DATABASE = os.environ.get("REFERENCE_DATABASE", "books.db")
POSTGRES = DATABASE.startswith("postgresql://")
COLUMNS = "id, title, author, year, isbn, created_at, updated_at, version"


class Database:
    """One asyncpg pool, or one aiosqlite connection in WAL mode; `$n` placeholders."""

    pool: asyncpg.Pool
    sqlite: aiosqlite.Connection

    async def open(self) -> None:
        if POSTGRES:
            self.pool = await asyncpg.create_pool(DATABASE, min_size=10, max_size=10)
        else:
            self.sqlite = await aiosqlite.connect(DATABASE, isolation_level=None)
            self.sqlite.row_factory = aiosqlite.Row
            await self.sqlite.execute("PRAGMA journal_mode=WAL")
            await self.sqlite.execute("PRAGMA synchronous=FULL")  # as durable as the app

    async def close(self) -> None:
        if POSTGRES:
            await self.pool.close()
        else:
            await self.sqlite.close()

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if POSTGRES:
            return [dict(row) for row in await self.pool.fetch(sql, *args)]
        sql = sql.replace("$", "?")  # ?1, ?2: SQLite's numbered parameters
        async with self.sqlite.execute(sql, args) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    # The five operations, as both references (Starlette's and Responder's) run them.

    async def book(self, book_id: int) -> list[dict[str, Any]]:
        return await self.fetch(f"SELECT {COLUMNS} FROM books WHERE id = $1", book_id)

    async def page(self, page: int, size: int) -> dict[str, Any]:
        total = (await self.fetch("SELECT count(*) AS total FROM books"))[0]["total"]
        items = await self.fetch(
            f"SELECT {COLUMNS} FROM books ORDER BY id LIMIT $1 OFFSET $2", size, (page - 1) * size
        )
        for item in items:
            del item["version"]
        pages = (total + size - 1) // size
        return {"items": items, "total": total, "page": page, "size": size, "pages": pages}

    async def create(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.fetch(
            "INSERT INTO books (title, author, year, isbn, created_at, updated_at, version)"
            f" VALUES ($1, $2, $3, $4, $5, $5, 1) RETURNING {COLUMNS}",
            body["title"], body["author"], body["year"], body.get("isbn"), timestamp(),
        )  # fmt: skip

    async def update(self, book_id: int, title: str) -> list[dict[str, Any]]:
        return await self.fetch(
            "UPDATE books SET title = $1, updated_at = $2, version = version + 1"
            f" WHERE id = $3 RETURNING {COLUMNS}",
            title, timestamp(), book_id,
        )  # fmt: skip

    async def delete(self, book_id: int) -> bool:
        return bool(await self.fetch("DELETE FROM books WHERE id = $1 RETURNING id", book_id))


db = Database()


def json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def timestamp() -> object:
    """Now, as each database stores it (SQLAlchemy keeps naive UTC text in SQLite)."""
    now = datetime.now(UTC)
    return now if POSTGRES else now.replace(tzinfo=None).isoformat(sep=" ")


def book_etag(book: dict[str, Any]) -> dict[str, str]:
    return {"ETag": f'"{book["id"]}-{book.pop("version")}"'}


async def get_book(request: Request) -> Response:
    rows = await db.book(request.path_params["id"])
    if not rows:
        return json({"detail": "not found"}, 404)
    return json(rows[0], headers=book_etag(rows[0]))


async def list_books(request: Request) -> Response:
    page = int(request.query_params.get("page", 1))
    size = int(request.query_params.get("size", 20))
    return json(await db.page(page, size))


async def create_book(request: Request) -> Response:
    book = (await db.create(orjson.loads(await request.body())))[0]
    return json(book, 201, {"Location": f"/books/{book['id']}", **book_etag(book)})


async def update_book(request: Request) -> Response:
    body = orjson.loads(await request.body())
    rows = await db.update(request.path_params["id"], body["title"])
    if not rows:
        return json({"detail": "not found"}, 404)
    return json(rows[0], headers=book_etag(rows[0]))


async def delete_book(request: Request) -> Response:
    return Response(status_code=204 if await db.delete(request.path_params["id"]) else 404)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await db.open()
    yield
    await db.close()


app = Starlette(
    routes=[
        Route("/books", list_books, methods=["GET"]),
        Route("/books", create_book, methods=["POST"]),
        Route("/books/{id:int}", get_book, methods=["GET"]),
        Route("/books/{id:int}", update_book, methods=["PATCH"]),
        Route("/books/{id:int}", delete_book, methods=["DELETE"]),
    ],
    lifespan=lifespan,
)
