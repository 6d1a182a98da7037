"""The book resource: create, read, replace, update, delete, and every way to get it wrong."""

import re
from datetime import datetime

import pytest
from responder.testing import AsyncTestClient

from tests.conftest import BOOK

PROBLEM = "application/problem+json"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    for member in ("type", "title", "detail"):
        assert member in body
    for leak in ("Traceback", "sqlalchemy", "SELECT", "INSERT", "postgresql://", "sqlite"):
        assert leak not in response.text
    return body


def error_locs(body: dict) -> set[str]:
    assert all("loc" in error and "msg" in error for error in body["errors"])
    return {".".join(error["loc"]) for error in body["errors"]}


async def test_create_returns_the_book_with_location_and_etag(client: AsyncTestClient):
    response = await client.post(
        "/books", json={**BOOK, "title": "  Dune  ", "isbn": "0-441-17271-7"}
    )
    assert response.status_code == 201
    book = response.json()
    assert book["title"] == "Dune"
    assert book["isbn"] == "9780441172719"
    assert response.headers["Location"] == f"/books/{book['id']}"
    assert re.fullmatch(r'"[^"]+"', response.headers["ETag"])
    assert TIMESTAMP.match(book["created_at"]) and book["created_at"] == book["updated_at"]
    fetched = await client.get(response.headers["Location"])
    assert fetched.json() == book
    assert fetched.headers["ETag"] == response.headers["ETag"]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("0-306-40615-2", "9780306406157"),
        ("0 8044 2957 x", "9780804429573"),
        ("080442957X", "9780804429573"),
        ("978-0-306-40615-7", "9780306406157"),
        (None, None),
    ],
)
async def test_isbn_is_normalised_to_13_digits(client: AsyncTestClient, given, stored):
    response = await client.post("/books", json={**BOOK, "isbn": given})
    assert response.status_code == 201
    assert response.json()["isbn"] == stored


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("title", ""),
        ("title", "   "),
        ("title", "x" * 301),
        ("title", 5),
        ("author", ""),
        ("author", "y" * 201),
        ("year", 10000),
        ("year", -10000),
        ("year", "1965"),
        ("year", 1965.0),
        ("year", 1965.5),
        ("year", True),
        ("year", 10**30),
        ("isbn", ""),
        ("isbn", "0-306-40615-3"),
        ("isbn", "9790306406157"),
        ("isbn", "abc"),
        ("isbn", 9780441172719),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(client: AsyncTestClient, field, value):
    response = await client.post("/books", json={**BOOK, field: value})
    body = assert_problem(response, 422)
    assert error_locs(body) == {field}
    assert (await client.get("/books")).json()["total"] == 0


async def test_length_limits_count_code_points_after_trimming(client: AsyncTestClient):
    title = " " + "é" * 300 + " "
    response = await client.post("/books", json={**BOOK, "title": title, "author": "ß" * 200})
    assert response.status_code == 201
    assert response.json()["title"] == "é" * 300


@pytest.mark.parametrize("field", ["title", "author", "year"])
async def test_required_fields(client: AsyncTestClient, field):
    body = {key: value for key, value in BOOK.items() if key != field}
    assert error_locs(assert_problem(await client.post("/books", json=body), 422)) == {field}


@pytest.mark.parametrize(
    "extra", ["id", "created_at", "updated_at", "review_count", "rating", "version", "titel"]
)
async def test_unknown_and_server_managed_fields_are_422(client: AsyncTestClient, extra):
    response = await client.post("/books", json={**BOOK, extra: 1})
    assert error_locs(assert_problem(response, 422)) == {extra}


async def test_validation_errors_do_not_echo_the_input(client: AsyncTestClient):
    secret = "do-not-echo-" + "z" * 400
    response = await client.post("/books", json={**BOOK, "title": secret})
    assert_problem(response, 422)
    assert secret not in response.text


async def test_duplicate_isbn_is_409_also_across_isbn_10_and_13(client: AsyncTestClient, book):
    response = await client.post("/books", json={**BOOK, "isbn": "0-441-17271-7"})
    assert_problem(response, 409)
    other = await client.post("/books", json={**BOOK, "isbn": None})
    assert other.status_code == 201
    assert_problem(
        await client.patch(f"/books/{other.json()['id']}", json={"isbn": "0441172717"}), 409
    )


