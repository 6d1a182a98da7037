"""HTTP as clients and intermediaries read it: bounded parameters, conditional requests,
one representation per resource, caching headers, and what happens below the routes."""

import socket
import sqlite3
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime

import pytest
from responder.testing import AsyncTestClient
from sqlalchemy.exc import OperationalError

from protocol import MAX_TARGET_BYTES
from tests.conftest import BOOK
from tests.servers import serving
from tests.test_books import assert_problem
from web import database_problem

LONG_AGO = "Mon, 01 Jan 2001 00:00:00 GMT"


# --- Bounded parameters, and no client error as a 503 ----------------------------------


async def test_over_long_free_text_is_a_4xx_never_a_503(client: AsyncTestClient, book):
    """On SQLite, 25,000 `_` in `q` were a 503 "The database is unavailable" (SQLite caps
    LIKE patterns at 50,000 bytes) while /health said 200."""
    assert_problem(await client.get("/books", params={"q": "x" * 301}), 422)
    assert_problem(await client.get("/books", params={"author": "x" * 201}), 422)
    assert (await client.get("/books", params={"q": "u" * 300})).json()["total"] == 0
    assert_problem(await client.get("/books", params={"q": "_" * 25_000}), 414)
    assert (await client.get("/health")).status_code == 200


def test_a_database_error_caused_by_a_request_is_never_a_503():
    """Only the database being away is a 503: SQLite's SQLITE_ERROR (a pattern too
    complex, say) is a bug of ours, a 500 with a log line, not "try again"."""
    with pytest.raises(sqlite3.OperationalError) as raised:
        sqlite3.connect(":memory:").execute("SELECT 'a' LIKE ?", ("_" * 60_000,))
    assert raised.value.sqlite_errorname == "SQLITE_ERROR"
    assert database_problem(OperationalError("SELECT", {}, raised.value)).status_code == 500
    with pytest.raises(sqlite3.OperationalError) as away:
        sqlite3.connect("/nonexistent/directory/books.db")
    assert away.value.sqlite_errorname == "SQLITE_CANTOPEN"
    problem = database_problem(OperationalError("SELECT", {}, away.value))
    assert problem.status_code == 503 and dict(problem.headers or {})["Retry-After"] == "5"


# --- Conditional requests -----------------------------------------------------------------


def http_date(moment: str) -> datetime:
    return parsedate_to_datetime(moment)


async def test_a_read_honours_if_match_and_if_unmodified_since(client: AsyncTestClient, book):
    url = f"/books/{book['id']}"
    assert_problem(await client.get(url, headers={"If-Match": '"stale"'}), 412)
    for header in (book["etag"], f'"other", {book["etag"]}', "*"):
        assert (await client.get(url, headers={"If-Match": header})).status_code == 200
    assert_problem(await client.get(url, headers={"If-Unmodified-Since": LONG_AGO}), 412)
    # If-Match takes precedence over If-Unmodified-Since (RFC 9110 §13.2.2).
    both = {"If-Match": book["etag"], "If-Unmodified-Since": LONG_AGO}
    assert (await client.get(url, headers=both)).status_code == 200
    assert (await client.get(url, headers={"If-Unmodified-Since": "not a date"})).status_code == 200
    review = await client.post(f"{url}/reviews", json={"reviewer": "Ann", "rating": 3})
    stale = {"If-Match": '"stale"'}
    assert_problem(await client.get(review.headers["Location"], headers=stale), 412)


async def test_last_modified_and_if_modified_since(client: AsyncTestClient, book):
    url = f"/books/{book['id']}"
    response = await client.get(url)
    modified = response.headers["Last-Modified"]
    updated_at = datetime.fromisoformat(response.json()["updated_at"]).replace(microsecond=0)
    assert http_date(modified) == updated_at
    assert (await client.get(url, headers={"If-Modified-Since": modified})).status_code == 304
    assert (await client.get(url, headers={"If-Modified-Since": LONG_AGO})).status_code == 200
    # If-None-Match takes precedence over If-Modified-Since.
    both = {"If-None-Match": '"other"', "If-Modified-Since": modified}
    assert (await client.get(url, headers=both)).status_code == 200
    changed = await client.patch(url, json={"year": 1966})
    assert http_date(changed.headers["Last-Modified"]) >= http_date(modified)
    assert changed.headers["ETag"] == (await client.get(url)).headers["ETag"]


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
async def test_a_write_honours_if_unmodified_since(client: AsyncTestClient, book, method):
    url = f"/books/{book['id']}"
    body = {**BOOK, "year": 1} if method != "DELETE" else None
    stale = {"If-Unmodified-Since": LONG_AGO}
    assert_problem(await client.request(method, url, headers=stale, json=body), 412)
    assert (await client.get(url)).json()["year"] == BOOK["year"]
    now = {"If-Unmodified-Since": format_datetime(datetime.now().astimezone(), usegmt=True)}
    assert (await client.request(method, url, headers=now, json=body)).status_code < 300


