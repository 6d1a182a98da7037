"""ETags, If-None-Match (304) and If-Match (412), and what concurrent writers see."""

import asyncio

import pytest
from responder.testing import AsyncTestClient

from tests.conftest import BOOK
from tests.test_books import assert_problem


async def test_if_none_match_gives_304_for_the_current_etag(client: AsyncTestClient, book):
    url = f"/books/{book['id']}"
    for header in (book["etag"], f'"x", {book["etag"]}', "W/" + book["etag"], "*"):
        response = await client.get(url, headers={"If-None-Match": header})
        assert response.status_code == 304, header
        assert response.content == b"" and response.headers["ETag"] == book["etag"]
    assert (await client.get(url, headers={"If-None-Match": '"stale"'})).status_code == 200


async def test_etag_changes_with_every_change(client: AsyncTestClient, book):
    url = f"/books/{book['id']}"
    changed = await client.patch(url, json={"year": 1970})
    assert changed.headers["ETag"] != book["etag"]
    assert (await client.get(url, headers={"If-None-Match": book["etag"]})).status_code == 200
    assert (await client.get(url)).headers["ETag"] == changed.headers["ETag"]


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_stale_if_match_is_412_and_changes_nothing(client: AsyncTestClient, book, method):
    url = f"/books/{book['id']}"
    await client.patch(url, json={"year": 1970})
    body = {**BOOK, "year": 1} if method != "DELETE" else None
    response = await client.request(method, url, headers={"If-Match": book["etag"]}, json=body)
    assert_problem(response, 412)
    assert (await client.get(url)).json()["year"] == 1970


@pytest.mark.parametrize("header", ["{etag}", '"other", {etag}', "*"])
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_matching_if_match_lets_the_write_through(
    client: AsyncTestClient, book, method, header
):
    body = {**BOOK, "year": 1} if method != "DELETE" else None
    headers = {"If-Match": header.format(etag=book["etag"])}
    response = await client.request(method, f"/books/{book['id']}", headers=headers, json=body)
    assert response.status_code == (204 if method == "DELETE" else 200)


async def test_weak_etag_never_satisfies_if_match(client: AsyncTestClient, book):
    response = await client.patch(
        f"/books/{book['id']}", json={"year": 1}, headers={"If-Match": "W/" + book["etag"]}
    )
    assert_problem(response, 412)


async def test_if_none_match_on_a_write_is_412_when_it_matches(client: AsyncTestClient, book):
    url = f"/books/{book['id']}"
    assert_problem(await client.patch(url, json={"year": 1}, headers={"If-None-Match": "*"}), 412)
    response = await client.patch(url, json={"year": 1}, headers={"If-None-Match": '"other"'})
    assert response.status_code == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_missing_book_is_404_whatever_the_preconditions(client: AsyncTestClient, method):
    body = BOOK if method in ("PUT", "PATCH") else None
    for headers in ({"If-Match": "*"}, {"If-None-Match": "*"}, {"If-Match": '"1-1"'}):
        response = await client.request(method, "/books/777777", headers=headers, json=body)
        assert_problem(response, 404)


async def test_concurrent_conflicting_patches_exactly_one_wins(client: AsyncTestClient, book):
    url = f"/books/{book['id']}"
    responses = await asyncio.gather(
        *(
            client.patch(url, json={"title": f"Edit {n}"}, headers={"If-Match": book["etag"]})
            for n in range(20)
        )
    )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [412] * 19
    winner = next(response for response in responses if response.status_code == 200)
    stored = await client.get(url)
    assert stored.json()["title"] == winner.json()["title"]
    assert stored.headers["ETag"] == winner.headers["ETag"]


async def test_concurrent_patches_without_if_match_all_apply(client: AsyncTestClient, book):
    url = f"/books/{book['id']}"
    responses = await asyncio.gather(*(client.patch(url, json={"year": n}) for n in range(1, 21)))
    assert {response.status_code for response in responses} == {200}
    etags = {response.headers["ETag"] for response in responses}
    assert len(etags) == 20  # every change was a version of its own: no lost update


async def test_concurrent_creates_with_one_isbn_exactly_one_201(client: AsyncTestClient):
    responses = await asyncio.gather(*(client.post("/books", json=BOOK) for _ in range(20)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] + [409] * 19
    assert (await client.get("/books")).json()["total"] == 1


async def test_hundreds_of_concurrent_creates_all_succeed(client: AsyncTestClient):
    count = 300
    responses = await asyncio.gather(
        *(
            client.post("/books", json={"title": f"Book {n}", "author": "Many", "year": 2000})
            for n in range(count)
        )
    )
    assert [response.status_code for response in responses] == [201] * count
    assert len({response.json()["id"] for response in responses}) == count
    assert (await client.get("/books")).json()["total"] == count
