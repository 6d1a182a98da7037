"""Listings stay fast at a million books: what the database is asked, and how it plans it,
checked on a small table (the million-row figures are `python -m bench scale`'s)."""

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from responder.testing import AsyncTestClient
from sqlalchemy import text

import listing
from app import api
from books import BOOKS
from tests.test_listing import create_books
from tests.test_reviews import statements

ORDERS = [f"{direction}{name}" for name in BOOKS.sortable for direction in ("", "-")]
FILTERS: list[dict[str, str | int]] = [{"author": "ann"}, {"year": 2000}, {"q": "ELT"}]


def compiled(statement) -> str:
    dialect = api.state.engine.dialect
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


async def plan(sql: str) -> str:
    """The database's plan for `sql`, as text; on PostgreSQL with sorting made as
    expensive as it gets, so that a Sort in the plan means no index has the order."""
    async with api.state.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            rows = await connection.execute(text(f"EXPLAIN QUERY PLAN {sql}"))
            return "\n".join(str(row[-1]) for row in rows)
        await connection.execute(text("SET LOCAL enable_sort = off"))
        await connection.execute(text("SET LOCAL enable_seqscan = off"))
        rows = await connection.execute(text(f"EXPLAIN {sql}"))
        return "\n".join(row[0] for row in rows)


@pytest.mark.parametrize("sort", ORDERS)
async def test_every_sort_order_is_read_in_index_order(client: AsyncTestClient, sort):
    """A first page and a page after a cursor, in each order and direction, come from an
    index in that order: no sort of the whole table (at a million books, 100-180 ms)."""
    await create_books(client, 6)
    query = BOOKS.query(sort, {})
    first = (await client.get("/books", params={"sort": sort, "size": 2})).json()
    after = query.position(first["next_cursor"])
    for statement in (query.rows(limit=3), query.rows(after=after, limit=3)):
        shown = await plan(compiled(statement))
        assert "TEMP B-TREE FOR ORDER BY" not in shown, shown  # SQLite sorting
        assert "Sort" not in shown, shown  # PostgreSQL sorting


async def test_a_filter_that_matches_nothing_asks_for_no_page(client: AsyncTestClient, settings):
    """The LIMIT trap: asked for an author with no books sorted by year, the planner walked
    the whole year index hoping to meet one (1.5 s at a million books). The statement that
    counts the matches finds none, and that is the answer."""
    if settings.redis_url is not None:
        pytest.skip("statements are counted on the database's path, without the cache")
    await create_books(client, 6)
    for filters in ({"author": "nobody"}, {"year": 1234}, {"q": "zzzz"}):
        with statements() as sent:
            response = await client.get("/books", params={**filters, "sort": "-year"})
        assert response.json()["total"] == 0
        assert len(sent) == 1, sent


async def test_a_filter_that_keeps_few_books_reads_its_matches_once(
    client: AsyncTestClient, settings
):
    """A rare `?q=` term costs two trigram-index scans if the count and the page each make
    one (32-44 ms at a million books, against 18-22 ms before the count came first): one
    statement answers both, for a page, a page past the end and a page after a cursor.
    A term most books hold is counted first, then its page walks the sort index."""
    if settings.redis_url is not None:
        pytest.skip("statements are counted on the database's path, without the cache")
    await create_books(client, 45)
    for title in ("Zebra one", "Zebra two"):  # 2 of 47: at most 1 in SELECTIVE
        assert (
            await client.post("/books", json={"title": title, "author": "X", "year": 1})
        ).is_success
    rare: dict[str, str | int] = {"q": "zebra", "sort": "-title", "size": 1}
    first = (await client.get("/books", params=rare)).json()
    pages: list[tuple[dict[str, str | int], list[str]]] = [
        ({}, ["Zebra two"]),
        ({"page": 9}, []),
        ({"cursor": first["next_cursor"]}, ["Zebra one"]),
    ]
    for params, titles in pages:
        with statements() as sent:
            body = (await client.get("/books", params={**rare, **params})).json()
        assert (body["total"], [book["title"] for book in body["items"]]) == (2, titles)
        assert len(sent) == 1, sent
    with statements() as sent:
        body = (await client.get("/books", params={"q": "a", "size": 1})).json()
    assert body["total"] == 47
    assert len(sent) == 3, sent  # capped at 1 in SELECTIVE, counted, walked


@contextmanager
def found_among_matches(always: bool) -> Iterator[None]:
    """Every filtered page found among the matches first (always), or never."""
    original = listing.SELECTIVE
    listing.SELECTIVE = 1 if always else 10**9
    try:
        yield
    finally:
        listing.SELECTIVE = original


@pytest.mark.parametrize("among_matches", [True, False])
@pytest.mark.parametrize("filters", FILTERS)
async def test_filtered_pages_are_the_same_however_they_are_found(
    client: AsyncTestClient, filters, among_matches
):
    """A filtered listing is read among its matches when they are few, by walking a sort
    index when they are many: the pages, numbered or by cursor, are the same."""
    books = await create_books(client, 40, seed=3)
    rng = random.Random(5)
    with found_among_matches(among_matches):
        for sort in rng.sample(ORDERS, 5):
            everything = await client.get("/books", params={"sort": sort, "size": 100})
            expected = [
                book["id"]
                for book in everything.json()["items"]
                if all(matches(book, name, value) for name, value in filters.items())
            ]
            assert expected, (filters, books)
            numbered = []
            for page in range(1, len(expected) // 3 + 2):
                response = await client.get(
                    "/books", params={**filters, "sort": sort, "size": 3, "page": page}
                )
                assert response.json()["total"] == len(expected)
                numbered += [book["id"] for book in response.json()["items"]]
            assert numbered == expected, sort
            walked: list[int] = []
            params: dict[str, str | int] = {**filters, "sort": sort, "size": 4}
            while True:
                body = (await client.get("/books", params=params)).json()
                walked += [book["id"] for book in body["items"]]
                if not body["next_cursor"]:
                    break
                params["cursor"] = body["next_cursor"]
            assert walked == expected, sort


def matches(book: dict, name: str, value: str | int) -> bool:
    if name == "author":
        return book["author"].lower() == str(value).lower()
    if name == "year":
        return book["year"] == value
    return str(value).lower() in (book["title"] + book["author"]).lower()
