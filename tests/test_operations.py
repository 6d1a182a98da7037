"""Health, metrics, docs, configuration, outages and shutdown."""

import asyncio
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml
from responder.testing import AsyncTestClient
from sqlalchemy.engine import make_url

from app import api
from settings import Settings
from tests.conftest import BOOK, admin_query
from tests.servers import ROOT, TcpProxy, free_port, run, start, wait_until_healthy
from tests.test_books import assert_problem


async def test_health_reports_the_database_with_latency(
    client: AsyncTestClient, settings: Settings
):
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["status"] == "ok"
    assert isinstance(body["checks"]["database"]["latency_ms"], float | int)
    assert ("cache" in body["checks"]) == (settings.redis_url is not None)


def figure(text: str, series: str) -> float:
    """One series' value in a Prometheus text exposition (0 if absent)."""
    found = re.search(rf"^{re.escape(series)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


async def test_metrics_count_requests_by_route_pool_and_cache(
    client: AsyncTestClient, settings: Settings
):
    listed = 'responder_requests_total{method="GET",path="/books",status="200"}'
    missing = 'responder_requests_total{method="GET",path="/books/{book_id}",status="404"}'
    before = (await client.get("/metrics")).text
    await client.get("/books")  # misses a page and its total
    await client.get("/books/424242")  # misses a book
    text = (await client.get("/metrics")).text
    assert text.startswith("# HELP") and "responder_request_duration_seconds_bucket" in text
    assert figure(text, listed) == figure(before, listed) + 1
    assert figure(text, missing) == figure(before, missing) + 1
    assert figure(text, 'books_db_pool_connections{state="in_use"}') == 0  # all returned
    assert figure(text, 'books_db_pool_connections{state="idle"}') >= 1
    misses = figure(text, "books_cache_misses_total") - figure(before, "books_cache_misses_total")
    assert misses == (3 if settings.redis_url is not None else 0)


async def test_docs_page_and_openapi_document(client: AsyncTestClient):
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "://" not in docs.text  # every asset is served here: the page works offline
    assets = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', docs.text)
    assert len(assets) == 4
    for asset in assets:
        assert (await client.get(asset)).status_code == 200, asset
    document = yaml.safe_load((await client.get("/schema.yml")).text)
    as_json = (await client.get("/schema.yml", headers={"Accept": "application/json"})).json()
    assert as_json["paths"].keys() == document["paths"].keys()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert set(paths["/books"]) >= {"get", "post"}
    assert set(paths["/books/{book_id}"]) >= {"get", "put", "patch", "delete"}
    listed = {parameter["name"] for parameter in paths["/books"]["get"]["parameters"]}
    assert listed >= {"page", "size", "sort", "author", "year", "q", "cursor"}
    for path, method in [
        ("/books", "post"),
        ("/books/{book_id}", "put"),
        ("/books/{book_id}", "patch"),
    ]:
        assert "requestBody" in paths[path][method], (path, method)
    assert "201" in paths["/books"]["post"]["responses"]
    schemas = document["components"]["schemas"]
    assert {"BookIn", "BookOut", "BookPatch", "BookPage"} <= set(schemas)

    def success_schema(path: str, method: str, status: str) -> str:
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"][
            "$ref"
        ]

    assert success_schema("/books", "get", "200").endswith("/BookPage")
    assert success_schema("/books", "post", "201").endswith("/BookOut")
    for method in ("get", "put", "patch"):
        assert success_schema("/books/{book_id}", method, "200").endswith("/BookOut")


