"""The database tables, as SQLAlchemy 2.x declarative models."""

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Constraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    MetaData,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Named constraints let Alembic create, find and drop them the same way on every
# database (SQLite and PostgreSQL would otherwise invent different names).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL keeps the offset (`timestamptz`); SQLite has no such type and
    hands back naive values, which we know were written as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[datetime]:  # TypeDecorator's own answer is `object`
        return datetime

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utc_now() -> datetime:
    return datetime.now(UTC)


class Book(Base):
    __tablename__ = "books"
    __table_args__ = (
        # `info["conflict"]`: what a client is told when a write breaks it (a 409).
        UniqueConstraint("isbn", info={"conflict": "A book with this ISBN already exists."}),
        # `?q=` is ILIKE '%q%' on PostgreSQL: trigram indexes answer it without a scan.
        *(
            Index(
                f"ix_books_{column}_trgm",
                column,
                postgresql_using="gin",
                postgresql_ops={column: "gin_trgm_ops"},
                info={"only_on": "postgresql"},  # for Alembic's autogenerate (env.py)
            ).ddl_if(dialect="postgresql")
            for column in ("title", "author")
        ),
        # AUTOINCREMENT makes SQLite never hand out the id of a deleted book again
        # (PostgreSQL sequences never do).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    author: Mapped[str] = mapped_column(String(200))
    year: Mapped[int]
    isbn: Mapped[str | None] = mapped_column(String(13))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Bumped by SQLAlchemy on every UPDATE, which also checks it in the WHERE
    # clause: the ETag is built from it, and a lost update becomes impossible.
    version: Mapped[int] = mapped_column()
    # The review figures, kept by each review write in its own transaction (see
    # reviews.py), so that a page of books costs no statement per book.
    review_count: Mapped[int] = mapped_column(default=0, server_default="0")
    rating_sum: Mapped[int] = mapped_column(default=0, server_default="0")

    # lazy="raise": reading `book.reviews` without loading it first is an error at
    # once, not a query issued behind the code's back (under asyncio, the implicit
    # query would fail with MissingGreenlet anyway). passive_deletes: deleting a
    # book leaves its reviews to the database's ON DELETE CASCADE, one statement,
    # instead of loading them to delete one by one.
    reviews: Mapped[list["Review"]] = relationship(
        back_populates="book", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    __mapper_args__ = {"version_id_col": version}

    @property
    def rating(self) -> float | None:
        """The mean rating, rounded half up to 2 decimals; None without reviews."""
        if not self.review_count:
            return None
        mean = Decimal(self.rating_sum) / Decimal(self.review_count)
        return float(mean.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


# The orders a listing of books may be sorted by (besides `id`, the primary key). Each
# has an index per direction, with ties by `id` ascending as the listing breaks them,
# so the first page and every page after a cursor are one index range, however many
# books share a value (a batch of imported books shares its `created_at`).
BOOK_ORDERS = ("title", "author", "year", "created_at", "updated_at")
SORT_ORDER_INDEXES = [
    # (ix_books_year_id below serves ascending years)
    *(Index(f"ix_books_{n}_id", getattr(Book, n), Book.id) for n in BOOK_ORDERS if n != "year"),
    *(Index(f"ix_books_{n}_desc_id", getattr(Book, n).desc(), Book.id) for n in BOOK_ORDERS),
]

# The filters, then `id` (the default order): a page of matches is one index range.
# (`?author=` compares lower() of both sides.) On PostgreSQL they also carry every sort
# field (INCLUDE), so that a filtered listing in any order sorts its matches from the
# index alone, without reading each match's row (see `ListingQuery.rows`).
Index(
    "ix_books_author_lower_id",
    func.lower(Book.author),
    Book.id,
    postgresql_include=list(BOOK_ORDERS),
)
Index(
    "ix_books_year_id",
    Book.year,
    Book.id,
    postgresql_include=[name for name in BOOK_ORDERS if name != "year"],
)


class Review(Base):
    """A reader's review of a book; deleted with its book."""

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint("rating BETWEEN 1 AND 5", name="rating_range"),
        {"sqlite_autoincrement": True},  # a deleted review's id is never handed out again
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    book_id: Mapped[int] = mapped_column(ForeignKey("books.id", ondelete="CASCADE"))
    reviewer: Mapped[str] = mapped_column(String(100))
    rating: Mapped[int]
    text: Mapped[str] = mapped_column(String(5000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column()

    book: Mapped[Book] = relationship(back_populates="reviews", lazy="raise")

    __mapper_args__ = {"version_id_col": version}


# A book's reviews in each order the listing offers (ties by id): one index range each.
# The first also serves the foreign key, for ON DELETE CASCADE.
Index("ix_reviews_book_id_id", Review.book_id, Review.id)
Index("ix_reviews_book_id_rating_id", Review.book_id, Review.rating, Review.id)
Index("ix_reviews_book_id_created_at_id", Review.book_id, Review.created_at, Review.id)


class BookCount(Base):
    """How many books there are, kept by triggers on `books` (see the migration).

    `COUNT(*)` reads every row, which at a million books is slower than the
    rest of a request; the sum of these few rows is exact, and stays exact
    under concurrent writes because the triggers change it in the writing
    transaction. Writers add to a random slot, so they rarely wait on each other.
    """

    __tablename__ = "book_counts"

    slot: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    books: Mapped[int] = mapped_column(BigInteger)


def conflict_detail(constraint: str | None) -> str | None:
    """What a client is told when a write breaks `constraint` (named by the naming
    convention), from the constraint's `info["conflict"]`; None for one without."""
    for table in Base.metadata.tables.values():
        candidates: list[Constraint | Index] = [*table.constraints, *table.indexes]
        for candidate in candidates:
            if candidate.name == constraint:
                return candidate.info.get("conflict")
    return None
