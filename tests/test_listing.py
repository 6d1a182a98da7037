"""GET /books: pages, sorting, filters, headers, and walking by cursor."""

import asyncio
import random
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from responder.testing import AsyncTestClient
from sqlalchemy import text

from app import api
from books import BOOKS
from tests.test_books import assert_problem

SORTS = ["id", "-id", "title", "-title", "author,-year", "-year,title", "created_at", "-updated_at"]


async def create_books(client: AsyncTestClient, count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    books = []
    for index in range(count):
        body = {
            "title": rng.choice(["Alpha", "beta", "Gamma", "delta"]) + f" {rng.randint(0, 3)}",
            "author": rng.choice(["Ann", "ann", "Bob", "Zoë"]),
            "year": rng.choice([1990, 2000, 2010]),
        }
        response = await client.post("/books", json=body)
        assert response.status_code == 201, index
        books.append(response.json())
    return books


def links(response) -> dict[str, dict[str, list[str]]]:
    found = re.findall(r'<([^>]+)>; rel="(\w+)"', response.headers.get("Link", ""))
    return {rel: parse_qs(urlsplit(url).query) for url, rel in found}


async def expected_order(client: AsyncTestClient, books: list[dict], sort: str) -> list[int]:
    """Ids in `sort` order, ties by id ascending.

    Text order is the database's collation, so for title/author sorts the
    reference is one page holding everything, checked to be sorted on the
    fields Python can compare the same way.
    """
    ordered = sorted(books, key=lambda book: book["id"])
    for field in reversed(sort.split(",")):
        name = field.removeprefix("-")
        if name not in ("title", "author"):
            ordered.sort(key=lambda book: book[name], reverse=field.startswith("-"))
    if not any(name in sort for name in ("title", "author")):
        return [book["id"] for book in ordered]
    response = await client.get("/books", params={"sort": sort, "size": 100})
    everything = response.json()["items"]
    assert sorted(book["id"] for book in everything) == sorted(book["id"] for book in books)
    return [book["id"] for book in everything]


async def test_empty_listing(client: AsyncTestClient):
    response = await client.get("/books")
    assert response.json() == {
        "items": [], "total": 0, "page": 1, "size": 20, "pages": 0, "next_cursor": None
    }  # fmt: skip
    assert response.headers["X-Total-Count"] == "0"


async def test_pages_headers_and_links_keep_other_parameters(client: AsyncTestClient):
    books = await create_books(client, 7)
    response = await client.get("/books", params={"size": 3, "page": 2, "sort": "-id", "q": "a"})
    body = response.json()
    matching = [b for b in books if "a" in (b["title"] + b["author"]).lower()]
    assert body["total"] == len(matching) == int(response.headers["X-Total-Count"])
    assert body["pages"] == -(-len(matching) // 3)
    rels = links(response)
    assert set(rels) >= {"first", "prev", "last"}
    for query in rels.values():
        assert query["sort"] == ["-id"] and query["q"] == ["a"] and query["size"] == ["3"]
    assert rels["first"]["page"] == ["1"] and rels["prev"]["page"] == ["1"]


async def test_page_past_the_end_is_empty_200(client: AsyncTestClient):
    await create_books(client, 3)
    response = await client.get("/books", params={"page": 9})
    assert response.status_code == 200
    assert response.json()["items"] == [] and response.json()["total"] == 3


@pytest.mark.parametrize("sort", SORTS)
async def test_pages_follow_the_sort_without_overlap_or_gap(client: AsyncTestClient, sort):
    books = await create_books(client, 23)
    seen = []
    for page in range(1, 5):
        response = await client.get("/books", params={"sort": sort, "size": 7, "page": page})
        seen += [book["id"] for book in response.json()["items"]]
    assert seen == await expected_order(client, books, sort)


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"page": 0}, "page"),
        ({"page": "x"}, "page"),
        ({"size": 0}, "size"),
        ({"size": 101}, "size"),
        ({"sort": "price"}, "sort"),
        ({"sort": "title,"}, "sort"),
        ({"year": "abc"}, "year"),
        ({"year": 99999999999}, "year"),
    ],
)
async def test_bad_query_parameters_are_422(client: AsyncTestClient, params, loc):
    body = assert_problem(await client.get("/books", params=params), 422)
    assert [error["loc"] for error in body["errors"]] == [["query", loc]]