# --- One representation, and how it may be cached -----------------------------------------


async def test_a_book_has_one_representation_whatever_the_accept(client: AsyncTestClient, book):
    """`Accept: application/yaml` was answered in YAML with the JSON's strong ETag, and a
    JSON ETag then answered the YAML request with 304 (RFC 9110 §8.8.1)."""
    url = f"/books/{book['id']}"
    for accept in ("application/yaml", "application/x-msgpack", "application/json", "*/*"):
        response = await client.get(url, headers={"Accept": accept})
        assert response.headers["Content-Type"].startswith("application/json"), accept
        assert response.json()["id"] == book["id"] and response.headers["ETag"] == book["etag"]
        assert "Vary" not in response.headers


async def test_the_schema_varies_on_accept(client: AsyncTestClient):
    as_yaml = await client.get("/schema.yml")
    as_json = await client.get("/schema.yml", headers={"Accept": "application/json"})
    assert as_yaml.headers["Content-Type"].startswith("application/yaml")
    assert as_json.headers["Content-Type"].startswith("application/json")
    assert "Accept" in as_yaml.headers["Vary"] and "Accept" in as_json.headers["Vary"]


async def test_responses_say_how_they_may_be_cached(client: AsyncTestClient, book):
    """Without Cache-Control, shared caches guess a freshness of their own (heuristics)."""
    url = f"/books/{book['id']}"
    for response in (
        await client.get(url),
        await client.get("/books"),
        await client.get(f"{url}/reviews"),
        await client.patch(url, json={"year": 1970}),
    ):
        assert response.headers["Cache-Control"] == "no-cache", response.request.url
    for problem in (await client.get("/books/424242"), await client.get("/nowhere")):
        assert problem.headers["Cache-Control"] == "no-store"
    assert (await client.get(url, headers={"If-None-Match": "*"})).headers["Cache-Control"] == (
        "no-cache"
    )


# --- Below the routes ------------------------------------------------------------------------


async def test_a_too_long_request_target_is_a_414_problem(client: AsyncTestClient):
    response = await client.get("/books", params={"author": "a" * MAX_TARGET_BYTES})
    body = assert_problem(response, 414)
    assert body["request_id"] == response.headers["X-Request-ID"]


def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library would send these) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                head, _, body = answer.partition(b"\r\n\r\n")
                headers = dict(
                    line.decode().split(": ", 1)
                    for line in head.split(b"\r\n")[1:]
                    if b": " in line
                )
                length = int(headers.get("content-length", 0))
                if len(body) >= length:
                    return int(head.split(b" ")[1]), headers, body[:length]
    raise AssertionError(f"no whole answer: {answer!r}")


def test_host_header_rules_and_cors_refusals_are_problems(tmp_path):
    """RFC 9112 §3.2: no Host, two, or an invalid one is a 400; a refused CORS preflight
    (Starlette's text/plain 400) is a problem too. A real server: no client sends these."""
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}",
        "CORS_ORIGINS": "https://books.example",
    }
    with serving(env) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for request in (
            b"GET /books HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET /books HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            b"GET /books HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
            b"GET /books HTTP/1.1\r\nHost: a.example/x\r\nConnection: close\r\n\r\n",
        ):
            status, headers, body = raw_request(port, request)
            assert status == 400, request
            assert headers["content-type"] == "application/problem+json"
            assert b"Host" in body and b'"request_id"' in body
        ok = b"GET /books HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
        assert raw_request(port, ok)[0] == 200
        assert raw_request(port, b"GET /books HTTP/1.0\r\n\r\n")[0] == 200  # may omit Host
        preflight = (
            b"OPTIONS /books HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n"
            b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = raw_request(port, preflight)
        assert status == 400 and headers["content-type"] == "application/problem+json"
        assert b"Disallowed CORS origin" in body
        allowed = preflight.replace(b"evil", b"books")
        assert raw_request(port, allowed)[0] == 200
