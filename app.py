"""The books service: the Responder `api` and its routes.

Run it with `uv run app.py`, or any ASGI server: `uv run uvicorn app:api --workers 4`.
"""

import argparse
import asyncio
import importlib.resources
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import uvicorn
from responder import API, Problem, Query, Request, Response
from responder.ext.auth import BearerAuth
from responder.ext.logging import setup_logging
from responder.ext.metrics import MetricsCollector
from responder.ext.pagination import paginate, set_pagination_headers
from sqlalchemy import ColumnElement, text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

import bulk
from cache import BOOKS_GENERATION, BookCache, Entry, book_generation, book_key, open_cache
from database import open_database, pool_metrics, write_transaction
from listing import SORT_PATTERN, SORTABLE, BookQuery
from models import Book, utc_now
from rate_limit import limit_rate, rate_limiter
from schemas import NO_NUL, BookIn, BookOut, BookPage, BookPatch
from settings import Settings, load_settings

# Swagger UI's files, from the swagger-ui-py package: /docs needs no CDN.
SWAGGER_UI_ASSETS = importlib.resources.files("swagger_ui") / "static"
DOCS_PAGE = Path(__file__).with_name("docs.html").read_text()
MAX_BODY_BYTES = 1024 * 1024
# Ids are 32-bit integers in the table; a larger one cannot name a book.
MAX_ID = 2**31 - 1
HEALTH_CHECK_TIMEOUT = 2.0
logger = logging.getLogger("books")


def plain_problem(payload: dict[str, Any]) -> dict[str, Any]:
    """Every problem body: `detail` always present, `errors` as plain {loc, msg, type}.

    Pydantic's raw errors echo the client's input and may carry exception
    objects in `ctx`; a 5xx must not describe server-side values at all.
    """
    payload.setdefault("detail", payload["title"])
    errors = payload.pop("errors", None)
    if errors and payload["status"] < 500:
        payload["errors"] = [
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": str(error.get("msg", "invalid value")),
                "type": str(error.get("type", "value_error")),
            }
            for error in errors
        ]
    return payload


@asynccontextmanager
async def lifespan(api: API) -> AsyncIterator[None]:
    """Per process (per event loop): the database, its schema checked, and the cache."""
    settings: Settings = api.state.settings
    async with open_database(api), open_cache(settings) as cache:
        api.state.cache = cache
        # Library code compares the tokens, in constant time; None: writes are open.
        tokens = settings.write_tokens
        api.state.writers = BearerAuth(tokens=tokens, realm="books") if tokens else None
        # Responder answers 504 for a handler that runs longer (read per request).
        api.router.request_timeout = settings.request_timeout
        api.state.rate_limiter = rate_limiter(settings, cache)
        yield


settings = load_settings()
# Every log line carries the request's method, path, ID and client (Responder's format).
setup_logging(level=logging.getLevelNamesMapping()[settings.log_level.upper()])
api = API(
    title="Books",
    version="1.0.0",
    description="A books catalogue: Responder, async SQLAlchemy, Alembic.",
    openapi="3.1.0",  # the document at /schema.yml; /docs is served below, offline
    static_dir=str(SWAGGER_UI_ASSETS),
    static_route="/docs/assets",
    metrics_route="/metrics",
    lifespan=lifespan,
    request_id=True,
    # Request IDs in every log line, and an access line per request (so run
    # uvicorn with --no-access-log, as `uv run app.py` does).
    enable_logging=True,
    trust_proxy_headers=settings.trust_proxy_headers,  # client address, links behind a proxy
    security_headers=True,  # X-Content-Type-Options: nosniff and friends
    max_request_size=MAX_BODY_BYTES,
    problem_handler=plain_problem,
    sessions=False,  # a stateless JSON API: no cookie sessions
    gzip=False,  # compression belongs to the proxy in front, not to every worker
    # CORS is fixed when the process starts (the request timeout is set in `lifespan`).
    cors=bool(settings.cors_origins),
    cors_params={
        "allow_origins": settings.cors_origins,
        "allow_methods": ["GET", "POST", "PUT", "PATCH", "DELETE"],
        "allow_headers": ["Content-Type", "Authorization", "If-Match", "If-None-Match"],
        "expose_headers": ["ETag", "Location", "Link", "X-Total-Count", "X-Request-ID"],
        "max_age": 600,
    },
)
api.state.settings = settings
api.add_security_scheme(
    "bearerAuth",
    {
        "type": "http",
        "scheme": "bearer",
        "description": "Needed by POST, PUT, PATCH and DELETE when the server sets API_TOKENS.",
    },
)
api.route(before_request=True)(limit_rate)  # before any other hook: a 429 costs little
WRITERS_ONLY: list[dict[str, list[str]]] = [{"bearerAuth": []}]  # OpenAPI security
PROBLEM_SCHEMA = "#/components/schemas/ProblemDetails"  # Responder's problem schema