async def test_every_response_has_a_request_id_and_problems_carry_it(client: AsyncTestClient):
    response = await client.get("/books/9999", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    assert assert_problem(response, 404)["request_id"] == "abc-123"
    assert (await client.get("/books")).headers["X-Request-ID"]


async def test_responses_are_not_content_sniffed(client: AsyncTestClient):
    for response in (await client.get("/books"), await client.get("/books/9999")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "abc"),
        ("SQL_ECHO", "banana"),
        ("DATABASE_URL", "nosuchdriver://x"),
        ("PORT", "70000"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "redis://127.0.0.1:port"),
        ("CACHE_TTL_SECONDS", "0"),
    ],
)
def test_a_bad_setting_stops_the_process_naming_the_variable(variable, value, tmp_path: Path):
    result = run([str(ROOT / "app.py")], env={variable: value}, cwd=tmp_path)
    assert result.returncode != 0
    assert variable in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_settings_read_a_dotenv_file_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / ".env").write_text("PORT=6000\nSQL_ECHO=true\nDATABASE_URL=postgres://u@h/db\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("SQL_ECHO", "false")
    settings = Settings()
    assert settings.port == 6000
    assert settings.sql_echo is False
    assert make_url(settings.database_url).drivername == "postgresql+asyncpg"


def test_an_empty_redis_url_leaves_the_cache_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_URL", "")
    assert Settings().redis_url is None


def test_postgresql_urls_mean_asyncpg():
    for url in ("postgres://u@h/db", "postgresql://u@h/db", "postgresql+asyncpg://u@h/db"):
        assert Settings(database_url=url).database_url == "postgresql+asyncpg://u@h/db"


async def test_lifespan_leaves_no_database_connection_open(postgres_url: str):
    api.state.settings = Settings(database_url=postgres_url)
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        await asyncio.gather(*(client.get("/books") for _ in range(10)))
    name = make_url(postgres_url).database
    count = await admin_query("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name)
    assert count == 0


async def test_database_outage_is_503_quickly_and_the_service_recovers(postgres_url: str):
    url = make_url(postgres_url)
    proxy = TcpProxy(target_port=url.port or 5432)
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    api.state.settings = Settings(database_url=proxied)
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        created = (await client.post("/books", json=BOOK)).json()
        await proxy.cut()
        for request in (
            client.get(f"/books/{created['id']}"),
            client.get("/books"),
            client.post("/books", json={**BOOK, "isbn": None}),
            client.patch(f"/books/{created['id']}", json={"year": 1}),
        ):
            started = time.monotonic()
            response = await request
            assert time.monotonic() - started < 5
            body = assert_problem(response, 503)
            assert response.headers["Retry-After"] == "5"
            assert str(proxy.port) not in response.text and "asyncpg" not in body["detail"]
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["checks"]["database"]["status"] == "error"
        assert health.json()["status"] == "error"

        await proxy.start()
        deadline = time.monotonic() + 15
        while (response := await client.get(f"/books/{created['id']}")).status_code != 200:
            assert time.monotonic() < deadline, response.text
            await asyncio.sleep(0.2)
        assert response.json()["year"] == BOOK["year"]  # the write during the outage left nothing
        assert (await client.get("/books")).json()["total"] == 1
    await proxy.cut()


def test_sigterm_finishes_in_flight_requests_and_exits(tmp_path: Path):
    port = free_port()
    process = start(
        ["app.py"],
        env={"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", "PORT": str(port)},
    )
    wait_until_healthy(port, process)

    async def traffic() -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def one(n: int) -> httpx.Response | Exception:
                try:
                    return await http.post(
                        "/books", json={"title": f"t{n}", "author": "a", "year": 1}
                    )
                except httpx.TransportError as exc:
                    return exc

            tasks = [asyncio.create_task(one(n)) for n in range(60)]
            # signal once the server is busy: the first answer is back, the rest are in flight
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    started = time.monotonic()
    results = asyncio.run(traffic())
    process.wait(timeout=10)
    output = process.output()
    assert time.monotonic() - started < 10
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete." in output
    answered = [r for r in results if isinstance(r, httpx.Response)]
    assert len(answered) > 1, "no request was in flight when the signal came"
    assert all(r.status_code == 201 and r.json()["id"] for r in answered)
    # whatever was refused was refused before it was accepted, never cut mid-response
    assert all(
        isinstance(r, httpx.ConnectError) for r in results if not isinstance(r, httpx.Response)
    )


def test_every_log_line_of_a_request_carries_its_request_id(tmp_path: Path):
    port = free_port()
    process = start(
        ["app.py"],
        env={
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
            "PORT": str(port),
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nobody there: warnings
        },
    )
    try:
        wait_until_healthy(port, process)
        response = httpx.get(
            f"http://127.0.0.1:{port}/books/7", headers={"X-Request-ID": "trace-me-42"}
        )
        assert response.headers["X-Request-ID"] == "trace-me-42"
        assert response.json()["request_id"] == "trace-me-42"
        minted = httpx.get(f"http://127.0.0.1:{port}/books").headers["X-Request-ID"]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
    output = process.output().splitlines()
    traced = [line for line in output if "trace-me-42" in line]
    assert any("responder.access" in line and "404" in line for line in traced), output
    assert all("[req:trace-me-42]" in line for line in traced)
    assert any("responder.access" in line and f"[req:{minted}]" in line for line in output)
    # Our own warnings, logged while a request runs, carry that request's ID too.
    warnings = [line for line in output if "books.cache" in line and "unavailable" in line]
    assert warnings and all(re.search(r"\[req:[0-9a-f-]{36}\]", line) for line in warnings)
