"""Alembic's async environment: migrations run on the app's own engine settings.

The app also runs them itself on an empty database at startup, passing its own
connection in `config.attributes["connection"]` (see `database.py`).
"""

import asyncio
from logging.config import fileConfig
from typing import Any

from sqlalchemy.engine import Connection

from alembic import context
from database import create_engine
from models import Base
from settings import load_settings

config = context.config
shared_connection: Connection | None = config.attributes.get("connection")
if config.config_file_name is not None and shared_connection is None:
    fileConfig(config.config_file_name)  # the CLI's logging; the app keeps its own

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Write the SQL for `alembic upgrade --sql` without connecting."""
    settings = load_settings()
    context.configure(
        url=settings.database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=settings.is_sqlite,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    dialect = connection.dialect.name

    def on_this_database(item: Any, name: str | None, type_: str, *_: Any) -> bool:
        """Leave out what models.py creates only on another database (`info["only_on"]`)."""
        return bool(getattr(item, "info", {}).get("only_on", dialect) == dialect)

    # Batch mode lets ALTER-style migrations work on SQLite (copy-and-move).
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=dialect == "sqlite",
        include_object=on_this_database,
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
