"""The engine, the per-request sessions, and the schema check run at startup."""

import asyncio
import re
import sqlite3
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.operations import BatchOperations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from responder import API
from sqlalchemy import Connection, Index, UniqueConstraint, event, inspect
from sqlalchemy.exc import DBAPIError, IntegrityError, SAWarning
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from alembic import command, op
from models import Base
from settings import Settings

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")

# Any constant the application owns: PostgreSQL advisory lock that serialises
# schema creation when several workers start on an empty database at once.
SCHEMA_LOCK_ID = 0x626F6F6B73  # "books"

# The execution option that asks SQLite for the write lock when a transaction
# begins (BEGIN IMMEDIATE), see `_configure_sqlite`.
SQLITE_WRITE = "sqlite_write"

SQLITE_BUSY_TIMEOUT_MS = 10_000

# Where a SQLite connection's pool entry records that SQLite opened it read-only.
SQLITE_READ_ONLY = "sqlite_read_only"

# SQLite names the columns of a broken UNIQUE constraint, not the constraint.
SQLITE_UNIQUE_FAILED = re.compile(r"UNIQUE constraint failed: (?P<columns>.+)")


class SchemaError(RuntimeError):
    """The database's schema is not the one this code was written for."""


class DatabaseUnavailableError(RuntimeError):
    """The database could not be opened (by the app at startup, or by import/seed);
    the message says where and why."""

    def __init__(self, engine: AsyncEngine, error: Exception) -> None:
        where = engine.url.render_as_string(hide_password=True)
        reason = str(getattr(error, "orig", None) or error) or type(error).__name__
        hint = ""
        if engine.dialect.name == "sqlite":
            hint = " (does its directory exist, and may this process write there and to the file?)"
        elif "unsupported startup parameter" in reason:
            hint = " (behind a transaction-mode pooler? set DATABASE_POOLER=transaction)"
        super().__init__(f"cannot open the database {where}: {reason}{hint}")


# Behind a transaction-mode pooler, consecutive transactions of one client connection
# run on different server connections, so nothing may outlive a transaction: no driver or
# SQLAlchemy statement cache, and unnamed prepared statements (asyncpg's `name=""`),
# which the next statement replaces, instead of named ones left behind on the server
# (`prepared statement "__asyncpg_stmt_1__" already exists / does not exist`).
POOLER_OPTIONS = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: "",
}


def create_engine(settings: Settings) -> AsyncEngine:
    """The engine for `settings.database_url`, with the pool and SQLite tuned for a server."""
    options: dict[str, Any] = {"echo": settings.sql_echo}
    if settings.is_sqlite:
        options["connect_args"] = {"timeout": sqlite_busy_timeout_ms(settings) / 1000}
        # Reset below, only when a transaction is open (see `_configure_sqlite`).
        options["pool_reset_on_return"] = None
        engine = create_async_engine(settings.database_url, **options)
        _configure_sqlite(engine, sqlite_busy_timeout_ms(settings))
        return engine
    pooled = settings.database_pooler == "transaction"
    connect_args: dict[str, Any] = {"timeout": settings.connect_timeout}
    connect_args |= settings.driver_options | (POOLER_OPTIONS if pooled else {})
    timeout_ms = (
        None if settings.request_timeout is None else round(settings.request_timeout * 1000)
    )
    if timeout_ms is not None and not pooled:  # no statement outlives its request
        connect_args["server_settings"] = {"statement_timeout": str(timeout_ms)}
    engine = create_async_engine(
        settings.database_url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_pre_ping=settings.pool_pre_ping,
        connect_args=connect_args,
        **options,
    )
    if timeout_ms is not None and pooled:
        _limit_each_transaction(engine, timeout_ms)
    return engine


