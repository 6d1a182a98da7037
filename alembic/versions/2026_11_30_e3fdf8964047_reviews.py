"""reviews, and each book's review figures

Revision ID: e3fdf8964047
Revises: 8e1f2a6b9c40
Create Date: 2026-11-30 20:27:16.521947

Written by autogenerate, as the README shows. A review belongs to a book and goes
with it (ON DELETE CASCADE: one statement, whatever the number of reviews). The
book keeps how many reviews it has and the sum of their ratings, changed by each
review write in its own transaction, so a page of books needs no statement per book.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e3fdf8964047"
down_revision: str | Sequence[str] | None = "8e1f2a6b9c40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("book_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(length=100), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=False),
        sa.Column("text", sa.String(length=5000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint("rating BETWEEN 1 AND 5", name=op.f("ck_reviews_rating_range")),
        sa.ForeignKeyConstraint(
            ["book_id"], ["books.id"], name=op.f("fk_reviews_book_id_books"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_reviews_book_id_created_at_id", "reviews", ["book_id", "created_at", "id"])
    op.create_index("ix_reviews_book_id_id", "reviews", ["book_id", "id"])
    op.create_index("ix_reviews_book_id_rating_id", "reviews", ["book_id", "rating", "id"])
    op.add_column(
        "books", sa.Column("review_count", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column("books", sa.Column("rating_sum", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("books", "rating_sum")
    op.drop_column("books", "review_count")
    op.drop_index("ix_reviews_book_id_rating_id", table_name="reviews")
    op.drop_index("ix_reviews_book_id_id", table_name="reviews")
    op.drop_index("ix_reviews_book_id_created_at_id", table_name="reviews")
    op.drop_table("reviews")
