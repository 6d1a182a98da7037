"""`app.py import` and `app.py seed`: the API's validation, line numbers, batches, COPY."""

import json
import re
import sqlite3
from pathlib import Path

import pytest
from responder.testing import AsyncTestClient

import bulk
from schemas import BookIn, BookOut, ReviewIn
from settings import Settings
from tests.servers import free_port, run

CSV = """\
title,author,year,isbn
Dune,Frank Herbert,1965,0-441-17271-7
  Children of Dune  ,Frank Herbert,1976,
Bad year,Someone,nineteen,
,Nobody,2000,
Same ISBN,Someone,1999,9780441172719
"A title
over two lines",Someone,2001,978-0-14-028329-7
Too,many,1,,fields
Short,row
Checksum,Someone,2002,978-0-14-028329-8
The Last Line,Someone,-44,
"""
CSV_STORED = ["Dune", "Children of Dune", "A title\nover two lines", "The Last Line"]
CSV_REJECTED = {
    4: "year: Input should be a valid integer",
    5: "title: String should have at least 1 character",
    6: "isbn: the same ISBN as line 2",
    9: "more fields than the header has",
    10: "fewer fields than the header has",
    11: "isbn: not a valid ISBN-10 or ISBN-13",
}


async def load(settings: Settings, path: Path, **options) -> tuple[bulk.Outcome, dict[int, str]]:
    """Import `path` as the command does; returns the outcome and the rejected lines."""
    rejected: dict[int, str] = {}
    records = bulk.read_file(path, bulk.file_format(path, None))
    outcome = await bulk.load(settings, records, on_rejected=rejected.__setitem__, **options)
    return outcome, rejected


async def all_books(client: AsyncTestClient) -> list[dict]:
    response = await client.get("/books", params={"size": 100})
    assert response.status_code == 200
    return response.json()["items"]


@pytest.fixture
def books_csv(tmp_path: Path) -> Path:
    path = tmp_path / "books.csv"
    path.write_text(CSV)
    return path


async def test_csv_stores_valid_rows_and_names_each_rejected_line(
    client: AsyncTestClient, settings: Settings, books_csv: Path
):
    assert (await client.get("/books")).json()["total"] == 0  # a cached empty list, if cached
    outcome, rejected = await load(settings, books_csv, batch_size=2)
    assert rejected == CSV_REJECTED
    assert (outcome.stored, outcome.rejected) == (4, 6)
    books = await all_books(client)
    assert [book["title"] for book in books] == CSV_STORED
    assert [book["isbn"] for book in books] == ["9780441172719", None, "9780140283297", None]
    assert (await client.get("/books")).json()["total"] == 4
    stored = await client.get(f"/books/{books[0]['id']}")
    assert stored.status_code == 200 and stored.headers["ETag"]
    assert BookOut.model_validate(stored.json()).created_at.tzinfo is not None


async def test_import_accepts_and_refuses_exactly_what_post_does(
    client: AsyncTestClient, settings: Settings, tmp_path: Path
):
    records = [
        {"title": " Dune ", "author": "Frank Herbert", "year": 1965, "isbn": "0441172717"},
        {"title": "A", "author": "B", "year": "1965"},
        {"title": "A", "author": "B", "year": 1965.0},
        {"title": "A", "author": "B", "year": True},
        {"title": "A", "author": "B", "year": 10000},
        {"title": "A", "author": "B", "year": -9999, "isbn": None},
        {"title": "A", "author": "B", "year": 1, "isbn": ""},
        {"title": "A", "author": "B", "year": 1, "colour": "red"},
        {"title": "A", "author": "B", "year": 1, "id": 7},
        {"title": None, "author": "B", "year": 1},
        {"title": "x" * 301, "author": "B", "year": 1},
        {"title": "x" * 300, "author": "ß" * 200, "year": 1, "isbn": "978-0-14-028329-7"},
        {"author": "B", "year": 1},
        [1, 2],
        "a string",
    ]
    accepted_by_post = []
    for record in records:
        response = await client.post("/books", json=record)
        assert response.status_code in (201, 422), response.text
        if response.status_code == 201:
            accepted_by_post.append(response.json())
            assert (await client.delete(f"/books/{response.json()['id']}")).status_code == 204

    path = tmp_path / "books.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n{not json\n\n")
    outcome, rejected = await load(settings, path)
    imported = await all_books(client)

    fields = ("title", "author", "year", "isbn")
    assert [{k: b[k] for k in fields} for b in imported] == [
        {k: b[k] for k in fields} for b in accepted_by_post
    ]
    assert len(accepted_by_post) == 3
    assert set(rejected) == set(range(1, len(records) + 2)) - {1, 6, 12}
    assert rejected[len(records) + 1].startswith("not JSON")
    assert rejected[14] == "record: Input should be a valid dictionary or instance of BookIn"
    assert outcome.stored == 3


