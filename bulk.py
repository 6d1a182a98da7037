"""Many books at once: `uv run app.py import FILE` and `uv run app.py seed N`.

Every record of a file passes the API's own validation (`BookIn`), so an import
stores nothing that `POST /books` would refuse; a record that fails is reported
with its line number and skipped. Valid books are written in batches, each its
own transaction (a failure keeps the batches before it), or all in one
transaction that is rolled back if any line was rejected (`--all-or-nothing`).

On PostgreSQL each batch is copied (COPY) into a temporary table of its own
transaction and moved into
`books` by one `INSERT … SELECT … ON CONFLICT DO NOTHING`, which also tells us
which ISBNs were already stored, even if the API stored them a moment ago. On
SQLite the batch holds the write lock, so checking the ISBNs first is exact.
"""

import asyncio
import csv
import json
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateTable
from stdnum import ean
from tqdm import tqdm

from cache import BookCache, open_cache
from database import (
    SQLITE_WRITE,
    DatabaseUnavailableError,
    SchemaError,
    create_engine,
    prepare_schema,
)
from models import Book, Review, UTCDateTime, utc_now
from schemas import BookIn
from settings import Settings

BATCH_SIZE = 10_000
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# A book's fields, in order: the columns a file may have, each in `books` too.
FIELDS = list(BookIn.model_fields)
REQUIRED_FIELDS = {name for name, info in BookIn.model_fields.items() if info.is_required()}
# CSV has only text: these become integers when they hold a whole number.
INTEGER_FIELDS = {name for name, info in BookIn.model_fields.items() if info.annotation is int}
WHOLE_NUMBER = re.compile(r"\s*[+-]?[0-9]+\s*")  # ASCII digits, as a JSON integer has
MAX_BATCH_SIZE = 30_000  # SQLite's ISBN check binds one variable per book (limit 32,766)

# Where a PostgreSQL batch lands first (COPY cannot skip rows that conflict): a table of
# the batch's own transaction (ON COMMIT DROP), so that nothing outlives it on a server
# connection that a transaction-mode pooler hands to another client next.
INCOMING = Table(
    "incoming_books",
    MetaData(),
    Column("line", Integer),
    *(Column(name, Book.__table__.c[name].type) for name in FIELDS),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)

# A record: its line number, and the book it holds or why it holds none.
Record = tuple[int, BookIn | str]
# Stores a batch of books in the transaction open on the connection; the lines refused.
Store = Callable[[AsyncConnection, list[tuple[int, BookIn]], datetime], Awaitable[list[int]]]


# What stops a load part-way on the database's side (each batch stored stays stored).
DATABASE_FAILURES = (DBAPIError, DatabaseUnavailableError, SchemaError)


class FileError(ValueError):
    """The file as a whole cannot be read as books (not one line of it)."""


@dataclass
class Outcome:
    """What a load did so far (also after an interruption)."""

    stored: int = 0
    rejected: int = 0
    cache_told: bool = True  # the shared cache heard of every change (or there is none)


# --- Reading ------------------------------------------------------------------


def file_format(path: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise FileError(f"{path}: name it .csv or .jsonl, or say --format csv|jsonl") from None


def count_lines(path: Path) -> int:
    """Lines in the file (for the progress bar's total and ETA), read as bytes: fast."""
    with path.open("rb") as stream:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))


def csv_records(stream: TextIO) -> Iterator[tuple[int, object]]:
    """Each CSV row with the line it starts on, as the fields a JSON body would have.

    CSV has only text: a whole number in an integer field (`year`) becomes an
    integer (any other text stays text and fails as it would in the API), and an
    empty optional field (`isbn`) means none.
    """
    reader = csv.DictReader(stream)
    header = set(reader.fieldnames or ())
    if unknown := header - set(FIELDS):
        raise FileError(f"unknown column(s): {', '.join(sorted(unknown))}")
    if missing := REQUIRED_FIELDS - header:
        raise FileError(f"missing column(s): {', '.join(sorted(missing))}")
    start = reader.line_num + 1
    for row in reader:
        if None in row:
            yield start, "more fields than the header has"
        elif None in row.values():
            yield start, "fewer fields than the header has"
        else:
            yield start, typed(row)
        start = reader.line_num + 1


