"""What every resource's routes share: problems, sessions per request, ETags and
preconditions, body checks, and the headers of a page read by cursor."""

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import urlencode

from responder import Problem, Request, Response
from responder.ext.auth import BearerAuth
from responder.ext.pagination import paginate, set_pagination_headers
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from cache import BookCache, Entry
from database import violated_constraint, write_transaction
from listing import Listing, ListingQuery
from models import conflict_detail, utc_now
from replicas import Replicas, served_by
from schemas import CursorPage

logger = logging.getLogger("books")
Handler = TypeVar("Handler", bound=Callable[..., Any])
Result = TypeVar("Result")
PageOf = TypeVar("PageOf", bound=CursorPage[Any])

# Ids are 32-bit integers in the tables; a larger one cannot name anything.
MAX_ID = 2**31 - 1
WRITERS_ONLY: list[dict[str, list[str]]] = [{"bearerAuth": []}]  # OpenAPI security
PROBLEM_SCHEMA = "#/components/schemas/ProblemDetails"  # Responder's problem schema


# --- Problems ------------------------------------------------------------------


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


def problems(*statuses: int) -> dict[int, dict[str, Any]]:
    """OpenAPI entries for the problems a route answers beyond Responder's own
    (400, 404, 405, 413, 422, 500, and 401/403 where tokens are declared)."""
    content = {"application/problem+json": {"schema": {"$ref": PROBLEM_SCHEMA}}}
    return {
        status: {"description": HTTPStatus(status).phrase, "content": content}
        for status in (*statuses, 503, 504)  # the database away; REQUEST_TIMEOUT
    }


# --- Database errors and sessions ------------------------------------------------

# What the database layer raises when it cannot do its part.
DATABASE_ERRORS = (DBAPIError, PoolTimeoutError, OSError, TimeoutError)
# PostgreSQL's code for a statement cancelled by `statement_timeout` (REQUEST_TIMEOUT).
QUERY_CANCELED = "57014"
# A serialization failure or a standby's recovery conflict: worth one more try of a read.
RETRY_READ = "40001"
# A prepared statement missing, or there already: named statements of one client met on
# server connections a pooler handed to another (26000, 42P05).
POOLER_TROUBLE = ("26000", "42P05")
# PostgreSQL's codes for "not now, try again": connection exceptions (class 08), too
# few resources (53: too many connections), the server going away or not there yet
# (57P01-03), a write on a read-only server (25006: a standby, a demoted primary),
# serialization and recovery conflicts (40001) and deadlocks (40P01).
POSTGRESQL_UNAVAILABLE = ("08", "53", "57P01", "57P02", "57P03", "25006", "40001", "40P01")
# SQLite's result codes for the same (extended codes start with these): the file
# locked, unreadable or read-only, the disk failing. Any other SQLite error, like
# "LIKE or GLOB pattern too complex", is not the database being away.
SQLITE_UNAVAILABLE = (
    "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_IOERR",
    "SQLITE_PROTOCOL", "SQLITE_NOMEM",
)  # fmt: skip


def conflict_problem(error: IntegrityError) -> Problem:
    """A 409 that names what the request collided with, found by the constraint's name."""
    name = violated_constraint(error)
    detail = conflict_detail(name)
    if detail is None:
        logger.warning("integrity error on an unmapped constraint: %s", name or "unknown")
        detail = "The request conflicts with the stored data."
    return Problem(409, detail, title="Conflict")


