"""The review resource: a book's reviews, at `/books/{book_id}/reviews`.

Each review write also changes its book's figures (`review_count`, `rating_sum`)
in the same transaction, under the book's row lock: every writer of a book's
reviews takes that lock first, so the figures are exact under concurrent writes
and two writers never wait on each other in opposite orders.
"""

from datetime import datetime
from typing import Any

from responder import Problem, Request, Response, Router
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from books import find_book
from cache import Entry, book_generation, review_key
from listing import Filter, Listing
from models import Book, Review, utc_now
from schemas import ReviewIn, ReviewOut, ReviewPage, ReviewPatch
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

REVIEWS = Listing(
    name="reviews",
    model=Review,
    sortable=("id", "rating", "created_at"),
    # Set by the route, from the path: only this book's reviews.
    filters={"book_id": Filter(int, None, lambda book_id: Review.book_id == book_id)},
)


async def review_count(session: AsyncSession, book_id: int) -> int:
    """How many reviews the book has (kept on the book); a 404 if there is no such book."""
    count = await session.scalar(select(Book.review_count).where(Book.id == book_id))
    if count is None:
        raise Problem(404, f"There is no book {book_id}.")
    return count


async def find_review(session: AsyncSession, book_id: int, review_id: int) -> Review:
    """The book's review, or a 404 (also when the review belongs to another book)."""
    review = await session.scalar(
        select(Review).where(Review.id == review_id, Review.book_id == book_id)
    )
    if review is None:
        raise Problem(404, f"Book {book_id} has no review {review_id}.")
    return review


def recount(book: Book, now: datetime, *, reviews: int, ratings: int) -> None:
    """Change the book's figures; its representation changed, so do its `updated_at`
    and (through the version SQLAlchemy bumps) its ETag."""
    book.review_count += reviews
    book.rating_sum += ratings
    book.updated_at = now


@router.get("/books/{book_id:int}/reviews", responses=problems(429))
@query_parameters(REVIEWS.parameters())
async def list_reviews(
    req: Request, resp: Response, *, book_id: int, **parameters: Any
) -> ReviewPage:
    """A book's reviews, a page at a time, by page number or by cursor."""

    async def counted(session: AsyncSession) -> int:
        return await review_count(session, book_id)

    return await listing_page(
        req,
        resp,
        REVIEWS,
        ReviewPage,
        parameters,
        generation=book_generation(book_id),  # renewed by every write to the book or its reviews
        scope={"book_id": book_id},
        counted=counted,
    )


@router.post(
    "/books/{book_id:int}/reviews",
    status_code=201,
    before=[writers_only, json_body("application/json")],
    security=WRITERS_ONLY,
    responses=problems(415, 429, 507),
)
async def create_review(
    req: Request, resp: Response, *, book_id: int, review: ReviewIn
) -> ReviewOut:
    """Review a book."""
    now = utc_now()
    async with writing(req) as session:
        book = await find_book(session, book_id, for_update=True)
        created = Review(**review.model_dump(), book_id=book_id, created_at=now, updated_at=now)
        session.add(created)
        recount(book, now, reviews=1, ratings=review.rating)
    await invalidate(req, book_id)
    resp.headers["Location"] = f"/books/{book_id}/reviews/{created.id}"
    answer_write(resp, created)
    return ReviewOut.model_validate(created)


@router.get(
    "/books/{book_id:int}/reviews/{review_id:int}",
    responses={304: "Not Modified", **problems(412, 429)},
)
async def get_review(req: Request, resp: Response, *, book_id: int, review_id: int) -> ReviewOut:
    """One review, with its ETag and Last-Modified (conditional GETs as for books)."""
    cache = shared_cache(req)
    key = review_key(book_id, review_id)
    lookup = await cache.lookup(book_generation(book_id), key)
    if (cached := lookup.entries[0]) is not None and cached.etag is not None:
        found, current = ReviewOut.model_validate_json(cached.body), cached.etag
    else:
        review = await read(
            req, lambda session: find_review(session, book_id, review_id), lookup.position
        )
        found, current = ReviewOut.model_validate(review), etag(review)
        if lookup.storable:
            await cache.store(lookup, {key: Entry(found.model_dump_json(), current)})
    answer_read(req, resp, current, found.updated_at, "review")
    return found


@router.patch(
    "/books/{book_id:int}/reviews/{review_id:int}",
    before=[writers_only, json_body("application/json", "application/merge-patch+json")],
    security=WRITERS_ONLY,
    responses=problems(409, 412, 415, 429, 507),
)
async def update_review(
    req: Request, resp: Response, *, book_id: int, review_id: int, patch: ReviewPatch
) -> ReviewOut:
    """Change some fields of a review."""
    async with writing(req) as session:
        book = await find_book(session, book_id, for_update=True)
        stored = await find_review(session, book_id, review_id)
        check_preconditions(req, etag(stored), stored.updated_at, "review")
        rated = stored.rating
        apply_changes(session, stored, patch.model_dump(exclude_unset=True))
        if stored.rating != rated:
            recount(book, stored.updated_at, reviews=0, ratings=stored.rating - rated)
    await invalidate(req, book_id)
    answer_write(resp, stored)
    return ReviewOut.model_validate(stored)


@router.delete(
    "/books/{book_id:int}/reviews/{review_id:int}",
    status_code=204,
    before=[writers_only],
    security=WRITERS_ONLY,
    responses=problems(412, 429),
)
async def delete_review(req: Request, resp: Response, *, book_id: int, review_id: int) -> None:
    """Delete a review; its id is never used again."""
    async with writing(req) as session:
        book = await find_book(session, book_id, for_update=True)
        review = await find_review(session, book_id, review_id)
        check_preconditions(req, etag(review), review.updated_at, "review")
        await session.delete(review)
        recount(book, utc_now(), reviews=-1, ratings=-review.rating)
    await invalidate(req, book_id)