def typed(row: dict[str, str]) -> dict[str, object]:
    """A CSV row's text as the values a JSON body would have."""
    fields: dict[str, object] = dict(row)
    for name, value in row.items():
        if name in INTEGER_FIELDS and WHOLE_NUMBER.fullmatch(value):
            fields[name] = int(value)
        elif name not in REQUIRED_FIELDS and not value.strip():
            fields[name] = None
    return fields


def jsonl_records(stream: TextIO) -> Iterator[tuple[int, object]]:
    """Each non-blank line of a JSON Lines file: a JSON object like `POST /books` takes."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"not JSON ({exc.msg})"


def validated(records: Iterable[tuple[int, object]]) -> Iterator[Record]:
    """Each record as a `BookIn`, or the API's 422 reasons as one line."""
    for line, fields in records:
        if isinstance(fields, str):
            yield line, fields
            continue
        try:
            yield line, BookIn.model_validate(fields)
        except ValidationError as exc:
            yield (
                line,
                "; ".join(
                    f"{'.'.join(str(part) for part in error['loc']) or 'record'}: {error['msg']}"
                    for error in exc.errors(include_input=False)
                ),
            )


def read_file(path: Path, fmt: str) -> Iterator[Record]:
    """The records of a CSV (header line required) or JSON Lines file, validated."""
    with path.open(encoding="utf-8-sig", newline="") as stream:
        records = csv_records(stream) if fmt == "csv" else jsonl_records(stream)
        yield from validated(records)


# --- Seeding ------------------------------------------------------------------

# Plausible names and titles, so that searches meet the mix of common and rare
# words (and trigrams) a real catalogue has: 500 authors, 1,600 titles.
FIRST_NAMES = """Ada Alan Anna Boris Clara Dmitri Edith Farah Grace Hugo Ines Jonas Kemal Lena
    Mateo Nadia Omar Priya Quentin Rosa Sami Tomas Ursula Vera Yusuf""".split()
LAST_NAMES = """Okafor Lindqvist Moreau Tanaka Haddad Novak Brennan Castillo Ivanova Mensah
    Kowalski Duarte Nakamura Fischer Osei Petrov Quigley Rahman Sato Varga""".split()
AUTHORS = [f"{first} {last}" for last in LAST_NAMES for first in FIRST_NAMES]
ADJECTIVES = """Silent Hidden Burning Frozen Golden Hollow Last Lost Midnight Painted Quiet
    Restless Scarlet Shattered Silver Sleeping Stolen Sunken Wandering Whispering Wild
    Winter Broken Crimson Distant Drowned Endless Fallen Forgotten Gentle Glass Iron
    Lonely Northern Paper Secret Seventh Shadowed Velvet Wicked""".split()
NOUNS = """River Garden Kingdom Orchard Lighthouse Library Harbor Forest Mirror Empire
    Archive Bridge Cathedral Compass Desert Engine Festival Frontier Island Journey
    Labyrinth Lantern Machine Meadow Mountain Ocean Palace Prophecy Question Railway
    Sea Signal Sky Storm Summer Tide Tower Valley Voyage Witness""".split()
ISBN_NUMBERS = 10**9  # the 978- ISBN-13s: 978 + 9 digits + a check digit


def plausible_book(number: int) -> dict[str, Any]:
    """Book `number` of an endless plausible catalogue (distinct numbers, distinct ISBNs)."""
    digits = f"978{number % ISBN_NUMBERS:09d}"
    return {
        "title": f"The {ADJECTIVES[number % 40]} {NOUNS[number // 40 % 40]}",
        "author": AUTHORS[number % len(AUTHORS)],
        "year": 1800 + number % 226,
        "isbn": digits + ean.calc_check_digit(digits),
    }


REVIEW_TEXTS = [
    "",
    "Could not put it down.",
    "Slow to start, worth it by the end.",
    "The middle drags; the ending does not.",
    "I have read it three times.",
    "Not for me.",
]