def database_problem(exc: Exception) -> Problem:
    """The problem a client sees for a database error (never the error's own text)."""
    orig = getattr(exc, "orig", None)
    sqlstate, sqlite_error = (
        getattr(orig, "sqlstate", None),
        getattr(orig, "sqlite_errorname", None),
    )
    if isinstance(exc, IntegrityError):
        return conflict_problem(exc)
    if isinstance(exc, StaleDataError):  # the version check of an UPDATE found none
        return Problem(409, "It changed while this request ran; try again.", title="Conflict")
    if sqlite_error == "SQLITE_FULL":  # the write was rolled back
        detail = "The server has no room left to store this; nothing was changed."
        return Problem(507, detail, title="Insufficient Storage")
    if sqlstate == QUERY_CANCELED:
        detail = "The request took longer than the server allows."
        return Problem(504, detail, title="Gateway Timeout")
    if sqlstate in POOLER_TROUBLE:
        logger.error(
            "prepared statements broken (%s): behind a transaction-mode pooler such as "
            "PgBouncer, set DATABASE_POOLER=transaction",
            sqlstate,
        )
        return Problem(500, "Internal Server Error")
    if database_unavailable(exc):
        # Once, with its cause, and never the error's text (it may hold parameters).
        logger.warning(
            "database unavailable (503): %s", sqlstate or sqlite_error or type(exc).__name__
        )
        detail = "The database is unavailable; try again shortly."
        return Problem(503, detail, title="Service Unavailable", headers={"Retry-After": "5"})
    logger.error("database error", exc_info=exc)  # any other driver error is our bug
    return Problem(500, "Internal Server Error")


def database_unavailable(exc: Exception) -> bool:
    """Whether a database error means "not now" (a 503), not a fault of the request's."""
    if not isinstance(exc, DBAPIError):  # refused connection, full pool, connect timeout
        return True
    orig = exc.orig
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if (sqlite_error := getattr(orig, "sqlite_errorname", None)) is not None:
        return str(sqlite_error).startswith(SQLITE_UNAVAILABLE)
    if (sqlstate := getattr(orig, "sqlstate", None)) is not None:
        return str(sqlstate).startswith(POSTGRESQL_UNAVAILABLE)
    return isinstance(exc, OperationalError)  # a driver error without a code: the connection


@asynccontextmanager
async def database_errors_as_problems() -> AsyncIterator[None]:
    """Raise `database_problem(...)` for a database error in the block.

    (Raised as a Problem from the request rather than left to an exception
    handler: Responder 9.2 drops the headers an exception handler sets, and a
    503 needs its Retry-After.)
    """
    try:
        yield
    except (*DATABASE_ERRORS, StaleDataError) as exc:
        raise database_problem(exc) from None


async def database_failure(req: Request, resp: Response, exc: Exception) -> None:
    """Exception handler for a database error outside `read`/`writing` (none is
    expected): the same answer."""
    problem = database_problem(exc)
    resp.problem(problem.status_code, problem.detail, title=problem.title)


async def read(
    req: Request,
    work: Callable[[AsyncSession], Awaitable[Result]],
    at_least: int | None = None,
) -> Result:
    """`work(session)` in a session of its own for a request that only reads; a database
    error is a problem.

    On a replica that has replayed WAL position `at_least` if there is one (replicas.py;
    None: the primary); a read the replica fails is read again from the primary. A read
    cancelled by a serialization or recovery conflict (40001: a standby replaying what the
    read would see) is tried once more, on the primary, before it is a problem.

    (No `.begin()`: a read has nothing to commit, and a commit plus the pool's reset
    would be two more round trips to the driver.)
    """
    replicas: Replicas = req.api.state.replicas
    replica = replicas.choose(at_least)
    for attempt in (1, 2):
        sessions = req.api.state.async_session if replica is None else replica.sessions
        try:
            async with sessions() as session:
                result = await work(session)
            served_by(replica)
            return result
        except (*DATABASE_ERRORS, StaleDataError) as exc:
            conflict = getattr(getattr(exc, "orig", None), "sqlstate", None) == RETRY_READ
            if attempt == 1 and (replica is not None or conflict):
                if replica is not None:
                    logger.warning(
                        "replica %s failed a read (%s)", replica.name, type(exc).__name__
                    )
                replica = None
                continue
            raise database_problem(exc) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def invalidate(req: Request, book_id: int | None = None) -> None:
    """After a committed write: the cache's entries it changed are gone, on every instance,
    and, with replicas, reads that start from now on need its WAL position."""
    position = await req.api.state.replicas.primary_position()
    await shared_cache(req).invalidate(book_id, position)


