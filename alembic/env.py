"""Alembic's async environment: migrations run on the app's own engine settings.

The app also runs them itself on an empty database at startup, passing its own
connection in `config.attributes["connection"]` (see `database.py`).
"""

import asyncio
from logging.config import fileConfig
from typing import Any, Literal

from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator, TypeEngine

from alembic import context
from database import create_engine
from models import Base
from settings import load_settings

config = context.config
shared_connection: Connection | None = config.attributes.get("connection")
if config.config_file_name is not None and shared_connection is None:
    fileConfig(config.config_file_name)  # the CLI's logging; the app keeps its own

target_metadata = Base.metadata


def render_type(type_: str, item: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """How autogenerate writes a column type into a revision.

    A type of models.py (`UTCDateTime`) is written as the database type it
    stands for (`sa.DateTime(timezone=True)`): a revision must keep working when
    models.py changes later, so it never imports models. Any other type from
    outside SQLAlchemy gets its module imported in the revision.
    """
    if type_ != "type" or not isinstance(item, TypeEngine):
        return False  # Alembic's own rendering
    if isinstance(item, TypeDecorator):
        return f"sa.{item.impl_instance!r}"
    module = type(item).__module__
    if not module.startswith("sqlalchemy"):
        autogen_context.imports.add(f"import {module}")
    return False


def run_migrations_offline() -> None:
    """Write the SQL for `alembic upgrade --sql` without connecting."""
    settings = load_settings()
    context.configure(
        url=settings.database_url,
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    dialect = connection.dialect.name

    def on_this_database(item: Any, name: str | None, type_: str, *_: Any) -> bool:
        """Leave out what models.py creates only on another database (`info["only_on"]`)."""
        return bool(getattr(item, "info", {}).get("only_on", dialect) == dialect)

    # No batch mode, on SQLite either: SQLite ALTERs what autogenerate writes most
    # (tables, columns and indexes added, dropped or renamed) in place, while a batch
    # rebuild of the table would lose its triggers, expression indexes and
    # AUTOINCREMENT. The few changes SQLite can only make by rebuilding (a column's
    # type or nullability, a constraint) fail loudly on SQLite; write those with
    # `database.sqlite_rebuild`, which keeps all of that.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=on_this_database,
        render_item=render_type,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_engine(load_settings())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
elif shared_connection is not None:
    do_run_migrations(shared_connection)
else:
    asyncio.run(run_async_migrations())
