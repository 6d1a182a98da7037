"""Migrations round-trip exactly: a downgrade and an upgrade leave every table, column,
constraint, index (expression and trigram ones too), trigger and SQLite's AUTOINCREMENT
as they were, for the project's revisions, for one that autogenerate writes, and for a
SQLite table rebuild."""

import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

import database
from tests.servers import ROOT, repository_copy, run

REVISIONS = [
    revision.revision
    for revision in reversed(
        list(ScriptDirectory.from_config(Config(database.ALEMBIC_INI)).walk_revisions())
    )
]
# The rows the tests insert behind the API (the triggers count them; ids are checked).
INSERT_BOOK = (
    "INSERT INTO books (title, author, year, created_at, updated_at, version)"
    " VALUES ('t', 'a', 1, '2026-01-01 00:00:00+00', '2026-01-01 00:00:00+00', 1)"
)


INSERT_REVIEW = (
    "INSERT INTO reviews (book_id, reviewer, rating, text, created_at, updated_at, version)"
    " VALUES (1, 'r', 5, '', '2026-01-01 00:00:00+00', '2026-01-01 00:00:00+00', 1)"
)


def alembic(url: str, *args: str, cwd: Path = ROOT) -> str:
    result = run(["-m", "alembic", *args], env={"DATABASE_URL": url}, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def sqlite_text(sql: str | None) -> str:
    """SQL as SQLite keeps it, but for what does not change its meaning: a rebuilt table
    is renamed into place (`"books"`), and columns added by ALTER TABLE sit on one line."""
    sql = re.sub(r'^CREATE TABLE "(\w+)"', r"CREATE TABLE \1", sql or "")
    return re.sub(r"\s+", " ", sql)


def schema(url: str) -> str:
    """Everything the database says about its schema, as text to compare."""
    if url.startswith("sqlite"):
        with sqlite3.connect(make_url(url).database or "") as connection:
            rows = connection.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
            ).fetchall()
        return "\n".join(
            str((kind, name, table, sqlite_text(sql))) for kind, name, table, sql in rows
        )
    address = make_url(url).set(drivername="postgresql")
    dump = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", address.render_as_string(hide_password=False)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # pg_dump 15.14+ fences its output with a random key per run.
    return "\n".join(line for line in dump.splitlines() if not line.startswith("\\"))


