"""The book resource: `/books` and `/books/{book_id}`."""

from typing import Any

from responder import Problem, Query, Request, Response, Router
from sqlalchemy import BigInteger, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from cache import BOOKS_GENERATION, Entry, book_generation, book_key
from listing import Filter, Listing
from models import BOOK_ORDERS, Book, BookCount, utc_now
from schemas import AUTHOR_LENGTH, NO_NUL, TITLE_LENGTH, BookIn, BookOut, BookPage, BookPatch
from web import (
    WRITERS_ONLY,
    answer_read,
    answer_write,
    apply_changes,
    check_preconditions,
    etag,
    invalidate,
    json_body,
    listing_page,
    problems,
    query_parameters,
    read,
    shared_cache,
    writers_only,
    writing,
)

router = Router()
# Cast: PostgreSQL sums bigints as a numeric, which asyncpg reads as a Decimal that
# prints as '1E+4' at 10,000 books (and the cache stores the total as text).
BOOK_COUNT = select(func.coalesce(func.sum(BookCount.books), 0).cast(BigInteger))

BOOKS = Listing(
    name="books",
    model=Book,
    sortable=("id", *BOOK_ORDERS),
    filters={
        "author": Filter(
            str,
            Query(
                None, pattern=NO_NUL, max_length=AUTHOR_LENGTH, description="exact author, any case"
            ),
            lambda author: func.lower(Book.author) == func.lower(author),
        ),
        "year": Filter(
            int,
            Query(None, ge=-9999, le=9999, description="exact year"),
            lambda year: Book.year == year,
        ),
        "q": Filter(
            str,
            # Longer than a title or an author, it can match nothing: a 422, not a search.
            Query(
                None,
                pattern=NO_NUL,
                max_length=max(TITLE_LENGTH, AUTHOR_LENGTH),
                description="substring of title or author, any case",
            ),
            # autoescape: %, _ and the escape character itself match literally.
            lambda q: or_(
                Book.title.icontains(q, autoescape=True), Book.author.icontains(q, autoescape=True)
            ),
            blank_is_unset=True,
        ),
    },
    # Without filters, the count the triggers keep (see `BookCount`): no scan.
    maintained_count=lambda filters: None if filters else BOOK_COUNT,
    population=lambda: BOOK_COUNT,
    first_cursor_filters=("author", "year", "q"),
)


async def find_book(session: AsyncSession, book_id: int, *, for_update: bool = False) -> Book:
    """The book, or a 404; `for_update` locks its row until the transaction ends."""
    book = await session.get(Book, book_id, with_for_update=for_update)
    if book is None:
        raise Problem(404, f"There is no book {book_id}.")
    return book


@router.get("/books", responses=problems(429))
@query_parameters(BOOKS.parameters())
async def list_books(req: Request, resp: Response, **parameters: Any) -> BookPage:
    """List books a page at a time, by page number or by cursor."""
    return await listing_page(req, resp, BOOKS, BookPage, parameters, generation=BOOKS_GENERATION)


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
    await invalidate(req)
    resp.headers["Location"] = f"/books/{created.id}"
    answer_write(resp, created)
    return BookOut.model_validate(created)


@router.get("/books/{book_id:int}", responses={304: "Not Modified", **problems(412, 429)})
async def get_book(req: Request, resp: Response, *, book_id: int) -> BookOut:
    """One book, with its ETag and Last-Modified (a matching `If-None-Match`, or an
    `If-Modified-Since` it is not newer than, answers 304)."""
    cache = shared_cache(req)
    lookup = await cache.lookup(book_generation(book_id), book_key(book_id))
    if (cached := lookup.entries[0]) is not None and cached.etag is not None:
        found, current = BookOut.model_validate_json(cached.body), cached.etag
    else:
        book = await read(req, lambda session: find_book(session, book_id), lookup.position)
        found, current = BookOut.model_validate(book), etag(book)
        if lookup.storable:
            entry = Entry(found.model_dump_json(), current)
            await cache.store(lookup, {book_key(book_id): entry})
    answer_read(req, resp, current, found.updated_at, "book")
    return found


@router.put(
    "/books/{book_id:int}",
    before=[writers_only, json_body("application/json")],
    security=WRITERS_ONLY,
    responses=problems(409, 412, 415, 429, 507),
)
async def replace_book(req: Request, resp: Response, *, book_id: int, book: BookIn) -> BookOut:
    """Replace a book whole; a field left out (`isbn`) is cleared."""
    return await change_book(req, resp, book_id, book.model_dump())


@router.patch(
    "/books/{book_id:int}",
    before=[writers_only, json_body("application/json", "application/merge-patch+json")],
    security=WRITERS_ONLY,
    responses=problems(409, 412, 415, 429, 507),
)
async def update_book(req: Request, resp: Response, *, book_id: int, patch: BookPatch) -> BookOut:
    """Change some fields of a book; `"isbn": null` clears the ISBN."""
    return await change_book(req, resp, book_id, patch.model_dump(exclude_unset=True))


async def change_book(
    req: Request, resp: Response, book_id: int, changes: dict[str, Any]
) -> BookOut:
    """PUT and PATCH alike: lock the book, check the request's preconditions against it,
    apply `changes`, and answer with the stored book once the change is committed."""
    async with writing(req) as session:
        stored = await find_book(session, book_id, for_update=True)
        check_preconditions(req, etag(stored), stored.updated_at, "book")
        apply_changes(session, stored, changes)
    await invalidate(req, book_id)
    answer_write(resp, stored)
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
        check_preconditions(req, etag(book), book.updated_at, "book")
        await session.delete(book)
    await invalidate(req, book_id)