def plausible_reviews(book_id: int, number: int, now: datetime) -> list[dict[str, Any]]:
    """Book `number`'s reviews: none to three, mostly good, by plausible readers."""
    return [
        {
            "book_id": book_id,
            "reviewer": f"{FIRST_NAMES[(number + k) % 25]} {LAST_NAMES[(number * 7 + k) % 20][0]}.",
            "rating": (3, 4, 5, 5, 4, 2, 5, 1)[(number + 3 * k) % 8],
            "text": REVIEW_TEXTS[(number + k) % len(REVIEW_TEXTS)],
            "created_at": now,
            "updated_at": now,
            "version": 1,
        }
        for k in range(number % 4)
    ]


def seed_records(count: int) -> Iterator[Record]:
    """`count` plausible books from a random place in the catalogue, numbered from 1.

    Generated books are valid by construction, so they skip validation; the
    random start makes a second seed unlikely to repeat the first one's ISBNs.
    """
    start = secrets.randbelow(ISBN_NUMBERS)
    for number in range(count):
        yield number + 1, BookIn.model_construct(**plausible_book(start + number))


# --- Writing ------------------------------------------------------------------


async def _store_postgresql(
    connection: AsyncConnection, batch: list[tuple[int, BookIn]], now: datetime
) -> list[int]:
    """COPY the batch in, move what does not conflict into `books`; the lines that did."""
    # (Already there when --all-or-nothing keeps one transaction open for every batch.)
    await connection.execute(CreateTable(INCOMING, if_not_exists=True))
    await connection.execute(text(f"TRUNCATE {INCOMING.name}"))
    raw = await connection.get_raw_connection()
    await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
        INCOMING.name,
        records=[(line, *(getattr(book, name) for name in FIELDS)) for line, book in batch],
        columns=[column.name for column in INCOMING.columns],
    )
    moved = (
        postgresql_insert(Book)
        .from_select(
            [*FIELDS, "created_at", "updated_at", "version"],
            select(
                *(INCOMING.c[name] for name in FIELDS),
                literal(now, UTCDateTime),
                literal(now, UTCDateTime),
                literal(1),
            ).order_by(INCOMING.c.line),
        )
        .on_conflict_do_nothing(index_elements=[Book.isbn])
        .returning(Book.isbn)
        .cte("moved")
    )
    conflicts = select(INCOMING.c.line).where(
        INCOMING.c.isbn.is_not(None), ~exists().where(moved.c.isbn == INCOMING.c.isbn)
    )
    return list((await connection.execute(conflicts)).scalars())


async def _store_sqlite(
    connection: AsyncConnection, batch: list[tuple[int, BookIn]], now: datetime
) -> list[int]:
    """Insert the batch but for the ISBNs already stored (exact: we hold the write lock)."""
    isbns = [book.isbn for _, book in batch if book.isbn is not None]
    stored = set(
        (await connection.execute(select(Book.isbn).where(Book.isbn.in_(isbns)))).scalars()
    )
    rows = [
        book.model_dump() | {"created_at": now, "updated_at": now, "version": 1}
        for _, book in batch
        if book.isbn not in stored
    ]
    if rows:
        await connection.execute(insert(Book), rows)
    return [line for line, book in batch if book.isbn in stored]


def _reviewed(store: Store) -> Store:
    """`store`, and then a few plausible reviews for each book it stored."""

    async def storing(
        connection: AsyncConnection, batch: list[tuple[int, BookIn]], now: datetime
    ) -> list[int]:
        conflicts = await store(connection, batch, now)
        lines = {book.isbn: line for line, book in batch}
        stored = await connection.execute(
            select(Book.id, Book.isbn).where(Book.isbn.in_(list(lines)))
        )
        ids = {book_id: lines[isbn] for book_id, isbn in stored if isbn is not None}
        rows = [
            review for book_id in ids for review in plausible_reviews(book_id, ids[book_id], now)
        ]
        if rows:
            await connection.execute(insert(Review), rows)
            await connection.execute(
                update(Book)
                .where(Book.id.in_(list(ids)))
                .values(
                    review_count=select(func.count())
                    .where(Review.book_id == Book.id)
                    .scalar_subquery(),
                    rating_sum=select(func.coalesce(func.sum(Review.rating), 0))
                    .where(Review.book_id == Book.id)
                    .scalar_subquery(),
                )
            )
        return conflicts

    return storing


