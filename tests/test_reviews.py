"""Reviews: the resource, its book's figures, and relationships without lazy loads or N+1."""

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from responder.testing import AsyncTestClient
from sqlalchemy import event, insert, select, text, update
from sqlalchemy.exc import InvalidRequestError

from app import api
from models import Book, Review, utc_now
from settings import Settings
from tests.conftest import BOOK, app_client
from tests.test_access import TOKEN, bearer
from tests.test_books import TIMESTAMP, assert_problem, error_locs
from tests.test_listing import links
from tests.test_rate_limit import assert_refused

REVIEW = {"reviewer": "Ann", "rating": 4, "text": "Sand, mostly."}


async def add_review(client: AsyncTestClient, book_id: int, **fields) -> dict:
    response = await client.post(f"/books/{book_id}/reviews", json={**REVIEW, **fields})
    assert response.status_code == 201, response.text
    return {**response.json(), "etag": response.headers["ETag"]}


@pytest.fixture
async def review(client: AsyncTestClient, book) -> dict:
    return await add_review(client, book["id"])


# --- Create -------------------------------------------------------------------------


async def test_create_returns_the_review_with_location_and_etag(client: AsyncTestClient, book):
    response = await client.post(
        f"/books/{book['id']}/reviews", json={"reviewer": "  Ann  ", "rating": 5}
    )
    assert response.status_code == 201
    created = response.json()
    assert created["reviewer"] == "Ann" and created["text"] == "" and created["rating"] == 5
    assert created["book_id"] == book["id"]
    assert response.headers["Location"] == f"/books/{book['id']}/reviews/{created['id']}"
    assert re.fullmatch(r'"[^"]+"', response.headers["ETag"])
    assert TIMESTAMP.match(created["created_at"]) and created["created_at"] == created["updated_at"]
    fetched = await client.get(response.headers["Location"])
    assert fetched.json() == created and fetched.headers["ETag"] == response.headers["ETag"]


async def test_reviewing_a_missing_book_is_404(client: AsyncTestClient):
    for book_id in (424242, 0, 2**40):
        assert_problem(await client.post(f"/books/{book_id}/reviews", json=REVIEW), 404)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reviewer", ""),
        ("reviewer", "   "),
        ("reviewer", "r" * 101),
        ("reviewer", "a\x00b"),
        ("rating", 0),
        ("rating", 6),
        ("rating", "4"),
        ("rating", 4.0),
        ("rating", 4.5),
        ("rating", True),
        ("rating", None),
        ("text", "t" * 5001),
        ("text", None),
        ("id", 1),
        ("book_id", 1),
        ("created_at", "2026-01-01T00:00:00Z"),
        ("stars", 5),
    ],
)
async def test_invalid_reviews_are_422_naming_the_field(
    client: AsyncTestClient, book, field, value
):
    response = await client.post(f"/books/{book['id']}/reviews", json={**REVIEW, field: value})
    assert error_locs(assert_problem(response, 422)) == {field}
    assert (await client.get(f"/books/{book['id']}/reviews")).json()["total"] == 0


async def test_length_limits_count_code_points_after_trimming(client: AsyncTestClient, book):
    body = {"reviewer": " " + "é" * 100 + " ", "rating": 1, "text": "ß" * 5000}
    response = await client.post(f"/books/{book['id']}/reviews", json=body)
    assert response.status_code == 201
    assert response.json()["reviewer"] == "é" * 100 and len(response.json()["text"]) == 5000


@pytest.mark.parametrize("field", ["reviewer", "rating"])
async def test_required_fields(client: AsyncTestClient, book, field):
    body = {key: value for key, value in REVIEW.items() if key != field}
    response = await client.post(f"/books/{book['id']}/reviews", json=body)
    assert error_locs(assert_problem(response, 422)) == {field}