def problems(*statuses: int) -> dict[int, dict[str, Any]]:
    """OpenAPI entries for the problems a route answers beyond Responder's own
    (400, 404, 405, 413, 422, 500, and 401/403 where tokens are declared)."""
    content = {"application/problem+json": {"schema": {"$ref": PROBLEM_SCHEMA}}}
    return {
        status: {"description": HTTPStatus(status).phrase, "content": content}
        for status in (*statuses, 503, 504)  # the database away; REQUEST_TIMEOUT
    }


# --- Sessions and errors -----------------------------------------------------


# What the database layer raises when it cannot do its part.
DATABASE_ERRORS = (DBAPIError, PoolTimeoutError, OSError, TimeoutError)
# PostgreSQL's code for a statement cancelled by `statement_timeout` (REQUEST_TIMEOUT).
QUERY_CANCELED = "57014"
# PostgreSQL's codes for "the server is going away or not there yet": shut down by an
# operator, crashed, starting up; and the whole class 08, connection exceptions.
SERVER_GOING_AWAY = ("57P01", "57P02", "57P03", "08")


def database_problem(exc: Exception) -> Problem:
    """The problem a client sees for a database error (never the error's own text)."""
    orig = getattr(exc, "orig", None)
    if isinstance(exc, IntegrityError):
        # Validation leaves the unique ISBN as the only constraint a request can break.
        return Problem(409, "A book with this ISBN already exists.", title="Conflict")
    if getattr(orig, "sqlite_errorname", None) == "SQLITE_FULL":  # the write was rolled back
        detail = "The server has no room left to store this; nothing was changed."
        return Problem(507, detail, title="Insufficient Storage")
    if getattr(orig, "sqlstate", None) == QUERY_CANCELED:
        detail = "The request took longer than the server allows."
        return Problem(504, detail, title="Gateway Timeout")
    if (
        not isinstance(exc, DBAPIError)  # refused connection, full pool, connect timeout
        or isinstance(exc, OperationalError | InterfaceError)
        or exc.connection_invalidated
        or str(getattr(orig, "sqlstate", "")).startswith(SERVER_GOING_AWAY)
    ):
        detail = "The database is unavailable; try again shortly."
        return Problem(503, detail, title="Service Unavailable", headers={"Retry-After": "5"})
    logger.error("database error", exc_info=exc)  # any other driver error is our bug
    return Problem(500, "Internal Server Error")


@asynccontextmanager
async def database_errors_as_problems() -> AsyncIterator[None]:
    """Raise `database_problem(...)` for a database error in the block.

    (Raised as a Problem from the request rather than left to an exception
    handler: Responder 9.2 drops the headers an exception handler sets, and a
    503 needs its Retry-After.)
    """
    try:
        yield
    except DATABASE_ERRORS as exc:
        raise database_problem(exc) from None


@asynccontextmanager
async def reading(req: Request) -> AsyncIterator[AsyncSession]:
    """One session for a request that only reads; closing it ends its transaction.

    (No `.begin()`: a read has nothing to commit, and a commit plus the pool's
    reset would be two more round trips to the driver.)
    """
    async with database_errors_as_problems(), req.api.state.async_session() as session:
        yield session


@asynccontextmanager
async def writing(req: Request) -> AsyncIterator[AsyncSession]:
    """One session and one transaction for a request that writes: committed as a whole
    when the block ends, rolled back if anything in it raises."""
    async with database_errors_as_problems(), write_transaction(req.api.state) as session:
        yield session


def book_cache(req: Request) -> BookCache:
    """The shared cache (a no-op without `REDIS_URL`)."""
    return req.api.state.cache  # type: ignore[no-any-return]


@api.exception_handler(StaleDataError)
async def concurrent_change(req: Request, resp: Response, exc: StaleDataError) -> None:
    resp.problem(409, "The book changed while this request ran; try again.", title="Conflict")


async def database_failure(req: Request, resp: Response, exc: Exception) -> None:
    """A database error outside `reading`/`writing` (none is expected): the same answer."""
    problem = database_problem(exc)
    resp.problem(problem.status_code, problem.detail, title=problem.title)