def reader(engine: AsyncEngine, settings: Settings) -> AsyncEngine:
    """`engine` as requests that only read use it. On PostgreSQL without a pooler, in
    autocommit: no BEGIN before and no ROLLBACK after, two round trips fewer per read
    (each statement sees its own snapshot, as it would in a READ COMMITTED transaction).
    A transaction-mode pooler needs the transaction to keep a server connection from one
    statement's preparation to its execution."""
    if engine.dialect.name == "postgresql" and settings.database_pooler == "none":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def engine_for(settings: Settings) -> Callable[[str], AsyncEngine]:
    """Engines for other servers (read replicas) with the settings of the primary's."""
    return lambda url: create_engine(settings.model_copy(update={"database_url": url}))


def _limit_each_transaction(engine: AsyncEngine, timeout_ms: int) -> None:
    """`statement_timeout` for every transaction, set inside it: a pooler refuses it as a
    startup parameter (`unsupported startup parameter`), and a session setting would
    stay on a server connection that other clients get next."""

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {timeout_ms}")


def sqlite_busy_timeout_ms(settings: Settings) -> int:
    """How long SQLite waits for the write lock: never longer than a request may take.

    A request abandoned by REQUEST_TIMEOUT cannot interrupt a BEGIN waiting in
    aiosqlite's thread, and its session cannot close until that BEGIN returns.
    """
    if settings.request_timeout is None:
        return SQLITE_BUSY_TIMEOUT_MS
    return min(SQLITE_BUSY_TIMEOUT_MS, round(settings.request_timeout * 1000))


def _configure_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    """A busy timeout, foreign keys, durable commits, and transactions that begin when we say.

    `synchronous=FULL` syncs the WAL at every commit, so a write is on the disk
    before its client is told so. (WAL's usual NORMAL saves that sync, about
    0.3 ms per commit here, but loses the latest commits when the disk or the OS
    fails: in the read-only volume fault test every acknowledged write was gone.)

    The sqlite3 driver would otherwise start transactions lazily at the first
    write, so two requests that read and then write could both hold a read
    snapshot and one would fail with "database is locked" when it upgrades.
    A transaction that will write begins with BEGIN IMMEDIATE instead: writers
    queue on the busy timeout, readers (WAL) are never blocked.
    (This is SQLAlchemy's documented recipe for pysqlite/aiosqlite transactions.)
    Reads send no BEGIN at all: each statement is its own snapshot, as under
    PostgreSQL's READ COMMITTED, and every statement saved is a round trip to
    aiosqlite's thread saved.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        entry.info[SQLITE_READ_ONLY] = _opened_read_only(cursor)
        cursor.close()

    @event.listens_for(engine.sync_engine.pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:
        """Close a read-only connection as soon as its request is done.

        SQLite opens the file read-only, silently, when it is not writable (an
        operator's chmod, a read-only volume), and such a connection stays
        read-only after the file is fixed; while one is open, this process's
        other connections share its read-only view of the WAL index too. So the
        pool keeps none: each request during the fault opens a new connection,
        and the first request after the fix writes again.
        """
        if entry.info.get(SQLITE_READ_ONLY):
            entry.invalidate()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(SQLITE_WRITE, False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(dbapi_connection: Any, _: ConnectionPoolEntry, state: Any) -> None:
        """Roll back a connection returned with its transaction open (a request cut off
        mid-write); the rollback SQLAlchemy makes on every return is otherwise a wasted
        round trip to aiosqlite's thread (a read has no transaction here)."""
        if state.terminate_only or not dbapi_connection.driver_connection.in_transaction:
            return
        dbapi_connection.rollback()


def _opened_read_only(cursor: Any) -> bool:
    """Whether SQLite opened this connection read-only.

    (The driver does not expose sqlite3_db_readonly(); a passive checkpoint never
    waits and is refused on a read-only connection to a WAL database.)
    """
    try:
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except Exception as exc:  # the driver's OperationalError, wrapped by SQLAlchemy's adapter
        if getattr(exc, "sqlite_errorname", None) == "SQLITE_READONLY":
            return True
        raise
    return False


async def _switch_to_wal(engine: AsyncEngine) -> None:
    """Put the SQLite file in WAL mode (readers never wait for the writer).

    WAL belongs to the file, so it is set once, here at startup. The switch
    needs the file to itself for a moment and SQLite refuses rather than waits
    when workers starting together collide, so retry briefly.
    """
    for _ in range(100):
        async with engine.connect() as connection:
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None  # the aiosqlite connection of a live pool entry
            try:
                cursor = await driver.execute("PRAGMA journal_mode=WAL")
                row = await cursor.fetchone()
                if row is not None and row[0] == "wal":
                    return
            except sqlite3.OperationalError:
                pass
        await asyncio.sleep(0.05)
    raise SchemaError("could not switch the SQLite database to WAL mode: is it busy?")


def _alembic_script() -> ScriptDirectory:
    return ScriptDirectory.from_config(Config(ALEMBIC_INI))


def _create_or_check_schema(connection: Connection) -> None:
    """Migrate an empty database to head; refuse one that is not at our head revision."""
    script = _alembic_script()
    context = MigrationContext.configure(connection)
    current = set(context.get_current_heads())
    head = set(script.get_heads())
    if current == head:
        return
    if not current:
        if inspect(connection).has_table("books"):
            raise SchemaError(
                "the database has a books table that Alembic does not know about; "
                "run `uv run alembic stamp head` if it matches models.py"
            )
        # The migrations are the schema's one description: run them here, on
        # this connection, inside the transaction that holds the schema lock.
        config = Config(ALEMBIC_INI)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        return
    known = {revision.revision for revision in script.walk_revisions()}
    if current <= known:
        raise SchemaError(
            f"the database schema is at revision {', '.join(sorted(current))}, older than "
            f"this code ({', '.join(sorted(head))}): run `uv run alembic upgrade head`"
        )
    raise SchemaError(
        f"the database schema is at revision {', '.join(sorted(current))}, "
        "which this code does not know: it is newer than the code"
    )


async def prepare_schema(engine: AsyncEngine) -> None:
    """Run `_create_or_check_schema` under a lock, so that concurrent workers take turns.

    Raises `DatabaseUnavailableError` if the database cannot be reached or opened,
    `SchemaError` if its schema is not this code's.
    """
    try:
        await _prepare_schema(engine)
    except (DBAPIError, OSError) as error:  # refused, timed out, unreadable, read-only
        raise DatabaseUnavailableError(engine, error) from None


async def _prepare_schema(engine: AsyncEngine) -> None:
    if engine.dialect.name == "sqlite":
        await _switch_to_wal(engine)
    async with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection = await connection.execution_options(**{SQLITE_WRITE: True})
        async with connection.begin():
            if engine.dialect.name == "postgresql":
                await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_ID})")
            await connection.run_sync(_create_or_check_schema)


