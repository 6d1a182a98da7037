"""Past one process: behind PgBouncer in transaction mode, with several workers, and with
fewer server connections than the pools would open. Real servers throughout; the API
suite itself also runs through the pooler (the `postgresql+pooler` backend, TEST_POOLER=1).
"""

import asyncio
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BOOK, TEST_DATABASE_URL
from tests.servers import (
    PgBouncer,
    PostgresServer,
    free_port,
    have_postgres_binaries,
    run,
    serving,
    start,
    wait_until_healthy,
)
from tests.test_operations import figure


@pytest.fixture
def through_pooler(postgres_url: str, pgbouncer: PgBouncer) -> dict[str, str]:
    """The environment of an app reaching a fresh database through the pooler."""
    return {"DATABASE_URL": pgbouncer.url(postgres_url), "DATABASE_POOLER": "transaction"}


async def traffic(url: str, requests: int = 120) -> Counter[int]:
    """Creates, reads and listings at once, as clients would send them: their statuses."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one(number: int) -> list[int]:
            body = {**BOOK, "title": f"Book {number}", "isbn": None}
            created = await client.post("/books", json=body)
            statuses = [created.status_code]
            if created.status_code == 201:
                statuses.append((await client.get(created.headers["Location"])).status_code)
            statuses.append((await client.get("/books", params={"sort": "-title"})).status_code)
            return statuses

        results = await asyncio.gather(*(one(number) for number in range(requests)))
    return Counter(status for statuses in results for status in statuses)


def test_alembic_works_through_the_pooler_run_after_run(through_pooler: dict[str, str]):
    """`alembic current` and `check` failed on their second run (prepared statements
    left on a server connection by the first)."""
    for _ in range(2):
        for command in (["upgrade", "head"], ["current"], ["check"]):
            result = run(["-m", "alembic", *command], env=through_pooler)
            assert result.returncode == 0, result.stderr
        assert "(head)" in run(["-m", "alembic", "current"], env=through_pooler).stdout


def test_the_app_starts_again_and_again_against_a_pooler_that_served_traffic(
    through_pooler: dict[str, str],
):
    """In 5 of 6 restarts against a pooler that had served traffic, a worker died at
    startup; and most requests failed with `prepared statement ... does not exist`."""
    for _ in range(2):
        with serving(through_pooler) as server:
            statuses = asyncio.run(traffic(server.url))
        assert set(statuses) == {200, 201}, statuses
        assert "Traceback" not in server.output() and "ERROR" not in server.output()


def test_import_and_seed_run_after_run_beside_api_traffic(
    through_pooler: dict[str, str], tmp_path: Path
):
    """`import` staged into a temporary table that did not survive the pooler's
    transaction boundaries: `relation "incoming_books" does not exist` part-way."""
    books = tmp_path / "books.csv"
    books.write_text(
        "title,author,year\n"
        + "".join(f"Title {n},Author {n % 7},{1900 + n % 100}\n" for n in range(25_000))
    )
    with serving(through_pooler) as server:

        async def both() -> tuple[Counter[int], list[subprocess.CompletedProcess[str]]]:
            loads = [
                asyncio.to_thread(
                    run, ["app.py", "import", str(books), "--batch-size", "5000"], through_pooler
                )
                for _ in range(2)
            ]
            loaded = await asyncio.gather(*loads)
            return await traffic(server.url, 60), list(loaded)

        statuses, loaded = asyncio.run(both())
        for result in loaded:
            assert result.returncode == 0, result.stderr
            assert "books stored: 25,000" in result.stderr
        seeded = run(["app.py", "seed", "500"], through_pooler)
        assert seeded.returncode == 0, seeded.stderr
        total = httpx.get(f"{server.url}/books").json()["total"]
    assert set(statuses) == {200, 201}, statuses
    assert total == 50_000 + 500 + 60


def test_without_the_setting_the_log_says_what_to_set(postgres_url: str, pgbouncer: PgBouncer):
    """Behind a pooler without DATABASE_POOLER, the failures name the variable to set,
    rather than a stream of anonymous 500s."""
    with serving({"DATABASE_URL": pgbouncer.url(postgres_url)}) as server:
        statuses = asyncio.run(traffic(server.url, 60))
    assert statuses[500] > 0, statuses  # what the setting is for
    log = server.output()
    assert "set DATABASE_POOLER=transaction" in log


@pytest.fixture
def small_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own that takes 8 connections in all."""
    if not (TEST_DATABASE_URL and have_postgres_binaries()):
        pytest.skip("needs TEST_DATABASE_URL (PostgreSQL here), its initdb and pg_ctl, and runuser")
    server = PostgresServer(max_connections="8", superuser_reserved_connections="1")
    server.start()
    yield server
    server.remove()


def test_too_few_server_connections_are_503s_each_logged_never_500s(
    small_server: PostgresServer,
):
    """Two workers whose pools may open 2 x 20 connections, against 8: the requests that
    find none answer 503 with Retry-After, and each 503 has a log line with its cause."""
    port = free_port()
    env = {"DATABASE_URL": small_server.url, "POOL_TIMEOUT": "1", "LOG_LEVEL": "warning"}
    process = start(["-m", "uvicorn", "app:api", "--workers", "2", "--port", str(port)], env=env)
    try:
        wait_until_healthy(port, process)

        async def crowd() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                return await asyncio.gather(
                    *(http.get("/books", params={"q": f"x{n}"}) for n in range(200))
                )

        responses = asyncio.run(crowd())
    finally:
        process.terminate()
        process.wait(timeout=20)
    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) <= {200, 503} and statuses[503] > 0, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "5"
            assert response.headers["Content-Type"].startswith("application/problem+json")
    logged = re.findall(r"database unavailable \(503\): (\w+)", process.output())
    assert len(logged) == statuses[503], (logged, statuses)
    assert set(logged) <= {"53300", "TimeoutError"}, set(logged)  # too many clients; pool full


def test_one_scrape_of_several_workers_counts_every_request(tmp_path: Path):
    """`/metrics` was per worker: two scrapes of one server gave two different counts."""
    port = free_port()
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "LOG_LEVEL": "warning",
    }
    process = start(["-m", "uvicorn", "app:api", "--workers", "2", "--port", str(port)], env=env)
    try:
        wait_until_healthy(port, process)
        requests = 300
        for _ in range(requests):  # a connection each, so that both workers answer
            assert httpx.get(f"http://127.0.0.1:{port}/books").status_code == 200
        scrapes = [httpx.get(f"http://127.0.0.1:{port}/metrics").text for _ in range(4)]
    finally:
        process.terminate()
        process.wait(timeout=20)
    series = 'responder_requests_total{method="GET",path="/books",status="200"}'
    counts = {figure(text, series) for text in scrapes}
    assert counts == {requests}, counts
    assert len(list(metrics.glob("counter_*.db"))) == 2  # both workers counted