def _first_of_each_isbn(
    records: Iterable[Record], reject: Callable[[int, str], None]
) -> Iterator[tuple[int, BookIn]]:
    """The valid books, but for a second book with an ISBN seen earlier in the same file."""
    isbn_lines: dict[str, int] = {}
    for line, book in records:
        if isinstance(book, str):
            reject(line, book)
        elif book.isbn is not None and book.isbn in isbn_lines:
            reject(line, f"isbn: the same ISBN as line {isbn_lines[book.isbn]}")
        else:
            if book.isbn is not None:
                isbn_lines[book.isbn] = line
            yield line, book


async def load(
    settings: Settings,
    records: Iterable[Record],
    *,
    all_or_nothing: bool = False,
    batch_size: int = BATCH_SIZE,
    on_rejected: Callable[[int, str], None],
    on_batch: Callable[[int], None] = lambda line: None,
    reviews: bool = False,
) -> Outcome:
    """Store the valid books of `records`; `on_rejected(line, reason)` hears of the others.

    `on_batch(line)` is called after each batch with the last line it covered.
    With `all_or_nothing`, nothing is stored if any record was rejected. With
    `reviews`, each book gets a few plausible reviews too (`seed`).
    """
    outcome = Outcome()

    def reject(line: int, reason: str) -> None:
        outcome.rejected += 1
        on_rejected(line, reason)

    engine = create_engine(settings)
    store: Store = _store_postgresql if engine.dialect.name == "postgresql" else _store_sqlite
    if reviews:
        store = _reviewed(store)
    try:
        await prepare_schema(engine)  # an empty database gets the schema, as the app does
        async with engine.connect() as connection, open_cache(settings) as cache:
            if engine.dialect.name == "sqlite":
                connection = await connection.execution_options(**{SQLITE_WRITE: True})
            books = _first_of_each_isbn(records, reject)
            if not all_or_nothing:
                await _write(connection, books, batch_size, outcome, reject, on_batch, cache, store)
            else:
                async with connection.begin() as transaction:
                    await _write(
                        connection, books, batch_size, outcome, reject, on_batch, cache, store
                    )
                    if outcome.rejected:
                        await transaction.rollback()
                        outcome.stored = 0
                await cache.invalidate()
            outcome.cache_told = not cache.owes_invalidations
            return outcome
    finally:
        await engine.dispose()


def _batches(books: Iterable[tuple[int, BookIn]], size: int) -> Iterator[list[tuple[int, BookIn]]]:
    iterator = iter(books)
    while batch := list(islice(iterator, size)):
        yield batch


async def _write(
    connection: AsyncConnection,
    books: Iterable[tuple[int, BookIn]],
    batch_size: int,
    outcome: Outcome,
    reject: Callable[[int, str], None],
    on_batch: Callable[[int], None],
    cache: BookCache,
    store: Store,
) -> None:
    """Store `books` batch by batch, each batch committed unless a transaction is open.

    The next batch is read and validated in a thread while the database stores
    this one: the file's parsing and the database's work overlap.
    """
    now = utc_now()

    async def commit(batch: list[tuple[int, BookIn]]) -> list[int]:
        if connection.in_transaction():
            return await store(connection, batch, now)
        async with connection.begin():
            conflicts = await store(connection, batch, now)
        await cache.invalidate()  # lists and totals, on every instance sharing the cache
        return conflicts

    batches = _batches(books, batch_size)
    batch = await asyncio.to_thread(next, batches, None)
    while batch:
        storing = asyncio.create_task(commit(batch))
        try:
            following = await asyncio.to_thread(next, batches, None)
        finally:  # a batch being stored is finished and counted, even if reading failed
            conflicts = await storing
            for line in conflicts:
                reject(line, "isbn: a book with this ISBN is already stored")
            outcome.stored += len(batch) - len(conflicts)
            on_batch(batch[-1][0])
        batch = following


