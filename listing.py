"""How `GET /books` filters, sorts and pages: by number (OFFSET) or by cursor (keyset)."""

import base64
import binascii
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from responder import Problem
from sqlalchemy import ColumnElement, Select, and_, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from models import Book, BookCount

TIMESTAMPS = ("created_at", "updated_at")
SORTABLE = ("id", "title", "author", "year", *TIMESTAMPS)
MAX_OFFSET = 2**62  # more rows than any table holds, and within a 64-bit OFFSET
_FIELD = f"-?({'|'.join(SORTABLE)})"
# `sort` as the client writes it: `-year,title`. Validated by the Query marker (422).
SORT_PATTERN = f"^{_FIELD}(,{_FIELD})*$"


@dataclass(frozen=True)
class BookQuery:
    """The filters and sort order of one listing, as the client asked for them."""

    sort: str
    author: str | None = None
    year: int | None = None
    q: str | None = None

    @property
    def order(self) -> list[tuple[str, bool]]:
        """(field, descending) pairs, first mention wins, always ending in `id`."""
        order: dict[str, bool] = {}
        for field in self.sort.split(","):
            order.setdefault(field.removeprefix("-"), field.startswith("-"))
        order.setdefault("id", False)
        return list(order.items())

    def where(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.author is not None:
            conditions.append(func.lower(Book.author) == func.lower(self.author))
        if self.year is not None:
            conditions.append(Book.year == self.year)
        if self.q:
            # autoescape: %, _ and the escape character itself match literally.
            conditions.append(
                or_(
                    Book.title.icontains(self.q, autoescape=True),
                    Book.author.icontains(self.q, autoescape=True),
                )
            )
        return conditions

    def count(self) -> Select[int]:
        """How many books match; without filters, the count the triggers keep (no scan)."""
        conditions = self.where()
        if not conditions:
            return select(func.coalesce(func.sum(BookCount.books), 0))
        return select(func.count()).select_from(Book).where(*conditions)

    def rows(self, *, backwards: bool = False) -> Select[Book]:
        """The matching books in this query's order (or exactly the reverse)."""
        ordering = [
            getattr(Book, field).desc() if desc != backwards else getattr(Book, field).asc()
            for field, desc in self.order
        ]
        return select(Book).where(*self.where()).order_by(*ordering)

    async def read(
        self,
        session: AsyncSession,
        *,
        page: int,
        size: int,
        after: ColumnElement[bool] | None,
        total: int | None,
    ) -> tuple[list[Book], int]:
        """A page's books, plus the one after it (to tell whether more follow), and the total.

        `after` is a decoded cursor; `total` the count when the cache knows it.
        - By cursor: the rows after it, in this query's order.
        - Searched (`q`), by number: one statement, with the count of all matches
          beside each row (`count(*) OVER ()`). The search runs once, and the
          planner reads the matches through the trigram indexes instead of walking
          the table in `id` order hoping to meet a rare match soon.
        - Otherwise, by number: the count (maintained, or from the filter's index)
          and `numbered_page`.
        """
        if after is not None:
            if total is None:
                total = await session.scalar(self.count()) or 0
            return list(await session.scalars(self.rows().where(after).limit(size + 1))), total
        if self.q:
            counted = self.rows().add_columns(func.count().over())
            result = (
                await session.execute(counted.offset(offset(page, size)).limit(size + 1))
            ).all()
            if not result:  # past the last page: count the matches on their own
                return [], await session.scalar(self.count()) or 0
            return [book for book, _ in result], result[0][1]
        if total is None:
            total = await session.scalar(self.count()) or 0
        rows, backwards = self.numbered_page(page, size, total)
        books = list(await session.scalars(rows))
        return books[::-1] if backwards else books, total

    def numbered_page(self, page: int, size: int, total: int) -> tuple[Select[Book], bool]:
        """Page `page`'s books plus the one after it, and whether they come in reverse.

        OFFSET walks every row it skips, so a page past the middle is read
        backwards from the end: no page skips more than half of the rows.
        """
        skipped = offset(page, size)
        if skipped <= total // 2:
            return self.rows().offset(skipped).limit(size + 1), False
        following = total - skipped - size  # books after this page
        if following > 0:
            return self.rows(backwards=True).offset(following - 1).limit(size + 1), True
        return self.rows(backwards=True).limit(max(size + following, 0)), True

    def after(self, cursor: str) -> ColumnElement[bool]:
        """Rows strictly after the position `cursor` marks, in this query's order."""
        values = self._decode(cursor)
        alternatives = []
        for index, (field, descending) in enumerate(self.order):
            column = getattr(Book, field)
            ties = [getattr(Book, f) == values[i] for i, (f, _) in enumerate(self.order[:index])]
            beyond = column < values[index] if descending else column > values[index]
            alternatives.append(and_(*ties, beyond))
        return or_(false(), *alternatives)

    def cursor_after(self, book: Book) -> str:
        """The opaque cursor for the page that follows `book`."""
        values = [_json_value(getattr(book, field)) for field, _ in self.order]
        raw = orjson.dumps({"v": values, "q": self._fingerprint()})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def page_key(self, size: int, page: int | None, cursor: str | None) -> str:
        """The cache key of one page: the same listing, however its parameters were written."""
        position = f"page={page}" if cursor is None else f"cursor={cursor}"
        return f"page:{self._fingerprint()}:size={size}:{position}"

    def total_key(self) -> str:
        """The cache key of the count, shared by every sort order and page of these filters."""
        return f"total:{_digest(self._filters())}"

    def _fingerprint(self) -> str:
        """Ties a cursor to the sort and filters it was made under."""
        return _digest([self.order, *self._filters()])

    def _filters(self) -> list[Any]:
        return [self.author, self.year, self.q or None]

    def _decode(self, cursor: str) -> list[Any]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            data = orjson.loads(raw)
            if data["q"] != self._fingerprint() or len(data["v"]) != len(self.order):
                raise ValueError("cursor made for another listing")
            return [
                _typed_value(field, value)
                for (field, _), value in zip(self.order, data["v"], strict=True)
            ]
        except (binascii.Error, ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            raise Problem(
                400,
                "The cursor is not valid for this listing: "
                "send it back with the same sort and filters.",
                title="Invalid Cursor",
            ) from None


def offset(page: int, size: int) -> int:
    """The rows before page `page`: past the end is fine, past what a database's
    64-bit OFFSET can say is the same as past the end (found by schemathesis:
    `?q=x&page=10**30` was an OverflowError, a 500)."""
    return min((page - 1) * size, MAX_OFFSET)


def _digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value."""
    return hashlib.sha256(orjson.dumps(value)).hexdigest()[:16]


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _typed_value(field: str, value: Any) -> Any:
    """A cursor value checked for its field's type, so a forged cursor is a 400, not a 500."""
    if field in TIMESTAMPS:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError(f"{field} needs a UTC offset")
        return moment
    if field in ("id", "year"):
        if type(value) is not int or not -(2**31) <= value < 2**31:
            raise ValueError(f"{field} must be a 32-bit integer")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    return value