async def test_malformed_json_is_400(client: AsyncTestClient):
    for body in (b"{bad", b"", b'{"title": "x",}'):
        response = await client.post(
            "/books", content=body, headers={"Content-Type": "application/json"}
        )
        assert_problem(response, 400)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"a string"', b"42", b"null"])
async def test_json_that_is_not_an_object_is_422(client: AsyncTestClient, body):
    response = await client.post(
        "/books", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 422)


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/merge-patch+json"],
)
async def test_a_body_that_is_not_json_is_415(client: AsyncTestClient, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post("/books", content=b'{"title": "x"}', headers=headers)
    assert_problem(response, 415)
    assert (await client.get("/books")).json()["total"] == 0


async def test_json_with_a_charset_is_accepted(client: AsyncTestClient):
    import json

    response = await client.post(
        "/books",
        content=json.dumps(BOOK).encode(),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert response.status_code == 201


async def test_body_size_limit_is_1_mib(client: AsyncTestClient):
    limit = 1024 * 1024
    padding = " " * (limit - len(b'{"title": "Dune", "author": "A", "year": 1}'))
    exact = ('{"title": "Dune", "author": "A", "year": 1}' + padding).encode()
    assert len(exact) == limit
    headers = {"Content-Type": "application/json"}
    assert (await client.post("/books", content=exact, headers=headers)).status_code == 201
    assert_problem(await client.post("/books", content=exact + b" ", headers=headers), 413)

    async def chunks():
        for _ in range(2):
            yield exact[: limit // 2 + 1]

    assert_problem(await client.post("/books", content=chunks(), headers=headers), 413)


async def test_get_missing_and_bad_ids(client: AsyncTestClient):
    assert_problem(await client.get("/books/12345"), 404)
    assert_problem(await client.get("/books/99999999999999999999999"), 404)
    assert_problem(await client.get("/books/0"), 404)
    assert (await client.get("/books/abc")).status_code == 404
    assert (await client.get("/books/-1")).status_code == 404


async def test_put_replaces_and_clears_a_missing_isbn(client: AsyncTestClient, book):
    replacement = {"title": "Dune Messiah", "author": "Frank Herbert", "year": 1969}
    response = await client.put(f"/books/{book['id']}", json=replacement)
    assert response.status_code == 200
    updated = response.json()
    assert updated["isbn"] is None and updated["title"] == "Dune Messiah"
    assert updated["created_at"] == book["created_at"]
    assert datetime.fromisoformat(updated["updated_at"]) > datetime.fromisoformat(
        book["updated_at"]
    )
    assert response.headers["ETag"] != book["etag"]
    assert (await client.get(f"/books/{book['id']}")).json() == updated


async def test_put_validates_like_post(client: AsyncTestClient, book):
    response = await client.put(f"/books/{book['id']}", json={"title": "x", "author": "y"})
    assert error_locs(assert_problem(response, 422)) == {"year"}
    assert_problem(await client.put(f"/books/{book['id']}", json={**BOOK, "id": 3}), 422)
    assert_problem(await client.put("/books/999999", json=BOOK), 404)


async def test_patch_changes_only_the_given_fields(client: AsyncTestClient, book):
    response = await client.patch(f"/books/{book['id']}", json={"year": 1966})
    assert response.status_code == 200
    stored = {key: value for key, value in book.items() if key != "etag"}
    assert response.json() == {**stored, "year": 1966, "updated_at": response.json()["updated_at"]}
    assert response.json()["updated_at"] > book["updated_at"]
    assert response.headers["ETag"] != book["etag"]
    cleared = await client.patch(
        f"/books/{book['id']}",
        json={"isbn": None},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert cleared.status_code == 200 and cleared.json()["isbn"] is None


@pytest.mark.parametrize("field", ["title", "author", "year"])
async def test_patch_null_for_a_required_field_is_422(client: AsyncTestClient, book, field):
    response = await client.patch(f"/books/{book['id']}", json={field: None})
    assert error_locs(assert_problem(response, 422)) == {field}
    assert (await client.get(f"/books/{book['id']}")).json()[field] == book[field]


async def test_patch_rejects_unknown_fields_and_bad_values(client: AsyncTestClient, book):
    assert_problem(await client.patch(f"/books/{book['id']}", json={"titel": "x"}), 422)
    assert_problem(await client.patch(f"/books/{book['id']}", json={"year": "1966"}), 422)
    assert_problem(await client.patch("/books/424242", json={"year": 1}), 404)


async def test_a_change_that_changes_nothing_keeps_updated_at_and_etag(
    client: AsyncTestClient, book
):
    same = {key: book[key] for key in ("title", "author", "year", "isbn")}
    for response in (
        await client.put(f"/books/{book['id']}", json=same),
        await client.patch(f"/books/{book['id']}", json={"title": " Dune "}),
        await client.patch(f"/books/{book['id']}", json={}),
    ):
        assert response.status_code == 200
        assert response.headers["ETag"] == book["etag"]
        assert response.json()["updated_at"] == book["updated_at"]


async def test_delete_then_404_and_ids_are_never_reused(client: AsyncTestClient, book):
    response = await client.delete(f"/books/{book['id']}")
    assert response.status_code == 204 and response.content == b""
    assert_problem(await client.get(f"/books/{book['id']}"), 404)
    assert_problem(await client.delete(f"/books/{book['id']}"), 404)
    again = await client.post("/books", json=BOOK)
    assert again.json()["id"] > book["id"]


async def test_unknown_route_and_method_are_problems(client: AsyncTestClient):
    assert_problem(await client.get("/nothing-here"), 404)
    assert (await client.request("TRACE", "/books")).status_code == 405


async def test_a_nul_character_is_a_422_not_a_database_error(client: AsyncTestClient, book):
    """PostgreSQL cannot store U+0000 in text (found by schemathesis: it was a 500)."""
    for field in ("title", "author"):
        response = await client.post("/books", json={**BOOK, "isbn": None, field: "Du\x00ne"})
        assert error_locs(assert_problem(response, 422)) == {field}
        patched = await client.patch(f"/books/{book['id']}", json={field: "\x00"})
        assert_problem(patched, 422)
    for parameter in ("q", "author"):
        assert_problem(await client.get("/books", params={parameter: "a\x00b"}), 422)


SPELLINGS = {
    "leading zero": lambda n: f"0{n}",
    "Arabic-Indic digits": lambda n: str(n).translate({48 + d: 0x0660 + d for d in range(10)}),
    "fullwidth digits": lambda n: str(n).translate({48 + d: 0xFF10 + d for d in range(10)}),
    "plus sign": lambda n: f"+{n}",
    "decimal point": lambda n: f"{n}.0",
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_only_the_canonical_spelling_of_an_id_addresses_a_book(
    client: AsyncTestClient, book, spelling, method
):
    """`/books/01`, Arabic-Indic and fullwidth digits are not other names of book 1."""
    other = SPELLINGS[spelling](book["id"])
    body = BOOK if method in ("PUT", "PATCH") else None
    response = await client.request(method, f"/books/{other}", json=body)
    assert response.status_code == 404, (other, response.text)
    for path in (f"/books/{other}/reviews", f"/books/{book['id']}/reviews/{other}"):
        assert (await client.get(path)).status_code == 404
    assert (await client.get(f"/books/{book['id']}")).json()["title"] == BOOK["title"]


async def test_ids_past_the_tables_range_are_404_everywhere(client: AsyncTestClient, book):
    """Found by schemathesis: a 64-bit book id under /reviews reached the database (a 500)."""
    for huge in ("2147483648", "10489767245", "29813913816435298304"):
        for path in (f"/books/{huge}", f"/books/{huge}/reviews", f"/books/{huge}/reviews/1",
                     f"/books/1/reviews/{huge}"):  # fmt: skip
            assert_problem(await client.get(path), 404)
            if not path.endswith("/reviews"):  # a list takes no DELETE (405)
                assert_problem(await client.delete(path), 404)