def violated_constraint(error: IntegrityError) -> str | None:
    """The name of the constraint a write broke, if the database says which.

    PostgreSQL names it (asyncpg's `constraint_name`); SQLite names a UNIQUE
    constraint's columns (`books.isbn`), which models.py maps back to its name,
    and a CHECK constraint by name.
    """
    named = getattr(getattr(error.orig, "__cause__", None), "constraint_name", None)
    if named is not None:
        return str(named)
    message = str(error.orig)
    if message.startswith("CHECK constraint failed: "):
        return message.removeprefix("CHECK constraint failed: ")
    if match := SQLITE_UNIQUE_FAILED.fullmatch(message):
        table_name = match["columns"].split(".")[0]
        columns = {column.split(".")[-1] for column in match["columns"].split(", ")}
        table = Base.metadata.tables.get(table_name)
        candidates: list[UniqueConstraint | Index] = []
        if table is not None:
            candidates = [c for c in table.constraints if isinstance(c, UniqueConstraint)]
            candidates += [index for index in table.indexes if index.unique]
        for candidate in candidates:
            if {column.name for column in candidate.columns} == columns:
                return str(candidate.name)
    return None


@contextmanager
def sqlite_rebuild(table: str) -> Iterator[BatchOperations]:
    """`op.batch_alter_table(table)` for a migration step that SQLite can only make by
    rebuilding the table (a column's type or nullability, a constraint), keeping what
    a rebuild would otherwise lose: AUTOINCREMENT and the highest id handed out so far,
    triggers, expression indexes and the order (DESC) of index columns, and the rows
    of other tables that refer to it.
    Other databases alter the table in place.

    (Adding, dropping and renaming columns and indexes need no rebuild: SQLite ALTERs
    those, which is why env.py does not make autogenerate write batch mode. Drop an
    index or trigger you mean to remove before this block, not inside it.)
    """
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        with op.batch_alter_table(table) as batch:
            yield batch
        return
    rows = bind.exec_driver_sql(
        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = ?", (table,)
    ).all()
    autoincrement = "AUTOINCREMENT" in next(sql for kind, _, sql in rows if kind == "table")
    highest = bind.exec_driver_sql(
        "SELECT max(seq) FROM sqlite_sequence WHERE name = ?", (table,)
    ).scalar()
    with _foreign_keys_off(bind, table), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipped unsupported reflection", SAWarning)
        options = {"sqlite_autoincrement": autoincrement}
        with op.batch_alter_table(table, recreate="always", table_kwargs=options) as batch:
            yield batch
    present: dict[str, str] = dict(
        bind.exec_driver_sql("SELECT name, sql FROM sqlite_master").all()
    )
    for kind, name, sql in rows:  # triggers, indexes Alembic skipped or rebuilt otherwise
        if kind != "table" and sql and present.get(name) != sql:
            if name in present:  # reflected without what SQLite cannot report (DESC)
                bind.exec_driver_sql(f'DROP {kind.upper()} "{name}"')
            bind.exec_driver_sql(sql)
    if highest is not None:  # the copy restarted the count at the highest id still stored
        rebuilt = bind.exec_driver_sql(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = ?", (table,)
        ).scalar()
        bind.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
        bind.exec_driver_sql(
            "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, max(highest, rebuilt))
        )