async def test_an_isbn_already_stored_is_reported_and_the_rest_stored(
    client: AsyncTestClient, settings: Settings, book: dict, books_csv: Path
):
    """On PostgreSQL this is the COPY path: the conflict is found by the INSERT itself."""
    outcome, rejected = await load(settings, books_csv)
    assert rejected == {**CSV_REJECTED, 2: "isbn: a book with this ISBN is already stored"}
    assert outcome.stored == 3
    titles = [stored["title"] for stored in await all_books(client)]
    assert titles == ["Dune", *CSV_STORED[1:]]  # the first is the book stored before


async def test_all_or_nothing_stores_nothing_if_a_line_is_rejected(
    client: AsyncTestClient, settings: Settings, books_csv: Path, tmp_path: Path
):
    outcome, rejected = await load(settings, books_csv, all_or_nothing=True, batch_size=2)
    assert rejected == CSV_REJECTED
    assert outcome.stored == 0
    assert await all_books(client) == []
    assert (await client.get("/books")).json()["total"] == 0

    clean = tmp_path / "clean.csv"
    clean.write_text("title,author,year\nOne,A,1\nTwo,B,2\nThree,C,3\n")
    outcome, rejected = await load(settings, clean, all_or_nothing=True, batch_size=2)
    assert (outcome.stored, rejected) == (3, {})
    assert [book["title"] for book in await all_books(client)] == ["One", "Two", "Three"]


async def test_all_or_nothing_rolls_back_when_a_later_batch_conflicts(
    client: AsyncTestClient, settings: Settings, book: dict, tmp_path: Path
):
    path = tmp_path / "books.csv"
    path.write_text("title,author,year,isbn\nOne,A,1,\nTwo,B,2,\nDune,C,3,9780441172719\n")
    outcome, rejected = await load(settings, path, all_or_nothing=True, batch_size=2)
    assert outcome.stored == 0
    assert rejected == {4: "isbn: a book with this ISBN is already stored"}
    assert [stored["title"] for stored in await all_books(client)] == ["Dune"]


async def test_seed_creates_plausible_valid_books(client: AsyncTestClient, settings: Settings):
    rejected: dict[int, str] = {}
    outcome = await bulk.load(
        settings,
        bulk.seed_records(250),
        on_rejected=rejected.__setitem__,
        batch_size=100,
        reviews=True,
    )
    assert (outcome.stored, rejected) == (250, {})
    page = (await client.get("/books", params={"size": 100})).json()
    assert page["total"] == 250
    for item in page["items"]:
        body = {key: item[key] for key in ("title", "author", "year", "isbn")}
        assert BookIn.model_validate(body).model_dump() == body  # valid as the API says
    assert len({item["isbn"] for item in page["items"]}) == 100
    assert len({item["author"] for item in page["items"]}) > 50
    # A few reviews each, valid as the API says, with the figures the books show.
    reviewed = [item for item in page["items"] if item["review_count"]]
    assert 50 < len(reviewed) < 100
    for item in reviewed[:10]:
        listed = (await client.get(f"/books/{item['id']}/reviews")).json()
        ratings = [review["rating"] for review in listed["items"]]
        assert listed["total"] == item["review_count"] == len(ratings)
        assert item["rating"] == round(sum(ratings) / len(ratings), 2)
        for review in listed["items"]:
            fields = {key: review[key] for key in ("reviewer", "rating", "text")}
            assert ReviewIn.model_validate(fields).model_dump() == fields