async def test_a_body_that_is_not_json_is_415_and_too_large_is_413(client: AsyncTestClient, book):
    url = f"/books/{book['id']}/reviews"
    for content_type in (None, "text/plain", "application/merge-patch+json"):
        headers = {"Content-Type": content_type} if content_type else {}
        assert_problem(await client.post(url, content=b'{"rating": 1}', headers=headers), 415)
    big = {**REVIEW, "text": "x" * (1024 * 1024)}
    assert_problem(await client.post(url, json=big), 413)
    assert (await client.get(url)).json()["total"] == 0


# --- Read and list ---------------------------------------------------------------------


async def test_get_one_with_etag_and_304(client: AsyncTestClient, book, review):
    url = f"/books/{book['id']}/reviews/{review['id']}"
    response = await client.get(url)
    assert response.status_code == 200 and response.headers["ETag"] == review["etag"]
    not_modified = await client.get(url, headers={"If-None-Match": review["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""


async def test_a_review_is_404_under_another_book_or_none(client: AsyncTestClient, book, review):
    other = (await client.post("/books", json={**BOOK, "isbn": None})).json()
    for url in (
        f"/books/{other['id']}/reviews/{review['id']}",
        f"/books/{book['id']}/reviews/424242",
        f"/books/424242/reviews/{review['id']}",
        f"/books/{book['id']}/reviews/{2**40}",
    ):
        for method in ("GET", "PATCH", "DELETE"):
            body = {"rating": 1} if method == "PATCH" else None
            assert_problem(await client.request(method, url, json=body), 404)
    assert (await client.get(f"/books/{book['id']}/reviews/{review['id']}")).json()["rating"] == 4


async def test_listing_a_missing_books_reviews_is_404(client: AsyncTestClient):
    assert_problem(await client.get("/books/424242/reviews"), 404)


async def test_list_pages_sorts_and_cursors(client: AsyncTestClient, book):
    ratings = [3, 5, 1, 5, 2, 4, 3, 5]
    created = [await add_review(client, book["id"], rating=rating) for rating in ratings]
    other = (await client.post("/books", json={**BOOK, "isbn": None})).json()
    await add_review(client, other["id"], rating=1)  # another book's: never listed here
    url = f"/books/{book['id']}/reviews"

    page = await client.get(url, params={"size": 3, "page": 2})
    body = page.json()
    assert [item["id"] for item in body["items"]] == [r["id"] for r in created[3:6]]
    assert (body["total"], body["page"], body["size"], body["pages"]) == (8, 2, 3, 3)
    assert page.headers["X-Total-Count"] == "8"
    assert links(page)["next"]["page"] == ["3"] and links(page)["prev"]["page"] == ["1"]

    by_id = sorted(created, key=lambda r: r["id"])
    expectations = {
        "id": by_id,
        "-id": by_id[::-1],
        "rating": sorted(by_id, key=lambda r: r["rating"]),
        "-rating": sorted(by_id, key=lambda r: -r["rating"]),
        "created_at": sorted(by_id, key=lambda r: r["created_at"]),
        "-created_at,id": sorted(by_id, key=lambda r: r["created_at"], reverse=True),
        "-rating,-created_at": sorted(
            by_id, key=lambda r: (r["rating"], r["created_at"]), reverse=True
        ),
    }
    for sort, expected in expectations.items():
        walked, cursor = [], None
        while True:
            params: dict[str, str | int] = {"sort": sort, "size": 3}
            if cursor:
                params["cursor"] = cursor
            response = await client.get(url, params=params)
            assert response.status_code == 200, response.text
            walked += [item["id"] for item in response.json()["items"]]
            if (cursor := response.json()["next_cursor"]) is None:
                break
        assert walked == [r["id"] for r in expected], sort
    for bad in ({"sort": "title"}, {"sort": "-reviewer"}, {"size": 0}, {"size": 101}, {"page": 0}):
        assert_problem(await client.get(url, params=bad), 422)
    foreign = (await client.get(url, params={"size": 1})).json()["next_cursor"]
    assert_problem(
        await client.get(f"/books/{other['id']}/reviews", params={"cursor": foreign}), 400
    )


# --- Update and delete -----------------------------------------------------------------


async def test_patch_changes_only_the_given_fields(client: AsyncTestClient, book, review):
    url = f"/books/{book['id']}/reviews/{review['id']}"
    response = await client.patch(
        url, json={"text": "Better the second time."}, headers={"If-Match": review["etag"]}
    )
    assert response.status_code == 200
    changed = response.json()
    assert changed["text"] == "Better the second time." and changed["rating"] == review["rating"]
    assert changed["updated_at"] > review["updated_at"]
    assert response.headers["ETag"] != review["etag"]
    unchanged = await client.patch(url, json={"reviewer": " Ann "}, headers={"If-Match": "*"})
    assert unchanged.headers["ETag"] == response.headers["ETag"]
    assert unchanged.json()["updated_at"] == changed["updated_at"]


async def test_patch_refuses_null_stale_etags_and_non_json(client: AsyncTestClient, book, review):
    url = f"/books/{book['id']}/reviews/{review['id']}"
    for field in ("reviewer", "rating", "text"):
        assert error_locs(assert_problem(await client.patch(url, json={field: None}), 422)) == {
            field
        }
    assert_problem(await client.patch(url, json={"rating": 9}), 422)
    assert_problem(await client.patch(url, json={"book_id": 9}), 422)
    headers = {"Content-Type": "text/plain"}
    assert_problem(await client.patch(url, content=b'{"rating": 1}', headers=headers), 415)
    await client.patch(url, json={"rating": 2})
    stale = await client.patch(url, json={"rating": 3}, headers={"If-Match": review["etag"]})
    assert_problem(stale, 412)
    assert (await client.get(url)).json()["rating"] == 2


async def test_delete_then_404_stale_412_and_ids_never_reused(
    client: AsyncTestClient, book, review
):
    url = f"/books/{book['id']}/reviews/{review['id']}"
    await client.patch(url, json={"rating": 1})
    assert_problem(await client.delete(url, headers={"If-Match": review["etag"]}), 412)
    response = await client.delete(url)
    assert response.status_code == 204 and response.content == b""
    assert_problem(await client.get(url), 404)
    assert_problem(await client.delete(url), 404)
    assert (await add_review(client, book["id"]))["id"] > review["id"]


# --- The book's figures ------------------------------------------------------------------


async def book_figures(client: AsyncTestClient, book_id: int) -> tuple[int, float | None, str]:
    single = await client.get(f"/books/{book_id}")
    (listed,) = [b for b in (await client.get("/books")).json()["items"] if b["id"] == book_id]
    figures = (single.json()["review_count"], single.json()["rating"])
    assert (listed["review_count"], listed["rating"]) == figures
    return (*figures, single.headers["ETag"])


async def test_every_book_representation_carries_exact_figures(client: AsyncTestClient, book):
    assert (book["review_count"], book["rating"]) == (0, None)
    count, rating, etag = await book_figures(client, book["id"])
    assert (count, rating) == (0, None)
    steps = [(4, 4.0), (5, 4.5), (5, 4.67), (1, 3.75)]  # 14 / 3 = 4.666…, rounded half up
    for given, mean in steps:
        await add_review(client, book["id"], rating=given)
        count_now, rating_now, etag_now = await book_figures(client, book["id"])
        assert rating_now == mean and etag_now != etag
        count, etag = count_now, etag_now
    assert count == 4
    reviews = (await client.get(f"/books/{book['id']}/reviews")).json()["items"]
    rerated = await client.patch(
        f"/books/{book['id']}/reviews/{reviews[3]['id']}", json={"rating": 5}
    )
    assert rerated.status_code == 200
    assert (await book_figures(client, book["id"]))[:2] == (4, 4.75)
    text_only = await client.patch(
        f"/books/{book['id']}/reviews/{reviews[0]['id']}", json={"text": "x"}
    )
    assert text_only.status_code == 200
    assert (await book_figures(client, book["id"]))[2] == (await book_figures(client, book["id"]))[
        2
    ]
    assert (
        await client.delete(f"/books/{book['id']}/reviews/{reviews[0]['id']}")
    ).status_code == 204
    assert (await book_figures(client, book["id"]))[:2] == (3, 5.0)


async def test_a_rating_change_changes_the_books_etag_and_updated_at(
    client: AsyncTestClient, book, review
):
    before = await client.get(f"/books/{book['id']}")
    url = f"/books/{book['id']}/reviews/{review['id']}"
    assert (await client.patch(url, json={"text": "only words"})).status_code == 200
    same = await client.get(f"/books/{book['id']}")
    assert same.headers["ETag"] == before.headers["ETag"]  # the book's representation is unchanged
    assert (await client.patch(url, json={"rating": 1})).status_code == 200
    after = await client.get(f"/books/{book['id']}")
    assert after.headers["ETag"] != before.headers["ETag"]
    assert datetime.fromisoformat(after.json()["updated_at"]) > datetime.fromisoformat(
        before.json()["updated_at"]
    )
    stale = await client.patch(
        f"/books/{book['id']}", json={"year": 1}, headers={"If-Match": before.headers["ETag"]}
    )
    assert_problem(stale, 412)


async def test_concurrent_reviews_leave_the_figures_exact(client: AsyncTestClient, book):
    ratings = [1 + n % 5 for n in range(20)]
    responses = await asyncio.gather(
        *(
            client.post(f"/books/{book['id']}/reviews", json={**REVIEW, "rating": rating})
            for rating in ratings
        )
    )
    assert [response.status_code for response in responses] == [201] * 20
    count, rating, etag = await book_figures(client, book["id"])
    assert count == 20 and rating == round(sum(ratings) / 20, 2)
    assert etag != book["etag"]
    assert (await client.get(f"/books/{book['id']}/reviews")).json()["total"] == 20


async def test_deleting_a_book_deletes_its_reviews(client: AsyncTestClient, book, review):
    other = (await client.post("/books", json={**BOOK, "isbn": None})).json()
    kept = await add_review(client, other["id"])
    assert (await client.delete(f"/books/{book['id']}")).status_code == 204
    assert_problem(await client.get(f"/books/{book['id']}/reviews/{review['id']}"), 404)
    assert_problem(await client.get(f"/books/{book['id']}/reviews"), 404)
    async with api.state.async_session() as session:
        left = await session.scalars(select(Review.id))
        assert list(left) == [kept["id"]]


# --- The whole contract applies ------------------------------------------------------------


async def test_writes_need_a_token_when_tokens_are_set(settings: Settings):
    async with app_client(settings, api_tokens=TOKEN) as client:
        book = await client.post("/books", json=BOOK, headers=bearer(TOKEN))
        url = f"/books/{book.json()['id']}/reviews"
        assert (await client.post(url, json=REVIEW)).status_code == 401
        created = await client.post(url, json=REVIEW, headers=bearer(TOKEN))
        assert created.status_code == 201
        one = created.headers["Location"]
        assert (await client.patch(one, json={"rating": 1})).status_code == 401
        assert (await client.delete(one)).status_code == 401
        assert (await client.get(one)).status_code == 200 and (
            await client.get(url)
        ).status_code == 200
        assert (await client.get(one)).json()["rating"] == REVIEW["rating"]


async def test_rate_limits_count_review_routes(settings: Settings):
    async with app_client(settings, rate_limit="2/minute") as client:
        assert (await client.get("/books/1/reviews")).status_code == 404
        assert (await client.get("/books/1/reviews/1")).status_code == 404
        assert_refused(await client.get("/books/1/reviews"))
        assert_refused(await client.post("/books/1/reviews", json=REVIEW))


# --- Relationships under asyncio: no lazy loads, no N+1 -------------------------------------


async def test_an_accidental_lazy_load_fails_loudly(client: AsyncTestClient, book, review):
    async with api.state.async_session() as session:
        stored = await session.get(Book, book["id"])
        assert stored is not None
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            _ = stored.reviews
        found = await session.get(Review, review["id"])
        assert found is not None
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            _ = found.book


@contextmanager
def statements() -> Iterator[list[str]]:
    """The SQL statements the app sends while the block runs."""
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append(statement)

    engine = api.state.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def many_reviews(book_id: int, count: int) -> None:
    """`count` reviews of one book, written straight to the database (with its figures)."""
    now = utc_now()
    rows = [
        {"book_id": book_id, "reviewer": f"r{n}", "rating": 1 + n % 5, "text": "",
         "created_at": now, "updated_at": now, "version": 1}
        for n in range(count)
    ]  # fmt: skip
    async with api.state.engine.begin() as connection:
        await connection.execute(insert(Review), rows)
        await connection.execute(
            update(Book)
            .where(Book.id == book_id)
            .values(review_count=count, rating_sum=sum(row["rating"] for row in rows))
        )


# Statements per request (SQLite's writes add the BEGIN IMMEDIATE that takes its lock).
# The README's section on relationships shows these same numbers.
STATEMENTS = {
    "sqlite": {"list books": 2, "list reviews": 2, "delete book": 3, "create review": 4},
    "postgresql": {"list books": 2, "list reviews": 2, "delete book": 2, "create review": 3},
}


@pytest.fixture
async def uncached(client: AsyncTestClient, settings: Settings) -> AsyncIterator[AsyncTestClient]:
    if settings.redis_url is not None:
        pytest.skip("statements are counted on the database's path, without the cache")
    yield client


async def test_statements_per_request_do_not_grow_with_reviews(uncached: AsyncTestClient):
    client = uncached
    expected = STATEMENTS[api.state.engine.dialect.name]
    async with api.state.engine.begin() as connection:
        now = utc_now()
        await connection.execute(
            insert(Book),
            [{"title": f"t{n}", "author": "a", "year": 1, "created_at": now, "updated_at": now,
              "version": 1} for n in range(100)],
        )  # fmt: skip
    ids = [
        book["id"] for book in (await client.get("/books", params={"size": 100})).json()["items"]
    ]

    async def count(method: str, url: str, **options) -> int:
        with statements() as sent:
            response = await client.request(method, url, **options)
        assert response.status_code < 300, response.text
        return len(sent)

    without_reviews = await count("GET", "/books", params={"size": 100})
    for book_id in ids[:3]:
        await many_reviews(book_id, 1000)
    with_reviews = await count("GET", "/books", params={"size": 100})
    assert without_reviews == with_reviews == expected["list books"]
    assert (
        await count("GET", f"/books/{ids[0]}/reviews", params={"size": 100})
        == expected["list reviews"]
    )
    assert await count("POST", f"/books/{ids[1]}/reviews", json=REVIEW) == expected["create review"]
    assert await count("DELETE", f"/books/{ids[0]}") == expected["delete book"]
    async with api.state.engine.connect() as connection:
        left = await connection.scalar(
            text("SELECT count(*) FROM reviews WHERE book_id = :id"), {"id": ids[0]}
        )
    assert left == 0


def test_the_readme_shows_the_counts_the_suite_checks():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for request in STATEMENTS["sqlite"]:
        row = re.search(rf"^\| {request} \| (\d+) \| (\d+) \|$", readme, re.M)
        assert row is not None, request
        shown = {"sqlite": int(row[1]), "postgresql": int(row[2])}
        assert shown == {database: counts[request] for database, counts in STATEMENTS.items()}
