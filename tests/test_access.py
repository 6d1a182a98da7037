"""Who may write: API_TOKENS / API_TOKENS_FILE, bearer tokens, 401 before anything else."""

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from responder.testing import AsyncTestClient

from settings import Settings
from tests.conftest import BOOK, app_client

TOKEN, FILE_TOKEN = "s3cret-writer", "token-from-the-file"


@pytest.fixture
async def locked(settings: Settings, tmp_path: Path) -> AsyncIterator[AsyncTestClient]:
    """The app with API_TOKENS and API_TOKENS_FILE set."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# writers\n\n{FILE_TOKEN}\n")
    options = {"api_tokens": f"{TOKEN}, another", "api_tokens_file": tokens_file}
    async with app_client(settings, **options) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_writes_need_a_known_token_and_reads_stay_public(locked: AsyncTestClient):
    created = await locked.post("/books", json=BOOK, headers=bearer(TOKEN))
    assert created.status_code == 201
    path, etag = created.headers["Location"], created.headers["ETag"]
    assert (await locked.get(path)).status_code == 200
    assert (await locked.get("/books")).json()["total"] == 1

    change = {"title": "Dune (revised)"}
    writes: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/books", {"json": BOOK}),
        ("PUT", path, {"json": {**BOOK, **change}}),
        ("PATCH", path, {"json": change}),
        ("DELETE", path, {}),
    ]
    for authorization in [None, "Bearer wrong", "Bearer", "Basic czNjcmV0", TOKEN, "Bearer  "]:
        headers = {"Authorization": authorization} if authorization else {}
        for method, url, body in writes:
            response = await locked.request(method, url, headers=headers, **body)
            assert response.status_code == 401, (method, authorization, response.text)
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="books"'
            assert response.headers["Content-Type"].startswith("application/problem+json")
            problem = response.json()
            assert problem["status"] == 401 and problem["request_id"]
            assert TOKEN not in response.text
    stored = await locked.get(path)
    assert stored.headers["ETag"] == etag and stored.json()["title"] == BOOK["title"]
    assert (await locked.get("/books")).json()["total"] == 1

    # Scheme names are case-insensitive; the file's tokens count too.
    for authorization in [f"bearer {FILE_TOKEN}", f"BEARER {TOKEN}"]:
        response = await locked.patch(path, json=change, headers={"Authorization": authorization})
        assert response.status_code == 200, response.text
    assert (await locked.delete(path, headers=bearer("another"))).status_code == 204


async def test_the_token_is_checked_before_the_body_or_the_book(locked: AsyncTestClient):
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/books", {"content": b"title=Dune", "headers": {"Content-Type": "text/plain"}}),
        (
            "POST",
            "/books",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        ),
        ("POST", "/books", {"json": {"title": ""}}),
        ("PUT", "/books/999", {"json": BOOK}),
        ("DELETE", "/books/999", {}),
        (
            "POST",
            "/books",
            {"content": b"x" * (1024 * 1024 + 1), "headers": {"Content-Type": "application/json"}},
        ),
    ]
    for method, url, options in requests:
        response = await locked.request(method, url, **options)
        assert response.status_code in (401, 413), (method, url, response.status_code)
        if response.status_code == 413:  # the size limit is enforced as the body arrives
            continue
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="books"'
    bad = await locked.post("/books", json={"title": ""}, headers=bearer(TOKEN))
    assert bad.status_code == 422  # with a token, the body is validated as usual


async def test_tokens_never_reach_the_logs(
    locked: AsyncTestClient, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.DEBUG):
        await locked.post("/books", json=BOOK, headers=bearer("guessed-token"))
        await locked.post("/books", json=BOOK, headers=bearer(TOKEN))
    assert "guessed-token" not in caplog.text and TOKEN not in caplog.text


async def test_the_openapi_document_declares_the_scheme_on_writes_only(client: AsyncTestClient):
    document = (await client.get("/schema.yml", headers={"Accept": "application/json"})).json()
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    operations = {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    for (method, path), operation in operations.items():
        expected: list[dict[str, list[str]]] = (
            [{"bearerAuth": []}] if method in ("post", "put", "patch", "delete") else []
        )
        assert operation["security"] == expected, (method, path)  # reads: explicitly none


def test_an_unreadable_tokens_file_stops_the_process(tmp_path: Path):
    from tests.servers import run

    result = run(["app.py"], {"API_TOKENS_FILE": str(tmp_path / "missing")})
    assert result.returncode != 0
    assert "API_TOKENS_FILE: cannot be read (FileNotFoundError)" in result.stderr
    assert "Traceback" not in result.stderr
