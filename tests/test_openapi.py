"""The OpenAPI document as a client generator reads it: a Python client generated from the
live document (openapi-python-client) does the ETag workflow with its own typed code.
(`.ci/run` also lints the served document with Redocly's recommended rules.)"""

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import yaml

from tests.servers import serving

GENERATOR = Path(sys.executable).with_name("openapi-python-client")


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A running service, and the client package generated from its /schema.yml."""
    with serving({"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"}) as server:
        document = tmp_path / "openapi.yaml"
        document.write_text(httpx.get(f"{server.url}/schema.yml").text)
        subprocess.run(
            [str(GENERATOR), "generate", "--path", str(document), "--meta", "none",
             "--output-path", str(tmp_path / "books_client")],
            check=True, capture_output=True,
        )  # fmt: skip
        sys.path.insert(0, str(tmp_path))
        try:
            yield server.url, tmp_path
        finally:
            sys.path.remove(str(tmp_path))
            for name in [name for name in sys.modules if name.startswith("books_client")]:
                del sys.modules[name]


def module(name: str) -> ModuleType:
    return importlib.import_module(f"books_client.{name}")


def test_the_document_declares_what_the_server_enforces(generated):
    _, directory = generated
    document = yaml.safe_load((directory / "openapi.yaml").read_text())
    assert document["servers"]
    patch = document["paths"]["/books/{book_id}"]["patch"]
    assert set(patch["requestBody"]["content"]) == {
        "application/json",
        "application/merge-patch+json",
    }
    headers = {p["name"] for p in patch["parameters"] if p["in"] == "header"}
    assert headers == {"If-Match", "If-None-Match", "If-Unmodified-Since"}
    assert {"ETag", "Last-Modified", "X-Request-ID"} <= set(patch["responses"]["200"]["headers"])
    created = document["paths"]["/books"]["post"]["responses"]["201"]["headers"]
    assert {"Location", "ETag"} <= set(created)
    listed = document["paths"]["/books"]["get"]["responses"]["200"]["headers"]
    assert {"Link", "X-Total-Count"} <= set(listed)
    refused = document["paths"]["/books"]["get"]["responses"]["429"]["headers"]
    assert {"Retry-After", "X-RateLimit-Limit"} <= set(refused)
    schemas = document["components"]["schemas"]
    for field in ("title", "author", "year"):  # the server answers 422 to null
        assert "anyOf" not in schemas["BookPatch"]["properties"][field]
        assert "null" not in str(schemas["BookPatch"]["properties"][field])
    assert schemas["BookIn"]["properties"]["title"]["maxLength"] == 300
    assert schemas["BookOut"]["properties"]["isbn"]["pattern"] == "^97[89][0-9]{10}$"
    book_id = patch["parameters"][0]
    assert book_id["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}


def test_a_generated_client_does_the_etag_workflow(generated):
    """create → read (ETag) → update with a stale ETag (412) → with the fresh one →
    list with a filter → delete, all through the generated, typed functions."""
    url, _ = generated
    client = module("client").Client(base_url=url, raise_on_unexpected_status=True)
    models = module("models")

    created = module("api.books.post_books").sync_detailed(
        client=client, body=models.BookIn(title="Dune", author="Frank Herbert", year=1965)
    )
    assert created.status_code == 201 and isinstance(created.parsed, models.BookOut)
    book_id, first_etag = created.parsed.id, created.headers["ETag"]

    read = module("api.books.get_books_book_id").sync_detailed(book_id, client=client)
    assert read.status_code == 200 and read.headers["ETag"] == first_etag
    assert read.parsed.title == "Dune" and read.parsed.review_count == 0

    update = module("api.books.patch_books_book_id")
    changed = update.sync_detailed(
        book_id, client=client, body=models.BookPatch(year=1966), if_match=first_etag
    )
    assert changed.status_code == 200 and changed.parsed.year == 1966
    stale = update.sync_detailed(
        book_id, client=client, body=models.BookPatch(year=1967), if_match=first_etag
    )
    assert stale.status_code == 412 and isinstance(stale.parsed, models.ProblemDetails)
    assert stale.parsed.status == 412

    page = module("api.books.get_books").sync(client=client, author="frank herbert")
    assert isinstance(page, models.BookPage)
    assert [book.year for book in page.items] == [1966] and page.total == 1

    delete = module("api.books.delete_books_book_id")
    assert delete.sync_detailed(book_id, client=client, if_match=first_etag).status_code == 412
    fresh = changed.headers["ETag"]
    assert delete.sync_detailed(book_id, client=client, if_match=fresh).status_code == 204
    gone = module("api.books.get_books_book_id").sync_detailed(book_id, client=client)
    assert gone.status_code == 404
