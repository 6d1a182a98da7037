"""Growing the service: each fact is written once and derived everywhere else, so a field
or filter added in one place reaches the others, and a place that is not derived fails
here rather than silently."""

import base64
import dataclasses
import hashlib
import logging

import orjson
import pytest
import yaml
from responder import Problem
from responder.testing import AsyncTestClient
from sqlalchemy import text

import bulk
from app import api
from books import BOOKS
from listing import Filter
from models import Book
from schemas import BookIn, BookOut, BookPatch
from tests.conftest import BOOK
from tests.test_books import assert_problem

# A filter a user might add; the tests below must hold for it as for the first ones.
ISBN_FILTER = Filter(str, None, lambda isbn: Book.isbn == isbn)
GROWN = dataclasses.replace(BOOKS, filters={**BOOKS.filters, "isbn": ISBN_FILTER})


def test_every_book_field_is_a_column_and_in_patch_and_output():
    fields = set(BookIn.model_fields)
    assert set(BookPatch.model_fields) == fields
    assert fields <= set(BookOut.model_fields)
    assert fields <= set(Book.__table__.c.keys())
    assert all(hasattr(Book, name) for name in BookOut.model_fields)  # columns, or `rating`


def test_the_import_reads_and_stages_every_book_field():
    assert list(BookIn.model_fields) == bulk.FIELDS
    assert [column.name for column in bulk.INCOMING.columns] == ["line", *BookIn.model_fields]
    # A CSV's text becomes what JSON would carry, by the field's type.
    assert bulk.typed({"title": "T", "author": "A", "year": " 1999 ", "isbn": " "}) == {
        "title": "T",
        "author": "A",
        "year": 1999,
        "isbn": None,
    }


async def test_every_filter_is_a_documented_query_parameter(client: AsyncTestClient):
    document = yaml.safe_load((await client.get("/schema.yml")).text)
    parameters = {p["name"]: p for p in document["paths"]["/books"]["get"]["parameters"]}
    for name, declared in BOOKS.filters.items():
        assert name in parameters
        assert parameters[name]["in"] == "query"
        assert parameters[name].get("description") == declared.query.description


@pytest.mark.parametrize("name", sorted(GROWN.filters))
def test_each_filter_in_use_has_cache_keys_and_cursors_of_its_own(name: str):
    value = 1999 if name == "year" else "x"
    unfiltered, filtered = GROWN.query("id", {}), GROWN.query("id", {name: value})
    other = GROWN.query("id", {name: 2000 if name == "year" else "y"})
    keys = {query.page_key(20, 1, None) for query in (unfiltered, filtered, other)}
    totals = {query.total_key() for query in (unfiltered, filtered, other)}
    assert len(keys) == 3 and len(totals) == 3
    cursor = filtered.cursor_after(Book(id=5, year=1999))
    with pytest.raises(Problem):
        unfiltered.position(cursor)


def test_a_filter_added_later_keeps_the_cursors_that_do_not_use_it():
    made_before = BOOKS.query("-year", {"author": "Frank Herbert"})
    cursor = made_before.cursor_after(Book(id=3, year=1976))
    assert GROWN.query("-year", {"author": "Frank Herbert"})._decode(cursor) == [1976, 3]
    with pytest.raises(Problem):  # a listing that uses the new filter is another listing
        GROWN.query("-year", {"author": "Frank Herbert", "isbn": "x"})._decode(cursor)


def first_cursor(order: list, author, year, q, values: list) -> str:
    """A cursor as the service made them before cursors were versioned."""
    fingerprint = hashlib.sha256(orjson.dumps([order, author, year, q])).hexdigest()[:16]
    raw = orjson.dumps({"v": values, "q": fingerprint})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_cursors_made_before_versioning_still_work():
    cursor = first_cursor([["year", True], ["id", False]], "frank herbert", None, None, [1976, 3])
    assert BOOKS.query("-year", {"author": "frank herbert"})._decode(cursor) == [1976, 3]
    assert GROWN.query("-year", {"author": "frank herbert"})._decode(cursor) == [1976, 3]
    with pytest.raises(Problem):
        BOOKS.query("-year", {"author": "someone else"})._decode(cursor)


async def test_an_unmapped_constraint_is_a_409_with_a_generic_text_and_a_log_line(
    client: AsyncTestClient, caplog: pytest.LogCaptureFixture
):
    """A constraint added without a problem text of its own (here by hand): still a 409."""
    async with api.state.engine.begin() as connection:
        await connection.execute(text("CREATE UNIQUE INDEX ux_books_title ON books (title)"))
    try:
        assert (await client.post("/books", json=BOOK)).status_code == 201
        with caplog.at_level(logging.WARNING, logger="books"):
            response = await client.post("/books", json={**BOOK, "isbn": None})
        body = assert_problem(response, 409)
        assert body["detail"] == "The request conflicts with the stored data."
        assert any("unmapped constraint" in record.message for record in caplog.records)
        duplicate = await client.post("/books", json={**BOOK, "title": "Other"})
        assert assert_problem(duplicate, 409)["detail"] == "A book with this ISBN already exists."
    finally:
        async with api.state.engine.begin() as connection:
            await connection.execute(text("DROP INDEX ux_books_title"))
