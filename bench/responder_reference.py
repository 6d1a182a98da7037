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

from bench.reference import book_etag, db


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
    found(resp, await db.book(book_id))


@api.route("/books", methods=["GET"])
async def list_books(req: Request, resp: Response) -> None:
    resp.media = await db.page(int(req.params.get("page", 1)), int(req.params.get("size", 20)))


@api.route("/books", methods=["POST"])
async def create_book(req: Request, resp: Response) -> None:
    rows = await db.create(orjson.loads(await req.content))
    resp.headers["Location"] = f"/books/{rows[0]['id']}"
    found(resp, rows, 201)


@api.route("/books/{book_id:int}", methods=["PATCH"])
async def update_book(req: Request, resp: Response, *, book_id: int) -> None:
    found(resp, await db.update(book_id, orjson.loads(await req.content)["title"]))


@api.route("/books/{book_id:int}", methods=["DELETE"])
async def delete_book(req: Request, resp: Response, *, book_id: int) -> None:
    resp.status_code = 204 if await db.delete(book_id) else 404