async def test_unknown_query_parameters_are_ignored(client: AsyncTestClient):
    assert (await client.get("/books", params={"colour": "red"})).status_code == 200


async def test_filters(client: AsyncTestClient):
    for title, author, year in [
        ("100% Pure", "Ann Lee", 1990),
        ("under_score", "ann lee", 2000),
        ("back\\slash", "Bob", 2000),
        ("Plain", "Bobby", 2010),
    ]:
        await client.post("/books", json={"title": title, "author": author, "year": year})

    async def titles(**params) -> list[str]:
        response = await client.get("/books", params=params)
        return sorted(book["title"] for book in response.json()["items"])

    assert await titles(author="ANN LEE") == ["100% Pure", "under_score"]
    assert await titles(author="Bob") == ["back\\slash"]
    assert await titles(year=2000) == ["back\\slash", "under_score"]
    assert await titles(q="%") == ["100% Pure"]
    assert await titles(q="_") == ["under_score"]
    assert await titles(q="\\") == ["back\\slash"]
    assert await titles(q="BOB") == ["Plain", "back\\slash"]
    assert len(await titles(q="")) == 4
    assert await titles(q="pure", year=2000) == []


async def test_cursor_walk_visits_every_book_once_in_order(client: AsyncTestClient):
    books = await create_books(client, 17)
    for sort in SORTS:
        response = await client.get("/books", params={"sort": sort, "size": 5})
        seen = [book["id"] for book in response.json()["items"]]
        assert links(response)["next"]["page"] == ["2"]  # numbered pages link by number
        while cursor := response.json()["next_cursor"]:
            response = await client.get(
                "/books", params={"sort": sort, "size": 5, "cursor": cursor}
            )
            body = response.json()
            assert body["page"] is None and body["total"] == 17 and body["pages"] == 4
            rels = links(response)
            assert rels["first"]["page"] == ["1"] and "cursor" not in rels["first"]
            if body["next_cursor"]:
                assert rels["next"]["cursor"] == [body["next_cursor"]]
            else:
                assert "next" not in rels
            seen += [book["id"] for book in body["items"]]
        assert seen == await expected_order(client, books, sort), sort


async def test_cursor_walk_survives_inserts_and_deletes(client: AsyncTestClient):
    books = await create_books(client, 12)
    kept = {book["id"] for book in books}
    sort = "-year,title"
    response = await client.get("/books", params={"sort": sort, "size": 4})
    seen = [book["id"] for book in response.json()["items"]]
    rng = random.Random(3)
    while cursor := response.json()["next_cursor"]:
        # delete the book the cursor was made from, and one not yet visited
        await client.delete(f"/books/{seen[-1]}")
        kept.discard(seen[-1])
        unvisited = sorted(kept - set(seen))
        if unvisited:
            victim = rng.choice(unvisited)
            await client.delete(f"/books/{victim}")
            kept.discard(victim)
        await create_books(client, 2, seed=len(seen))
        response = await client.get("/books", params={"sort": sort, "size": 4, "cursor": cursor})
        seen += [book["id"] for book in response.json()["items"]]
    assert len(seen) == len(set(seen))
    assert kept <= set(seen)


async def test_author_filter_folds_unicode_case_on_postgresql(
    client: AsyncTestClient, database_url
):
    await client.post("/books", json={"title": "Ægir", "author": "Zoë Ölund", "year": 2001})
    response = await client.get("/books", params={"author": "zOë Ölund"})
    assert response.json()["total"] == 1  # the stored case differs only in ASCII letters
    folded = await client.get("/books", params={"author": "ZOË ÖLUND"})
    if database_url.startswith("postgresql"):
        assert folded.json()["total"] == 1
    else:  # SQLite's lower() folds ASCII only: the contract's minimum
        assert folded.json()["total"] == 0


@pytest.mark.parametrize("cursor", ["garbage", "", "eyJ2IjpbXX0", "!!!!"])
async def test_undecodable_cursor_is_400(client: AsyncTestClient, cursor):
    await create_books(client, 3)
    assert_problem(await client.get("/books", params={"cursor": cursor}), 400)