def test_the_command_reports_lines_and_exits_by_outcome(tmp_path: Path, books_csv: Path):
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"}
    result = run(["app.py", "import", str(books_csv), "--batch-size", "2"], env)
    assert result.returncode == 1, result.stderr
    for line, reason in CSV_REJECTED.items():
        assert f"{books_csv}:{line}: {reason}\n" in result.stderr
    assert "books stored: 4; lines rejected: 6" in result.stderr
    assert "Traceback" not in result.stderr

    clean = tmp_path / "clean.jsonl"
    clean.write_text('{"title": "One", "author": "A", "year": 1}\n')
    result = run(["app.py", "import", str(clean)], env)
    assert (result.returncode, result.stdout) == (0, "")
    assert "books stored: 1; lines rejected: 0" in result.stderr

    for bad in (["--batch-size", "0"], ["--batch-size", "30001"], ["--batch-size", "many"]):
        result = run(["app.py", "import", str(books_csv), *bad], env)
        assert result.returncode == 2 and "--batch-size" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert run(["app.py", "seed", "-1"], env).returncode == 2

    result = run(["app.py", "seed", "30"], env)
    assert result.returncode == 0 and "books stored: 30" in result.stderr

    for args, message in [
        ([str(tmp_path / "missing.csv")], "No such file"),
        ([str(books_csv.with_suffix(".txt"))], "name it .csv or .jsonl"),
    ]:
        result = run(["app.py", "import", *args], env)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    (tmp_path / "wrong.csv").write_text("title,author,year,colour\n")
    result = run(["app.py", "import", str(tmp_path / "wrong.csv")], env)
    assert result.returncode == 2
    assert "unknown column(s): colour; nothing is stored" in result.stderr


def test_a_file_that_breaks_midway_keeps_the_committed_batches(tmp_path: Path):
    path = tmp_path / "books.csv"
    rows = "".join(f"Book {number},Someone,2000\n" for number in range(1, 5001))
    path.write_bytes(b"title,author,year\n" + rows.encode() + b"Bad \xff byte,X,1\n")
    database = tmp_path / "books.db"
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{database}"}
    result = run(["app.py", "import", str(path), "--batch-size", "1000"], env)
    assert result.returncode == 2
    assert "can't decode byte 0xff" in result.stderr
    # Decoding reads ahead, so the error comes some lines before the bad byte.
    done = re.search(r"lines 1-([0-9,]+) are stored", result.stderr)
    assert done, result.stderr
    last_line = int(done[1].replace(",", ""))
    assert last_line > 1000
    with sqlite3.connect(database) as connection:
        stored = connection.execute("SELECT count(*) FROM books").fetchone()[0]
    assert stored == last_line - 1  # every line of a committed batch, after the header

    result = run(
        ["app.py", "import", str(path), "--all-or-nothing"],
        {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"},
    )
    assert result.returncode == 2 and "nothing is stored" in result.stderr


def test_a_database_that_cannot_be_reached_is_one_line_and_exit_2(books_csv: Path):
    closed = f"postgresql+asyncpg://books:secret@127.0.0.1:{free_port()}/books"
    for args in (["import", str(books_csv)], ["seed", "3"]):
        result = run(["app.py", *args], {"DATABASE_URL": closed})
        assert result.returncode == 2, result.stderr
        assert "cannot open the database postgresql+asyncpg://books:***@" in result.stderr
        assert "secret" not in result.stderr and "Traceback" not in result.stderr


async def test_a_csv_year_must_be_written_in_ascii_digits(
    client: AsyncTestClient, settings: Settings, tmp_path: Path
):
    path = tmp_path / "books.csv"
    path.write_text("title,author,year\nOne,A, 1965 \nTwo,B,\u0661\u0669\u0666\u0665\nThree,C,+7\n")
    _, rejected = await load(settings, path)
    assert rejected == {3: "year: Input should be a valid integer"}
    assert [book["year"] for book in await all_books(client)] == [1965, 7]