@asynccontextmanager
async def writing(req: Request) -> AsyncIterator[AsyncSession]:
    """One session and one transaction for a request that writes: committed as a whole
    when the block ends, rolled back if anything in it raises."""
    async with database_errors_as_problems(), write_transaction(req.api.state) as session:
        yield session


def shared_cache(req: Request) -> BookCache:
    """The shared cache (a no-op without `REDIS_URL`)."""
    return req.api.state.cache  # type: ignore[no-any-return]


# --- ETags, preconditions, changes -------------------------------------------------


def etag(row: Any) -> str:
    """A strong ETag for a stored row: the version SQLAlchemy bumps on every UPDATE."""
    return f'"{row.id}-{row.version}"'


def apply_changes(session: AsyncSession, row: Any, changes: dict[str, Any]) -> None:
    """Set the fields; a change that changes nothing leaves `updated_at` and the ETag alone."""
    for name, value in changes.items():
        setattr(row, name, value)
    if session.is_modified(row):
        row.updated_at = utc_now()


def listed(header: list[str], current: str, *, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match header lists `current` (RFC 9110 §13.1)."""
    tags = [tag.strip() for line in header for tag in line.split(",")]
    if "*" in tags:
        return True
    if weak:
        return current in (tag.removeprefix("W/") for tag in tags)
    return current in tags


def http_date(moment: datetime) -> str:
    """`moment` as an HTTP-date (RFC 9110 §5.6.7): whole seconds, GMT."""
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def check_preconditions(req: Request, current: str, modified: datetime, noun: str) -> None:
    """Refuse (412) a request whose preconditions fail for the stored `noun`, whose ETag
    is `current` and which last changed at `modified`: before anything changes, or, for
    a read, before it is answered. RFC 9110 §13.2.2's order: If-Match, else
    If-Unmodified-Since; then, on a write, If-None-Match. (A read's If-None-Match and
    If-Modified-Since are 304s, which Responder answers from `resp.etag` and
    `resp.last_modified`; Responder's own check of a write's preconditions runs after
    the handler, against the new ETag.)
    """
    if_match = req.headers.get_list("If-Match")
    since = http_date_in(req.headers.get("If-Unmodified-Since"))
    if if_match and not listed(if_match, current, weak=False):
        raise Problem(412, f"The {noun} has changed since you read it (If-Match).")
    if not if_match and since is not None and modified.replace(microsecond=0) > since:
        raise Problem(412, f"The {noun} has changed since then (If-Unmodified-Since).")
    if_none_match = req.headers.get_list("If-None-Match")
    a_write = req.method not in ("GET", "HEAD")
    if a_write and if_none_match and listed(if_none_match, current, weak=True):
        raise Problem(412, f"The {noun} matches If-None-Match.")


def http_date_in(header: str | None) -> datetime | None:
    """An HTTP-date header's moment; None if absent or invalid (then it is ignored)."""
    try:
        moment = parsedate_to_datetime(header) if header else None
    except (TypeError, ValueError):
        return None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def answer_read(req: Request, resp: Response, current: str, modified: datetime, noun: str) -> None:
    """A read's preconditions (412), then its validators: Responder answers a matching
    If-None-Match or an If-Modified-Since the representation is not newer than with 304."""
    check_preconditions(req, current, modified, noun)
    resp.etag = current
    resp.last_modified = modified


def answer_write(resp: Response, row: Any) -> None:
    """The validators of a row just written, as headers on the write's response (as
    `resp.etag`, Responder would check the request's preconditions once more, against
    the new ETag)."""
    resp.headers["ETag"] = etag(row)
    resp.headers["Last-Modified"] = http_date(row.updated_at)


# --- Request hooks ------------------------------------------------------------------


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


# --- Listings ---------------------------------------------------------------------


def query_parameters(parameters: Mapping[str, tuple[Any, Any]]) -> Callable[[Handler], Handler]:
    """Add keyword-only query parameters (name: (type, `Query(...)` marker)) to a handler,
    which receives them in its `**kwargs`.

    Responder parses, validates and documents a handler's parameters from its
    signature; this lets a listing's filters, declared once as data, be that
    signature too, instead of a second list written by hand.
    """

    def add(handler: Handler) -> Handler:
        signature = inspect.signature(handler)
        declared = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        keywords = [p for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=marker, annotation=kind)
            for name, (kind, marker) in parameters.items()
        ]
        handler.__signature__ = signature.replace(parameters=[*declared, *added, *keywords])  # type: ignore[attr-defined]
        handler.__annotations__ |= {name: kind for name, (kind, _) in parameters.items()}
        return handler

    return add


