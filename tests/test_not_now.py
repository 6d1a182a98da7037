"""PostgreSQL errors that mean "not now" rather than "wrong request": a write on a read-only
server (25006: a standby, a demoted primary), a serialization or recovery conflict (40001),
a deadlock (40P01). Each is a 503 problem with Retry-After, logged once with its SQLSTATE,
and changes nothing; a read cancelled by a conflict is tried once more before it is one.

The errors are raised by the real server, through the real driver: by a trigger, by the
database's read-only default, and by a statement in the read itself."""

import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from responder import Problem
from responder.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import web
from app import api
from tests.conftest import admin_query, needs_postgres
from tests.test_books import assert_problem

pytestmark = [
    needs_postgres,
    pytest.mark.parametrize("settings", ["postgresql"], indirect=True),
]

RAISE = "RAISE EXCEPTION 'not now' USING ERRCODE = '{}';"


def logged_503s(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("database unavailable")
    ]


@pytest.fixture
async def failing_updates(client: AsyncTestClient, sqlstate: str) -> AsyncIterator[None]:
    """Every UPDATE of a book raises `sqlstate`, until the test ends."""
    async with api.state.engine.begin() as connection:
        await connection.execute(
            text(
                "CREATE FUNCTION not_now() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"{RAISE.format(sqlstate)} END $$"
            )
        )
        await connection.execute(
            text(
                "CREATE TRIGGER not_now BEFORE UPDATE ON books"
                " FOR EACH ROW EXECUTE FUNCTION not_now()"
            )
        )
    yield
    async with api.state.engine.begin() as connection:
        await connection.execute(text("DROP TRIGGER not_now ON books"))
        await connection.execute(text("DROP FUNCTION not_now()"))


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
@pytest.mark.usefixtures("failing_updates")
async def test_a_conflict_or_deadlock_on_a_write_is_a_503_that_changes_nothing(
    client: AsyncTestClient, book: dict, sqlstate: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="books")
    response = await client.patch(f"/books/{book['id']}", json={"title": "Changed"})
    assert_problem(response, 503)
    assert response.headers["Retry-After"]
    assert logged_503s(caplog) == [f"database unavailable (503): {sqlstate}"]
    stored = await client.get(f"/books/{book['id']}")
    assert stored.json()["title"] == book["title"]
    assert stored.headers["ETag"] == book["etag"]


async def test_a_write_on_a_read_only_server_is_a_503_that_changes_nothing(
    client: AsyncTestClient, book: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """As on a standby or a demoted primary: every new transaction is read-only."""
    caplog.set_level(logging.WARNING, logger="books")
    name = api.state.engine.url.database
    await admin_query(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    await api.state.engine.dispose()  # new connections take the database's new default
    try:
        response = await client.post("/books", json=BOOK_TWO)
        assert_problem(response, 503)
        assert response.headers["Retry-After"]
        assert logged_503s(caplog) == ["database unavailable (503): 25006"]
        assert (await client.get("/books")).json()["total"] == 1  # reads go on
    finally:
        await admin_query(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await api.state.engine.dispose()
    assert (await client.post("/books", json=BOOK_TWO)).status_code == 201


BOOK_TWO = {"title": "Emma", "author": "Jane Austen", "year": 1815}


async def test_a_read_cancelled_by_a_conflict_is_tried_once_more(client: AsyncTestClient) -> None:
    request = SimpleNamespace(api=api)
    attempts = []

    async def conflict_once(session: AsyncSession) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            await session.execute(text(f"DO $$ BEGIN {RAISE.format('40001')} END $$"))
        return int((await session.execute(text("SELECT 42"))).scalar_one())

    assert await web.read(request, conflict_once) == 42  # type: ignore[arg-type]
    assert len(attempts) == 2


async def test_a_read_that_conflicts_twice_is_a_503(
    client: AsyncTestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="books")
    request = SimpleNamespace(api=api)
    attempts = []

    async def always_conflicts(session: AsyncSession) -> None:
        attempts.append(1)
        await session.execute(text(f"DO $$ BEGIN {RAISE.format('40001')} END $$"))

    with pytest.raises(Problem) as raised:
        await web.read(request, always_conflicts)  # type: ignore[arg-type]
    assert raised.value.status_code == 503
    assert raised.value.headers and raised.value.headers["Retry-After"]
    assert len(attempts) == 2
    assert logged_503s(caplog) == ["database unavailable (503): 40001"]