# --- The commands -------------------------------------------------------------


class Progress:
    """A progress bar (rate and ETA) on stderr, and rejected lines printed above it.

    The bar stands at the last line of the last batch written, so after an
    interruption it says how far the file was stored.
    """

    def __init__(self, source: str, total: int, unit: str) -> None:
        self.source = source
        self.line = 0  # the last line of the last batch written
        # disable=None: no bar when stderr is not a terminal (logs, CI), only the lines.
        self.bar = tqdm(
            total=total,
            unit=unit,
            unit_scale=True,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None,
        )

    def rejected(self, line: int, reason: str) -> None:
        self.bar.write(f"{self.source}:{line}: {reason}", file=sys.stderr)

    def reached(self, line: int) -> None:
        self.bar.update(line - self.line)
        self.line = line

    def close(self, line: int | None = None) -> None:
        if line is not None:
            self.reached(line)
        self.bar.close()


def import_file(
    settings: Settings,
    path: Path,
    *,
    fmt: str | None = None,
    all_or_nothing: bool = False,
    batch_size: int = BATCH_SIZE,
) -> int:
    """`uv run app.py import FILE`; returns the exit status: 0 all stored, 1 lines rejected."""
    try:
        records = read_file(path, file_format(path, fmt))
        count = count_lines(path)
        progress = Progress(str(path), count, unit=" lines")
    except (FileError, OSError) as exc:
        return _failed(str(exc))
    started = time.monotonic()
    try:
        outcome = asyncio.run(
            load(
                settings,
                records,
                all_or_nothing=all_or_nothing,
                batch_size=batch_size,
                on_rejected=progress.rejected,
                on_batch=progress.reached,
            )
        )
    except (FileError, UnicodeDecodeError, KeyboardInterrupt, *DATABASE_FAILURES) as exc:
        done = f"lines 1-{progress.line:,} are stored"
        if all_or_nothing or not progress.line:
            done = "nothing is stored"
        progress.close()
        return _failed(f"{_reason(exc, path)}; {done}")
    progress.close(count)
    seconds = time.monotonic() - started
    if all_or_nothing and outcome.rejected:
        print(f"{outcome.rejected:,} lines rejected: nothing stored", file=sys.stderr)
    else:
        print(
            f"books stored: {outcome.stored:,}; lines rejected: {outcome.rejected:,}; "
            f"{seconds:.1f} s ({outcome.stored / max(seconds, 0.001):,.0f} books/s)",
            file=sys.stderr,
        )
    _warn_if_cache_stale(outcome, settings)
    return 1 if outcome.rejected else 0


def seed(settings: Settings, count: int) -> int:
    """`uv run app.py seed N`: N plausible books to try the API with."""
    progress = Progress("seed", count, unit=" books")
    try:
        outcome = asyncio.run(
            load(
                settings,
                seed_records(count),
                on_rejected=progress.rejected,
                on_batch=progress.reached,
                reviews=True,
            )
        )
    except (KeyboardInterrupt, *DATABASE_FAILURES) as exc:
        progress.close()
        return _failed(f"{_reason(exc)}; {progress.line:,} books stored")
    progress.close()
    print(f"books stored: {outcome.stored:,}", file=sys.stderr)
    _warn_if_cache_stale(outcome, settings)
    return 1 if outcome.rejected else 0


def _warn_if_cache_stale(outcome: Outcome, settings: Settings) -> None:
    if not outcome.cache_told:
        print(
            "warning: the shared cache (REDIS_URL) could not be told of the new books; "
            f"lists may miss them for up to {settings.cache_ttl_seconds} s",
            file=sys.stderr,
        )


def _reason(error: BaseException, path: Path | None = None) -> str:
    """What went wrong, in one line (a database error without its SQL)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, DBAPIError):
        return f"database error: {error.orig}"
    if isinstance(error, DatabaseUnavailableError | SchemaError):
        return str(error)
    return f"{path}: {error}"


def _failed(message: str) -> int:
    print(message, file=sys.stderr)
    return 2