async def listing_page(
    req: Request,
    resp: Response,
    listing: Listing,
    page_type: type[PageOf],
    parameters: Mapping[str, Any],
    *,
    generation: str,
    scope: Mapping[str, Any] | None = None,
    counted: Callable[[AsyncSession], Awaitable[int]] | None = None,
) -> PageOf:
    """One page of `listing` as the query `parameters` ask for it (by number or after a
    cursor), with its pagination headers.

    From the shared cache when it holds the page under `generation` (whose token
    every write that changes the listing renews), else from the database.
    `scope` holds filters the route sets (the book whose reviews are listed);
    `counted`, if given, finds the total in the database (and may refuse, say with
    a 404).
    """
    filters = {name: parameters.get(name) for name in listing.filters} | dict(scope or {})
    query = listing.query(parameters["sort"], filters)
    size, cursor = parameters["size"], parameters["cursor"]
    after = None if cursor is None else query.position(cursor)  # a bad cursor is a 400 first
    number = parameters["page"] if cursor is None else None
    cache = shared_cache(req)
    page_key = total_key = ""  # two hashes: computed only with a cache to look in
    if cache.enabled:
        page_key, total_key = query.page_key(size, number, cursor), query.total_key()
    lookup = await cache.lookup(generation, page_key, total_key)
    cached_page, cached_total = lookup.entries
    if cached_page is not None:
        found = page_type.model_validate_json(cached_page.body)
    else:
        cached = None if cached_total is None else int(cached_total.body)

        async def rows_and_total(session: AsyncSession) -> tuple[list[Any], int]:
            total = cached if counted is None else await counted(session)
            return await query.read(session, page=number or 1, size=size, after=after, total=total)

        rows, total = await read(req, rows_and_total, lookup.position)
        found = page_of(page_type, query, rows, number, size, total)
        if lookup.storable:
            entries = {page_key: Entry(found.model_dump_json()), total_key: Entry(str(total))}
            await cache.store(lookup, entries)
    if cursor is None:
        set_pagination_headers(req, resp, found)
    else:
        set_cursor_headers(req, resp, found.total, found.next_cursor)
    return found


def page_of(
    page_type: type[PageOf],
    query: ListingQuery,
    rows: list[Any],
    page: int | None,
    size: int,
    total: int,
) -> PageOf:
    """The page holding `rows` (one more than `size` when more follow)."""
    next_cursor = query.cursor_after(rows[size - 1]) if len(rows) > size else None
    result = paginate(rows[:size], page=page or 1, size=size, total=total)
    return page_type(**dict(result) | {"page": page}, next_cursor=next_cursor)


def set_cursor_headers(req: Request, resp: Response, total: int, next_cursor: str | None) -> None:
    """`Link` (next by cursor, first by page) and `X-Total-Count` for a page read by cursor."""
    base = req.full_url.split("?")[0]
    kept = [(k, v) for k, v in req.params.items() if k not in ("cursor", "page")]
    links = [f'<{base}?{urlencode([*kept, ("page", "1")])}>; rel="first"']
    if next_cursor is not None:
        links.insert(0, f'<{base}?{urlencode([*kept, ("cursor", next_cursor)])}>; rel="next"')
    resp.headers["Link"] = ", ".join(links)
    resp.headers["X-Total-Count"] = str(total)
