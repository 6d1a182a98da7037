"""The book resource: `/books` and `/books/{book_id}`."""

from typing import Any

from responder import Problem, Query, Request, Response, Router
from responder.ext.pagination import paginate, set_pagination_headers
from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from cache import BOOKS_GENERATION, Entry, book_generation, book_key
from listing import Filter, Listing, ListingQuery
from models import Book, BookCount, utc_now
from schemas import NO_NUL, BookIn, BookOut, BookPage, BookPatch
from web import (
    MAX_ID,
    WRITERS_ONLY,
    check_preconditions,
    json_body,
    problems,
    query_parameters,
    reading,
    set_cursor_headers,
    shared_cache,
    writers_only,
    writing,
)

router = Router()

BOOKS = Listing(
    name="books",
    model=Book,
    sortable=("id", "title", "author", "year", "created_at", "updated_at"),
    filters={
        "author": Filter(
            str,
            Query(None, pattern=NO_NUL, description="exact author, any case"),
            lambda author: func.lower(Book.author) == func.lower(author),
        ),
        "year": Filter(
            int,
            Query(None, ge=-9999, le=9999, description="exact year"),
            lambda year: Book.year == year,
        ),
        "q": Filter(
            str,
            Query(None, pattern=NO_NUL, description="substring of title or author, any case"),
            # autoescape: %, _ and the escape character itself match literally.
            lambda q: or_(
                Book.title.icontains(q, autoescape=True), Book.author.icontains(q, autoescape=True)
            ),
            blank_is_unset=True,
            search=True,
        ),
    },
    # Without filters, the count the triggers keep (see `BookCount`): no scan.
    maintained_count=lambda filters: (
        None if filters else select(func.coalesce(func.sum(BookCount.books), 0))
    ),
    first_cursor_filters=("author", "year", "q"),
)


def etag(book: Book) -> str:
    """A strong ETag: the version SQLAlchemy bumps on every UPDATE."""
    return f'"{book.id}-{book.version}"'


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
    for name, value in changes.items():
        setattr(book, name, value)
    if session.is_modified(book):
        book.updated_at = utc_now()


@router.get("/books", responses=problems(429))
@query_parameters(BOOKS.parameters())
async def list_books(
    req: Request,
    resp: Response,
    *,
    page: int = Query(1, ge=1, description="1-based page number"),
    size: int = Query(20, ge=1, le=100, description="items per page"),
    sort: str = Query(
        "id",
        pattern=BOOKS.sort_pattern,
        description=f"comma-separated, `-` for descending: {', '.join(BOOKS.sortable)}",
    ),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
    **filters: Any,
) -> BookPage:
    """List books a page at a time, by page number or by cursor."""
    query = BOOKS.query(sort, filters)
    after = None if cursor is None else query.after(cursor)  # a bad cursor is a 400 first
    number = page if cursor is None else None
    page_key, total_key = query.page_key(size, number, cursor), query.total_key()
    cache = shared_cache(req)
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
    query: ListingQuery,
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


@router.post(
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
    await shared_cache(req).invalidate()
    resp.headers["Location"] = f"/books/{created.id}"
    resp.headers["ETag"] = etag(created)
    return BookOut.model_validate(created)


@router.get("/books/{book_id:int}", responses={304: "Not Modified", **problems(429)})
async def get_book(req: Request, resp: Response, *, book_id: int) -> BookOut:
    """One book, with its ETag; `If-None-Match` with that ETag answers 304."""
    cache = shared_cache(req)
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


@router.put(
    "/books/{book_id:int}",
    before=[writers_only, json_body("application/json")],
    security=WRITERS_ONLY,
    responses=problems(409, 412, 415, 429, 507),
)
async def replace_book(req: Request, resp: Response, *, book_id: int, book: BookIn) -> BookOut:
    """Replace a book whole; a field left out (`isbn`) is cleared."""
    async with writing(req) as session:
        stored = await find_book(session, book_id, for_update=True)
        check_preconditions(req, etag(stored), "book")
        apply_changes(session, stored, book.model_dump())
    await shared_cache(req).invalidate(book_id)
    resp.headers["ETag"] = etag(stored)
    return BookOut.model_validate(stored)


@router.patch(
    "/books/{book_id:int}",
    before=[writers_only, json_body("application/json", "application/merge-patch+json")],
    security=WRITERS_ONLY,
    responses=problems(409, 412, 415, 429, 507),
)
async def update_book(req: Request, resp: Response, *, book_id: int, patch: BookPatch) -> BookOut:
    """Change some fields of a book; `"isbn": null` clears the ISBN."""
    async with writing(req) as session:
        stored = await find_book(session, book_id, for_update=True)
        check_preconditions(req, etag(stored), "book")
        apply_changes(session, stored, patch.model_dump(exclude_unset=True))
    await shared_cache(req).invalidate(book_id)
    resp.headers["ETag"] = etag(stored)
    return BookOut.model_validate(stored)


@router.delete(
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
        check_preconditions(req, etag(book), "book")
        await session.delete(book)
    await shared_cache(req).invalidate(book_id)
