"""The schema: created and stamped on an empty database, checked at start, migrated by Alembic."""

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from responder.testing import AsyncTestClient
from sqlalchemy import text

import database
from app import api
from database import SchemaError, create_engine, prepare_schema
from settings import Settings
from tests.conftest import BOOK
from tests.servers import ROOT, free_port, run, start, wait_until_healthy

HEAD = ScriptDirectory.from_config(Config(database.ALEMBIC_INI)).get_current_head()


def alembic(url: str, *args: str):
    result = run(["-m", "alembic", *args], env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


async def revisions(url: str) -> list[str]:
    engine = create_engine(Settings(database_url=url))
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return [row[0] for row in rows]
    finally:
        await engine.dispose()


async def serve_one_book(url: str) -> None:
    api.state.settings = Settings(database_url=url)
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        assert (await client.post("/books", json=BOOK)).status_code == 201
        assert (await client.get("/books")).json()["total"] >= 1


async def test_empty_database_is_created_and_stamped(empty_database: str):
    await serve_one_book(empty_database)
    assert await revisions(empty_database) == [HEAD]
    output = await asyncio.to_thread(alembic, empty_database, "upgrade", "head")
    assert "Running upgrade" not in output
    await asyncio.to_thread(alembic, empty_database, "check")


async def test_after_alembic_upgrade_the_app_just_runs(empty_database: str):
    await asyncio.to_thread(alembic, empty_database, "upgrade", "head")
    await serve_one_book(empty_database)
    assert await revisions(empty_database) == [HEAD]


async def test_migrations_round_trip_and_match_the_models(empty_database: str):
    for step in (
        ("upgrade", "head"),
        ("check",),
        ("downgrade", "base"),
        ("upgrade", "head"),
        ("check",),
    ):
        await asyncio.to_thread(alembic, empty_database, *step)


async def test_a_database_left_by_downgrade_base_counts_as_empty(empty_database: str):
    await asyncio.to_thread(alembic, empty_database, "upgrade", "head")
    await asyncio.to_thread(alembic, empty_database, "downgrade", "base")
    await serve_one_book(empty_database)
    assert await revisions(empty_database) == [HEAD]


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path):
    await serve_one_book(f"sqlite+aiosqlite:///{tmp_path / 'books.db'}")
    with sqlite3.connect(tmp_path / "books.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    engine = create_engine(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"))
    try:
        async with engine.connect() as connection:
            timeout = await connection.exec_driver_sql("PRAGMA busy_timeout")
            assert timeout.scalar() == database.SQLITE_BUSY_TIMEOUT_MS
            foreign_keys = await connection.exec_driver_sql("PRAGMA foreign_keys")
            assert foreign_keys.scalar() == 1
    finally:
        await engine.dispose()


async def test_concurrent_startups_on_an_empty_database_do_not_fail(empty_database: str):
    engines = [create_engine(Settings(database_url=empty_database)) for _ in range(6)]
    try:
        await asyncio.gather(*(prepare_schema(engine) for engine in engines))
    finally:
        await asyncio.gather(*(engine.dispose() for engine in engines))
    assert await revisions(empty_database) == [HEAD]


async def test_outdated_schema_stops_startup_naming_the_fix(
    empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The database is at today's head; the code (a copy with one more revision) is newer."""
    await asyncio.to_thread(alembic, empty_database, "upgrade", "head")
    newer = tmp_path / "newer"
    shutil.copytree(ROOT / "alembic", newer / "alembic")
    shutil.copy(ROOT / "alembic.ini", newer / "alembic.ini")
    (newer / "alembic" / "versions" / "next.py").write_text(
        f'revision = "0000000000ff"\ndown_revision = "{HEAD}"\n'
        "branch_labels = None\ndepends_on = None\n\n"
        "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
    )
    monkeypatch.setattr(database, "ALEMBIC_INI", newer / "alembic.ini")
    engine = create_engine(Settings(database_url=empty_database))
    try:
        with pytest.raises(SchemaError, match="run `uv run alembic upgrade head`"):
            await prepare_schema(engine)
    finally:
        await engine.dispose()


async def test_schema_from_newer_code_stops_startup(empty_database: str):
    await asyncio.to_thread(alembic, empty_database, "upgrade", "head")
    engine = create_engine(Settings(database_url=empty_database))
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE alembic_version SET version_num = 'feedfacecafe'")
            )
        with pytest.raises(SchemaError, match="newer than the code"):
            await prepare_schema(engine)
    finally:
        await engine.dispose()


def test_app_process_refuses_an_outdated_database_with_a_message(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"
    alembic(url, "upgrade", "head")
    with sqlite3.connect(tmp_path / "books.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'feedfacecafe'")
    process = start(["app.py"], env={"DATABASE_URL": url, "PORT": str(free_port())})
    process.wait(timeout=30)
    output = process.output()
    assert process.returncode != 0
    assert "newer than the code" in output


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_several_uvicorn_workers_start_at_once_on_an_empty_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
):
    url = (
        f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    port = free_port()
    process = start(
        ["-m", "uvicorn", "app:api", "--workers", "3", "--port", str(port)],
        env={"DATABASE_URL": url},
    )
    try:
        wait_until_healthy(port, process)
        import httpx

        created = httpx.post(f"http://127.0.0.1:{port}/books", json=BOOK, timeout=5)
        assert created.status_code == 201
    finally:
        process.terminate()
        process.wait(timeout=20)
    output = process.output()
    assert output.count("Application startup complete.") == 3, output
    assert "Traceback" not in output and "startup failed" not in output