for error in DATABASE_ERRORS:
    api.add_exception_handler(error, database_failure)


# --- Books -------------------------------------------------------------------


def etag(book: Book) -> str:
    """A strong ETag: the version SQLAlchemy bumps on every UPDATE."""
    return f'"{book.id}-{book.version}"'


def listed(header: list[str], current: str, *, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match header lists `current` (RFC 9110 §13.1)."""
    tags = [tag.strip() for line in header for tag in line.split(",")]
    if "*" in tags:
        return True
    if weak:
        return current in (tag.removeprefix("W/") for tag in tags)
    return current in tags


def check_preconditions(req: Request, book: Book) -> None:
    """Refuse a write whose If-Match / If-None-Match does not hold, before anything changes.

    (Responder's own check runs after the handler, against the new ETag.)
    """
    current = etag(book)
    if_match = req.headers.get_list("If-Match")
    if if_match and not listed(if_match, current, weak=False):
        raise Problem(412, "The book has changed since you read it (If-Match).")
    if_none_match = req.headers.get_list("If-None-Match")
    if if_none_match and listed(if_none_match, current, weak=True):
        raise Problem(412, "The book matches If-None-Match.")


async def find_book(session: AsyncSession, book_id: int, *, for_update: bool = False) -> Book:
    """The book, or a 404; `for_update` locks its row until the transaction ends."""
    book = None
    if 0 < book_id <= MAX_ID:
        book = await session.get(Book, book_id, with_for_update=for_update)
    if book is None:
        raise Problem(404, f"There is no book {book_id}.")
    return book


def apply_changes(session: AsyncSession, book: Book, changes: dict[str, Any]) -> None:
    """Set the fields; a change that changes nothing leaves `updated_at` and the ETag alone."""
    for field, value in changes.items():
        setattr(book, field, value)
    if session.is_modified(book):
        book.updated_at = utc_now()


async def writers_only(req: Request, resp: Response) -> None:
    """Before-hook of every write: with API_TOKENS set, no known bearer token is a 401,
    answered before the body is even looked at."""
    writers: BearerAuth | None = req.api.state.writers
    if writers is not None:
        await writers.authenticate(req)


def json_body(*media_types: str) -> Callable[[Request, Response], Awaitable[None]]:
    """A before-hook answering 415 unless the body is one of `media_types` (any charset)."""
    header = "Accept-Patch" if "application/merge-patch+json" in media_types else "Accept-Post"

    # async, though it awaits nothing: Responder runs a sync hook in a thread pool.
    async def require(req: Request, resp: Response) -> None:
        media_type = req.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type not in media_types:
            raise Problem(
                415,
                f"Send the body as {' or '.join(media_types)}.",
                headers={header: ", ".join(media_types)},
            )

    return require


@api.get("/books", responses=problems(429))
async def list_books(
    req: Request,
    resp: Response,
    *,
    page: int = Query(1, ge=1, description="1-based page number"),
    size: int = Query(20, ge=1, le=100, description="items per page"),
    sort: str = Query(
        "id", pattern=SORT_PATTERN, description=f"comma-separated, `-` for descending: {SORTABLE}"
    ),
    author: str | None = Query(None, pattern=NO_NUL, description="exact author, any case"),
    year: int | None = Query(None, ge=-9999, le=9999, description="exact year"),
    q: str | None = Query(None, pattern=NO_NUL, description="substring of title or author"),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
) -> BookPage:
    """List books a page at a time, by page number or by cursor."""
    query = BookQuery(sort=sort, author=author, year=year, q=q)
    after = None if cursor is None else query.after(cursor)  # a bad cursor is a 400 first
    number = page if cursor is None else None
    page_key, total_key = query.page_key(size, number, cursor), query.total_key()
    cache = book_cache(req)
    lookup = await cache.lookup(BOOKS_GENERATION, page_key, total_key)
    cached_page, cached_total = lookup.entries
    if cached_page is not None:
        books = BookPage.model_validate_json(cached_page.body)
    else:
        total = None if cached_total is None else int(cached_total.body)
        books = await read_page(req, query, number, size, after, total)
        if lookup.storable:
            await cache.store(
                lookup,
                {page_key: Entry(books.model_dump_json()), total_key: Entry(str(books.total))},
            )
    if cursor is None:
        set_pagination_headers(req, resp, books)
    else:
        set_cursor_headers(req, resp, books.total, books.next_cursor)
    return books


async def read_page(
    req: Request,
    query: BookQuery,
    page: int | None,
    size: int,
    after: ColumnElement[bool] | None,
    total: int | None,
) -> BookPage:
    """One page from the database: by number (`page`) or after a cursor (`after`).

    `total` is the count when the cache already knows it.
    """
    async with reading(req) as session:
        books, total = await query.read(
            session, page=page or 1, size=size, after=after, total=total
        )
    next_cursor = query.cursor_after(books[size - 1]) if len(books) > size else None
    result = paginate(books[:size], page=page or 1, size=size, total=total)
    return BookPage(**dict(result) | {"page": page}, next_cursor=next_cursor)


def set_cursor_headers(req: Request, resp: Response, total: int, next_cursor: str | None) -> None:
    """`Link` (next by cursor, first by page) and `X-Total-Count` for a page read by cursor."""
    base = req.full_url.split("?")[0]
    kept = [(k, v) for k, v in req.params.items() if k not in ("cursor", "page")]
    links = [f'<{base}?{urlencode([*kept, ("page", "1")])}>; rel="first"']
    if next_cursor is not None:
        links.insert(0, f'<{base}?{urlencode([*kept, ("cursor", next_cursor)])}>; rel="next"')
    resp.headers["Link"] = ", ".join(links)
    resp.headers["X-Total-Count"] = str(total)


@api.post(
    "/books",
    status_code=201,
    before=[writers_only, json_body("application/json")],
    security=WRITERS_ONLY,
    responses=problems(409, 415, 429, 507),
)
async def create_book(req: Request, resp: Response, *, book: BookIn) -> BookOut:
    """Add a book."""
    now = utc_now()
    created = Book(**book.model_dump(), created_at=now, updated_at=now)
    async with writing(req) as session:
        session.add(created)
    await book_cache(req).invalidate()
    resp.headers["Location"] = f"/books/{created.id}"
    resp.headers["ETag"] = etag(created)
    return BookOut.model_validate(created)


@api.get("/books/{book_id:int}", responses={304: "Not Modified", **problems(429)})
async def get_book(req: Request, resp: Response, *, book_id: int) -> BookOut:
    """One book, with its ETag; `If-None-Match` with that ETag answers 304."""
    cache = book_cache(req)
    lookup = await cache.lookup(book_generation(book_id), book_key(book_id))
    if (cached := lookup.entries[0]) is not None:
        resp.etag = cached.etag
        return BookOut.model_validate_json(cached.body)
    async with reading(req) as session:
        book = await find_book(session, book_id)
    found = BookOut.model_validate(book)
    resp.etag = etag(book)
    if lookup.storable:
        await cache.store(lookup, {book_key(book_id): Entry(found.model_dump_json(), resp.etag)})
    return found


@api.put(
    "/books/{book_id:int}",
    before=[writers_only, json_body("application/json")],
    security=WRITERS_ONLY,
    responses=problems(409, 412, 415, 429, 507),
)
async def replace_book(req: Request, resp: Response, *, book_id: int, book: BookIn) -> BookOut:
    """Replace a book whole; a field left out (`isbn`) is cleared."""
    async with writing(req) as session:
        stored = await find_book(session, book_id, for_update=True)
        check_preconditions(req, stored)
        apply_changes(session, stored, book.model_dump())
    await book_cache(req).invalidate(book_id)
    resp.headers["ETag"] = etag(stored)
    return BookOut.model_validate(stored)


@api.patch(
    "/books/{book_id:int}",
    before=[writers_only, json_body("application/json", "application/merge-patch+json")],
    security=WRITERS_ONLY,
    responses=problems(409, 412, 415, 429, 507),
)
async def update_book(req: Request, resp: Response, *, book_id: int, patch: BookPatch) -> BookOut:
    """Change some fields of a book; `"isbn": null` clears the ISBN."""
    async with writing(req) as session:
        stored = await find_book(session, book_id, for_update=True)
        check_preconditions(req, stored)
        apply_changes(session, stored, patch.model_dump(exclude_unset=True))
    await book_cache(req).invalidate(book_id)
    resp.headers["ETag"] = etag(stored)
    return BookOut.model_validate(stored)


@api.delete(
    "/books/{book_id:int}",
    status_code=204,
    before=[writers_only],
    security=WRITERS_ONLY,
    responses=problems(412, 429),
)
async def delete_book(req: Request, resp: Response, *, book_id: int) -> None:
    """Delete a book; its id is never used again."""
    async with writing(req) as session:
        book = await find_book(session, book_id, for_update=True)
        check_preconditions(req, book)
        await session.delete(book)
    await book_cache(req).invalidate(book_id)


# --- Operations --------------------------------------------------------------


async def database_check(req: Request) -> None:
    async with reading(req) as session:
        await session.execute(text("SELECT 1"))


async def cache_check(req: Request) -> None:
    if not await book_cache(req).ping():
        raise ConnectionError("the cache did not answer")


async def timed(check: Callable[[Request], Any], req: Request) -> dict[str, Any]:
    """Run one health check under a timeout; report its status and latency, never its error."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(req), HEALTH_CHECK_TIMEOUT)
        status = "ok"
    except Exception:
        status = "error"
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    return {"status": status, "latency_ms": latency_ms}


@api.get("/health", include_in_schema=False)
async def health(req: Request, resp: Response) -> None:
    """200 while the database answers, 503 otherwise; the cache is reported, not required.

    Written out rather than `health_route=`: Responder's version reports no
    latency, runs checks without a timeout and sends exception text to clients.
    """
    checks = {"database": timed(database_check, req)}
    if book_cache(req).enabled:
        checks["cache"] = timed(cache_check, req)
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    healthy = results["database"]["status"] == "ok"
    resp.status_code = 200 if healthy else 503
    resp.media = {"status": "ok" if healthy else "error", "checks": results}


@api.get("/docs", include_in_schema=False)
async def docs(req: Request, resp: Response) -> None:
    """The interactive documentation (Swagger UI) of /schema.yml, with no outside assets.

    Written out rather than `docs_route=`: Responder's page loads Swagger UI from a CDN.
    """
    resp.html = DOCS_PAGE


class ServiceMetrics:
    """Responder's request metrics, then the database pool and the cache figures."""

    def __init__(self, requests: MetricsCollector) -> None:
        self.requests = requests

    def render(self) -> str:
        text = self.requests.render()
        if hasattr(api.state, "engine"):
            text += pool_metrics(api.state.engine) + api.state.cache.metrics()
        return text


# Responder's /metrics route renders whatever `api.metrics` is at request time;
# its middleware keeps recording into the collector wrapped here.
api.metrics = ServiceMetrics(api.metrics)  # type: ignore[assignment]


def counted(lowest: int, highest: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `lowest` to `highest` (else a usage error)."""

    def parse(text: str) -> int:
        number = int(text)  # a ValueError is argparse's "invalid value"
        if not lowest <= number <= highest:
            raise argparse.ArgumentTypeError(f"must be {lowest:,} to {highest:,}")
        return number

    return parse


def main() -> int:
    """`uv run app.py` serves the API; `import FILE` and `seed N` load books (see bulk.py)."""
    parser = argparse.ArgumentParser(prog="app.py", description="The books service.")
    commands = parser.add_subparsers(dest="command", title="commands (none: serve the API)")
    loading = commands.add_parser(
        "import",
        help="load books from a CSV or JSON Lines file",
        description="Load books from a CSV (with a header line) or JSON Lines file, "
        "validated as the API validates them; rejected lines are reported and skipped.",
    )
    loading.add_argument("file", type=Path)
    loading.add_argument("--format", choices=["csv", "jsonl"], help="default: by file suffix")
    loading.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="one transaction: store nothing if any line is rejected (default: commit batches)",
    )
    loading.add_argument(
        "--batch-size",
        type=counted(1, bulk.MAX_BATCH_SIZE),
        default=bulk.BATCH_SIZE,
        metavar="N",
        help=f"books per transaction, 1 to {bulk.MAX_BATCH_SIZE:,} (default {bulk.BATCH_SIZE:,})",
    )
    seeding = commands.add_parser("seed", help="create N plausible books to try the API with")
    seeding.add_argument("count", type=counted(0, 10**9), metavar="N")
    args = parser.parse_args()
    settings: Settings = api.state.settings
    if args.command == "import":
        return bulk.import_file(
            settings,
            args.file,
            fmt=args.format,
            all_or_nothing=args.all_or_nothing,
            batch_size=args.batch_size,
        )
    if args.command == "seed":
        return bulk.seed(settings, args.count)
    uvicorn.run(
        api,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=8,
        access_log=False,  # Responder logs each request, with its request ID
        # uvicorn would trust X-Forwarded-For from 127.0.0.1 by default: only
        # TRUST_PROXY_HEADERS decides whose address a client has (Responder).
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
