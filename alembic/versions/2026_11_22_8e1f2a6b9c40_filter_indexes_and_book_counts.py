"""indexes for the listing filters, and a book count kept by triggers

Revision ID: 8e1f2a6b9c40
Revises: 5d5c317c8dbf
Create Date: 2026-11-22 06:05:00.000000

At a million books an exact `COUNT(*)` costs more than the rest of a request;
`book_counts` holds the same number, changed by triggers in each writing
transaction (PostgreSQL: per statement, into one of 16 slots chosen at random,
so concurrent writers rarely wait on each other; SQLite: one writer anyway).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8e1f2a6b9c40"
down_revision: str | Sequence[str] | None = "5d5c317c8dbf"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLOTS = 16

POSTGRESQL_TRIGGERS = [
    f"""
    CREATE FUNCTION count_books() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        chosen integer := floor(random() * {SLOTS});
    BEGIN
        IF TG_OP = 'INSERT' THEN
            UPDATE book_counts SET books = books + (SELECT count(*) FROM changed)
            WHERE slot = chosen;
        ELSIF TG_OP = 'DELETE' THEN
            UPDATE book_counts SET books = books - (SELECT count(*) FROM changed)
            WHERE slot = chosen;
        ELSE
            UPDATE book_counts SET books = 0;
        END IF;
        RETURN NULL;
    END
    $$
    """,
    "CREATE TRIGGER count_inserted_books AFTER INSERT ON books REFERENCING NEW TABLE AS changed"
    " FOR EACH STATEMENT EXECUTE FUNCTION count_books()",
    "CREATE TRIGGER count_deleted_books AFTER DELETE ON books REFERENCING OLD TABLE AS changed"
    " FOR EACH STATEMENT EXECUTE FUNCTION count_books()",
    "CREATE TRIGGER count_truncated_books AFTER TRUNCATE ON books"
    " FOR EACH STATEMENT EXECUTE FUNCTION count_books()",
]
SQLITE_TRIGGERS = [
    "CREATE TRIGGER count_inserted_books AFTER INSERT ON books"
    " BEGIN UPDATE book_counts SET books = books + 1 WHERE slot = 0; END",
    "CREATE TRIGGER count_deleted_books AFTER DELETE ON books"
    " BEGIN UPDATE book_counts SET books = books - 1 WHERE slot = 0; END",
]


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    # Filter, then `id` (the default order): a page of matches is an index range.
    op.create_index("ix_books_year_id", "books", ["year", "id"])
    op.create_index("ix_books_author_lower_id", "books", [sa.text("lower(author)"), "id"])
    if postgresql:
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        for column in ("title", "author"):
            op.create_index(
                f"ix_books_{column}_trgm",
                "books",
                [column],
                postgresql_using="gin",
                postgresql_ops={column: "gin_trgm_ops"},
            )
    counts = op.create_table(
        "book_counts",
        sa.Column("slot", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("books", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("slot", name=op.f("pk_book_counts")),
    )
    op.bulk_insert(counts, [{"slot": slot, "books": 0} for slot in range(SLOTS)])
    op.execute("UPDATE book_counts SET books = (SELECT count(*) FROM books) WHERE slot = 0")
    for statement in POSTGRESQL_TRIGGERS if postgresql else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for trigger in ("count_inserted_books", "count_deleted_books", "count_truncated_books"):
        if postgresql:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON books")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    if postgresql:
        op.execute("DROP FUNCTION count_books()")
    op.drop_table("book_counts")
    if postgresql:
        op.drop_index("ix_books_author_trgm", table_name="books")
        op.drop_index("ix_books_title_trgm", table_name="books")
    op.drop_index("ix_books_author_lower_id", table_name="books")
    op.drop_index("ix_books_year_id", table_name="books")