def sql(url: str, *statements: str) -> list[tuple]:
    """Run statements behind the app (and Alembic); the last one's rows."""
    if url.startswith("sqlite"):
        with sqlite3.connect(make_url(url).database or "") as connection:
            rows: list[tuple] = []
            for statement in statements:
                rows = connection.execute(statement).fetchall()
            return rows
    address = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    script = ";\n".join(statements)
    printed = subprocess.run(
        ["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", address, "-c", script],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [tuple(line.split("|")) for line in printed.splitlines()]


def test_revisions_are_found():
    assert len(REVISIONS) >= 2


def test_every_revision_downgrades_and_upgrades_back_exactly(empty_database: str):
    """At each revision, from head down: downgrade one step, upgrade one step, and
    nothing differs. (On SQLite, the state one step down is also exactly what it was on
    the way up; PostgreSQL keeps the pg_trgm extension, which other schemas may use.)"""
    url = empty_database
    on_the_way_up = {}
    for revision in REVISIONS:
        alembic(url, "upgrade", revision)
        on_the_way_up[revision] = schema(url)
    for below, revision in reversed(list(zip(["base", *REVISIONS[:-1]], REVISIONS, strict=True))):
        at_revision = schema(url)
        alembic(url, "downgrade", below)
        if url.startswith("sqlite") and below != "base":
            assert schema(url) == on_the_way_up[below], f"downgrade {revision} -> {below}"
        alembic(url, "upgrade", revision)
        assert schema(url) == at_revision, f"downgrade and upgrade of {revision}"
        alembic(url, "downgrade", below)


def with_deleted_last_book(url: str) -> None:
    """Three books in, the last one deleted (its id must never be handed out again), and
    a review of the first (it must survive its book's table being rebuilt)."""
    sql(url, INSERT_BOOK, INSERT_BOOK, INSERT_BOOK, "DELETE FROM books WHERE id = 3", INSERT_REVIEW)


def assert_books_still_work(url: str) -> None:
    """The id after the deleted one's, the maintained count, and the review."""
    sql(url, INSERT_BOOK)
    assert [int(row[0]) for row in sql(url, "SELECT id FROM books ORDER BY id")] == [1, 2, 4]
    assert int(sql(url, "SELECT sum(books) FROM book_counts")[0][0]) == 3
    assert [int(row[0]) for row in sql(url, "SELECT book_id FROM reviews")] == [1]


def round_trip(url: str, copy: Path, before: str) -> str:
    """Upgrade `copy`'s new head revision, downgrade it, upgrade again: the schema before
    (`before`) and after it must come back exactly, and the data work; the schema after."""
    alembic(url, "upgrade", "head", cwd=copy)
    after = schema(url)
    alembic(url, "downgrade", "-1", cwd=copy)
    assert schema(url) == before
    alembic(url, "upgrade", "head", cwd=copy)
    assert schema(url) == after
    assert_books_still_work(url)
    return after


def test_an_autogenerated_revision_for_new_columns_round_trips(empty_database: str, tmp_path):
    """As a user grows the model: a nullable, indexed column and a timestamp, in a copy
    of the repository; autogenerate writes the revision, which imports what it uses."""
    url = empty_database
    copy = repository_copy(tmp_path / "repository", leave_out=("tests/", "bench/"))
    models = copy / "models.py"
    models.write_text(
        models.read_text().replace(
            "    isbn: Mapped[str | None] = mapped_column(String(13))\n",
            "    isbn: Mapped[str | None] = mapped_column(String(13))\n"
            "    language: Mapped[str | None] = mapped_column(String(35), index=True)\n"
            "    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)\n",
        )
    )
    alembic(url, "upgrade", "head", cwd=copy)
    with_deleted_last_book(url)
    before = schema(url)
    alembic(url, "revision", "--autogenerate", "-m", "add language", cwd=copy)
    (revision,) = (copy / "alembic" / "versions").glob("*_add_language.py")
    written = revision.read_text()
    assert "batch_alter_table" not in written  # SQLite ALTERs these in place
    assert "models." not in written  # the database type, not models.UTCDateTime
    compile(written, str(revision), "exec")
    after = round_trip(url, copy, before)
    assert "language" in after and "checked_at" in after
    alembic(url, "check", cwd=copy)


REBUILD = '''"""wider titles"""

import sqlalchemy as sa

from database import sqlite_rebuild

revision = "0000000000aa"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with sqlite_rebuild("books") as batch_op:
        batch_op.alter_column("title", type_=sa.String(400), existing_nullable=False)


def downgrade() -> None:
    with sqlite_rebuild("books") as batch_op:
        batch_op.alter_column("title", type_=sa.String(300), existing_nullable=False)
'''


def test_a_table_rebuild_keeps_triggers_expression_indexes_and_autoincrement(
    empty_database: str, tmp_path
):
    """A change SQLite can only make by rebuilding the table, written with
    `database.sqlite_rebuild` as the README shows."""
    url = empty_database
    copy = repository_copy(tmp_path / "repository", leave_out=("tests/", "bench/"))
    (copy / "alembic" / "versions" / "wider_titles.py").write_text(
        REBUILD.format(head=REVISIONS[-1])
    )
    alembic(url, "upgrade", REVISIONS[-1], cwd=copy)
    with_deleted_last_book(url)
    before = schema(url)
    widened = round_trip(url, copy, before)
    assert "VARCHAR(400)" in widened or "character varying(400)" in widened


@pytest.mark.parametrize("path", REVISIONS)
def test_revisions_never_import_the_models(path: str):
    """A revision must run the same way after models.py has moved on."""
    script = ScriptDirectory.from_config(Config(database.ALEMBIC_INI)).get_revision(path)
    assert script is not None and script.path is not None
    assert not re.search(r"^\s*(import models|from models)", Path(script.path).read_text(), re.M)
