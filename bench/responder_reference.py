"""The framework's own floor: the same five operations as bench/reference.py, as a bare
Responder app on the same raw driver and orjson: what any Responder service stands on.

No ORM, no validation, no hooks, no middleware beyond Responder's defaults that cost
nothing here (sessions and gzip off, as the service has them). Run as
`uvicorn bench.responder_reference:api` with REFERENCE_DATABASE set as for the other.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from responder import API, Request, Response

from bench.reference import COLUMNS, book_etag, db, timestamp


@asynccontextmanager
async def lifespan(api: API) -> AsyncIterator[None]:
    await db.open()
    yield
    await db.close()


api = API(sessions=False, gzip=False, lifespan=lifespan)


def found(resp: Response, rows: list[dict[str, Any]], status: int = 200) -> None:
    if not rows:
        resp.status_code = 404
        resp.media = {"detail": "not found"}
        return
    resp.headers.update(book_etag(rows[0]))
    resp.status_code = status
    resp.media = rows[0]


@api.route("/books/{book_id:int}", methods=["GET"])
async def get_book(req: Request, resp: Response, *, book_id: int) -> None:
    found(resp, await db.fetch(f"SELECT {COLUMNS} FROM books WHERE id = $1", book_id))


@api.route("/books", methods=["GET"])
async def list_books(req: Request, resp: Response) -> None:
    page = int(req.params.get("page", 1))
    size = int(req.params.get("size", 20))
    total = (await db.fetch("SELECT count(*) AS total FROM books"))[0]["total"]
    items = await db.fetch(
        f"SELECT {COLUMNS} FROM books ORDER BY id LIMIT $1 OFFSET $2", size, (page - 1) * size
    )
    for item in items:
        del item["version"]
    pages = (total + size - 1) // size
    resp.media = {"items": items, "total": total, "page": page, "size": size, "pages": pages}


@api.route("/books", methods=["POST"])
async def create_book(req: Request, resp: Response) -> None:
    body = orjson.loads(await req.content)
    rows = await db.fetch(
        "INSERT INTO books (title, author, year, isbn, created_at, updated_at, version)"
        f" VALUES ($1, $2, $3, $4, $5, $5, 1) RETURNING {COLUMNS}",
        body["title"], body["author"], body["year"], body.get("isbn"), timestamp(),
    )  # fmt: skip
    resp.headers["Location"] = f"/books/{rows[0]['id']}"
    found(resp, rows, 201)


@api.route("/books/{book_id:int}", methods=["PATCH"])
async def update_book(req: Request, resp: Response, *, book_id: int) -> None:
    body = orjson.loads(await req.content)
    found(
        resp,
        await db.fetch(
            "UPDATE books SET title = $1, updated_at = $2, version = version + 1"
            f" WHERE id = $3 RETURNING {COLUMNS}",
            body["title"], timestamp(), book_id,
        ),
    )  # fmt: skip


@api.route("/books/{book_id:int}", methods=["DELETE"])
async def delete_book(req: Request, resp: Response, *, book_id: int) -> None:
    rows = await db.fetch("DELETE FROM books WHERE id = $1 RETURNING id", book_id)
    resp.status_code = 204 if rows else 404