async def test_cursor_with_another_sort_or_filter_is_400(client: AsyncTestClient):
    await create_books(client, 6)
    cursor = (await client.get("/books", params={"size": 2, "sort": "title"})).json()["next_cursor"]
    assert cursor
    assert (
        await client.get("/books", params={"size": 2, "sort": "title", "cursor": cursor})
    ).status_code == 200
    others: list[dict[str, str | int]] = [
        {"sort": "-title"},
        {"sort": "title", "year": 1990},
        {"sort": "title", "q": "a"},
    ]
    for other in others:
        assert_problem(await client.get("/books", params={**other, "cursor": cursor}), 400)


@pytest.mark.parametrize("sort", ["id", "-year,title"])
@pytest.mark.parametrize("by", ["year", "q"])
async def test_filtered_pages_count_every_match_even_past_the_end(
    client: AsyncTestClient, sort, by
):
    books = await create_books(client, 23)
    if by == "year":
        search: dict[str, int | str] = {"year": 1990}
        matching = [book["id"] for book in books if book["year"] == 1990]
    else:
        search = {"q": "LPH"}
        matching = [book["id"] for book in books if "lph" in book["title"].lower()]
    assert len(matching) > 3  # several pages of 3
    seen = []
    for page in range(1, 10):
        params = {**search, "size": 3, "page": page, "sort": sort}
        response = await client.get("/books", params=params)
        body = response.json()
        assert body["total"] == len(matching) == int(response.headers["X-Total-Count"])
        seen += [book["id"] for book in body["items"]]
    assert sorted(seen) == matching and len(seen) == len(set(seen))
    past = await client.get("/books", params={**search, "size": 3, "page": 40, "sort": sort})
    assert past.json()["items"] == [] and past.json()["total"] == len(matching)


async def test_the_total_stays_exact_under_concurrent_creates_and_deletes(
    client: AsyncTestClient,
):
    """The unfiltered total comes from a count the database's triggers keep, not COUNT(*)."""
    books = await create_books(client, 20)

    async def create(index: int) -> int:
        response = await client.post(
            "/books", json={"title": f"t{index}", "author": "a", "year": 1}
        )
        return response.status_code

    deletes = [client.delete(f"/books/{book['id']}") for book in books[:12]]
    deleted, created = await asyncio.gather(
        asyncio.gather(*deletes), asyncio.gather(*(create(index) for index in range(15)))
    )
    assert [response.status_code for response in deleted] == [204] * 12
    assert created == [201] * 15
    async with api.state.engine.connect() as connection:
        counted = await connection.scalar(text("SELECT count(*) FROM books"))
    assert counted == 20 - 12 + 15
    assert (await client.get("/books")).json()["total"] == counted


async def test_the_maintained_count_follows_bulk_changes(client: AsyncTestClient, database_url):
    """Rows added or removed in bulk (INSERT … SELECT, TRUNCATE) are counted too.

    (Checked in the database: changes made behind the API do not reach its cache.)
    """
    await create_books(client, 3)

    async def run(sql: str) -> int:
        async with api.state.engine.begin() as connection:
            await connection.execute(text(sql))
            return int(await connection.scalar(BOOKS.query("id", {}).count()) or 0)

    copied = await run(
        "INSERT INTO books (title, author, year, created_at, updated_at, version)"
        " SELECT title, author, year, created_at, updated_at, version FROM books"
    )
    assert copied == 6
    assert await run("DELETE FROM books WHERE id % 2 = 0") == 3
    if database_url.startswith("postgresql"):
        assert await run("TRUNCATE books CASCADE") == 0  # and the reviews that refer to them


async def test_an_absurdly_large_page_is_past_the_end_not_an_error(client: AsyncTestClient, book):
    queries: list[dict[str, str | int]] = [
        {"page": 10**30},
        {"page": 10**30, "q": "dune"},
        {"page": 2**62, "size": 100},
    ]
    for params in queries:
        response = await client.get("/books", params=params)
        assert response.status_code == 200, (params, response.text)
        assert response.json()["items"] == [] and response.json()["total"] == 1