@contextmanager
def _foreign_keys_off(bind: Connection, table: str) -> Iterator[None]:
    """Foreign keys off while `table` is rebuilt: with them on, dropping the old table
    deletes every row that refers to it (ON DELETE CASCADE: every review of every book).

    SQLite ignores the switch inside a transaction (the app's own migrations at
    startup run in one, on an empty database): refuse a table with rows then.
    """
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
    still_on = bind.exec_driver_sql("PRAGMA foreign_keys").scalar()
    if still_on and bind.exec_driver_sql(f'SELECT 1 FROM "{table}" LIMIT 1').first():
        raise SchemaError(
            f"rebuilding {table} needs foreign keys off: run it outside a transaction"
        )
    try:
        yield
    finally:
        bind.exec_driver_sql("PRAGMA foreign_keys=ON")
    if broken := bind.exec_driver_sql("PRAGMA foreign_key_check").all():
        raise SchemaError(f"rebuilding {table} left rows that refer to nothing: {broken[:5]}")


@asynccontextmanager
async def write_transaction(state: Any) -> AsyncIterator[AsyncSession]:
    """A session in a write transaction (`state` is `api.state`), committed at the end."""
    async with state.write_lock or nullcontext(), state.async_write_session.begin() as session:
        yield session


@asynccontextmanager
async def open_database(api: API) -> AsyncIterator[None]:
    """Open the engine for this process's event loop, check the schema, dispose at exit.

    The settings come from `api.state.settings` (set in app.py, replaced by tests).
    """
    engine = create_engine(api.state.settings)
    try:
        await prepare_schema(engine)
        api.state.engine = engine
        api.state.async_session = async_sessionmaker(reader(engine, api.state.settings))
        # Same pool; on SQLite its transactions take the write lock up front.
        api.state.async_write_session = async_sessionmaker(
            engine.execution_options(**{SQLITE_WRITE: True}), expire_on_commit=False
        )
        # SQLite has one writer at a time: this process's writers queue here, in
        # order, rather than polling the file lock with the busy timeout's sleeps.
        api.state.write_lock = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        yield
    finally:
        await engine.dispose()
