"""How a listing filters, sorts and pages: by number (OFFSET) or by cursor (keyset).

A resource declares its listing once, as a `Listing`: the model, the fields it
sorts by and its filters. Everything else is derived from that declaration: the
route's query parameters (and so the OpenAPI document), the SQL, the cache keys
and the cursors.
"""

import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from responder import Problem, Query
from sqlalchemy import CTE, ColumnElement, Select, and_, false, func, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from models import Base

MAX_OFFSET = 2**62  # more rows than any table holds, and within a 64-bit OFFSET
# Filters that keep at most 1 row in this many are selective (see `ListingQuery.selective`):
# walking a sort index then reads on average up to this many rows per row of the page.
SELECTIVE = 20


@dataclass(frozen=True)
class Filter:
    """One way to narrow a listing: `?name=value` keeps the rows `matches(value)`."""

    kind: type  # the value's type, which Responder checks (a 422 otherwise)
    # The `Query(None, ...)` marker: constraints and description of the parameter.
    # None for a filter the route sets itself (the book whose reviews are listed).
    query: Any
    matches: Callable[[Any], ColumnElement[bool]]
    blank_is_unset: bool = False  # `?q=` (empty) is no filter at all


@dataclass(frozen=True)
class Listing:
    """What a resource's listing offers: its rows, sort fields and filters."""

    name: str  # tells its cache keys from other listings'
    model: type[Base]
    sortable: tuple[str, ...]
    filters: Mapping[str, Filter]
    # A count kept without a scan, for these filters, if there is one (else COUNT(*)).
    maintained_count: Callable[[Mapping[str, Any]], Select[Any] | None] = lambda filters: None
    # How many rows there are without filters, if that is cheap to know (for `selective`).
    population: Callable[[], Select[Any]] | None = None
    # The filters of cursors made before cursors were versioned (see `ListingQuery._decode`).
    first_cursor_filters: tuple[str, ...] = ()

    @property
    def sort_pattern(self) -> str:
        """`sort` as the client writes it (`-year,title`); Responder checks it (422)."""
        one = f"-?({'|'.join(self.sortable)})"
        return f"^{one}(,{one})*$"

    def parameters(self) -> dict[str, tuple[Any, Any]]:
        """The query parameters of the listing's route (paging, sort, and the filters a
        client sets), as `web.query_parameters` takes them."""
        sortable = ", ".join(self.sortable)
        return {
            "page": (int, Query(1, ge=1, description="1-based page number")),
            "size": (int, Query(20, ge=1, le=100, description="items per page")),
            "sort": (
                str,
                Query(
                    "id",
                    pattern=self.sort_pattern,
                    description=f"comma-separated, `-` for descending: {sortable}",
                ),
            ),
            "cursor": (str | None, Query(None, description="`next_cursor` of the previous page")),
        } | {
            name: (item.kind | None, item.query)
            for name, item in self.filters.items()
            if item.query is not None
        }

    def query(self, sort: str, values: Mapping[str, Any]) -> "ListingQuery":
        """The listing `sort` and the filter `values` ask for (unset ones left out)."""
        used = {
            name: value
            for name, value in values.items()
            if value is not None and not (self.filters[name].blank_is_unset and value == "")
        }
        return ListingQuery(self, sort, used)


@dataclass(frozen=True)
class ListingQuery:
    """One listing as a client asked for it: a sort order and the filters in use."""

    listing: Listing
    sort: str
    filters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def order(self) -> list[tuple[str, bool]]:
        """(field, descending) pairs, first mention wins, always ending in `id`."""
        order: dict[str, bool] = {}
        for name in self.sort.split(","):
            order.setdefault(name.removeprefix("-"), name.startswith("-"))
        order.setdefault("id", False)
        return list(order.items())

    def where(self) -> list[ColumnElement[bool]]:
        return [self.listing.filters[name].matches(value) for name, value in self.filters.items()]

    def count(self) -> Select[Any]:
        """How many rows match: the maintained count where there is one, else COUNT(*)."""
        maintained = self.listing.maintained_count(self.filters)
        if maintained is not None:
            return maintained
        return select(func.count()).select_from(self.listing.model).where(*self.where())

    async def counted(self, session: AsyncSession, total: int | None) -> tuple[int, bool]:
        """The number of matches (`total`, if the cache knew it) and whether the filters
        keep few enough rows, at most 1 in SELECTIVE of the listing's population, that
        the page is best found among the matches.

        Unknown, the total is counted here only when the filters are not selective
        (none, or `read` found more matches than that): walking the index of the
        sort order and skipping non-matches then finds a page after a few rows each.
        Left to the planner, that choice goes wrong at scale: asked for an author
        with no books, sorted by year, it walked the whole year index (the LIMIT trap).
        """
        if total is None:
            return await session.scalar(self.count()) or 0, False
        population = self.listing.population
        if not self.filters or population is None:
            return total, False
        rows = await session.scalar(population()) or 0
        return total, total * SELECTIVE <= rows

    def rows(
        self,
        *,
        backwards: bool = False,
        selective: bool = False,
        after: list[Any] | None = None,
        skip: int = 0,
        limit: int | None = None,
    ) -> Select[Any]:
        """The matching rows in this query's order (or exactly the reverse), from the
        position `after` on, `skip` of them skipped, at most `limit`.

        `selective`: the matches are gathered first, as their ids and sort fields
        (from the filters' own indexes, which include the sort fields), the page is
        taken from them, and only its rows are read; whatever the planner would prefer.
        """
        model = self.listing.model
        if not selective:
            statement = select(model).where(*self.where())
            return self._page(statement, model, backwards, after, skip, limit)
        matches = self._matches()
        page = self._page(select(matches), matches.c, backwards, after, skip, limit).subquery()
        joined = select(model).join(page, model.__table__.c.id == page.c.id)
        return joined.order_by(*self._ordering(page.c, backwards))

    def among_few(
        self, few: ColumnElement[int], *, after: list[Any] | None, skip: int, limit: int
    ) -> Select[Any]:
        """One statement for a page of matches, if there are fewer than `few`: a row
        per book of the page (a single row with no book when the page is empty), each
        with `found`, the matches counted up to `few`, and `complete`, whether that
        is all of them. When it is not, neither the page nor the count is the right
        one (both come from the first `few` matches only).
        """
        model = self.listing.model
        matches = self._matches(limit=few)
        counted = func.count()
        found = (
            select(counted.label("found"), (counted < few).label("complete"))
            .select_from(matches)
            .subquery("found")
        )
        page = self._page(select(matches), matches.c, False, after, skip, limit).subquery("page")
        return (
            select(found.c.found, found.c.complete, model)
            .select_from(found)
            .outerjoin(page, true())
            .outerjoin(model, model.__table__.c.id == page.c.id)
            .order_by(*self._ordering(page.c, False))
        )

    def _matches(self, limit: ColumnElement[int] | None = None) -> CTE:
        """The matching rows' ids and sort fields, gathered once (at most `limit`)."""
        model = self.listing.model
        keys = [getattr(model, name) for name, _ in self.order]
        statement = select(*keys).where(*self.where()).limit(limit)
        # MATERIALIZED: a CTE used once is otherwise folded into the query again.
        return statement.cte("matches").prefix_with("MATERIALIZED")

    def _page(
        self,
        statement: Select[Any],
        source: Any,
        backwards: bool,
        after: list[Any] | None,
        skip: int,
        limit: int | None,
    ) -> Select[Any]:
        """`statement` over `source` (the model, or columns of the same names) in this
        query's order, from `after` on, `skip` rows skipped, at most `limit`."""
        statement = statement.order_by(*self._ordering(source, backwards))
        if after is not None:
            statement = statement.where(self._beyond(source, after))
        if skip:
            statement = statement.offset(skip)
        return statement.limit(limit)

    def _ordering(self, source: Any, backwards: bool) -> list[ColumnElement[Any]]:
        return [
            getattr(source, name).desc() if desc != backwards else getattr(source, name).asc()
            for name, desc in self.order
        ]

    async def read(
        self,
        session: AsyncSession,
        *,
        page: int,
        size: int,
        after: list[Any] | None,
        total: int | None,
    ) -> tuple[list[Any], int]:
        """A page's rows, plus the one after it (to tell whether more follow), and the total.

        `after` is a decoded cursor (`position`); `total` the count when the cache
        knows it. Filters that keep few rows are answered by one statement, their
        page and their count together (`among_few`): the filters' indexes are read
        once, which for `?q=` is most of the request. Otherwise the count comes first
        (maintained, or from the filters' indexes) and decides how the page is found
        (`counted`): no match, no page query.
        """
        population = self.listing.population
        if total is None and self.filters and population is not None:
            answered = await self._read_among_few(session, population(), page, size, after)
            if answered is not None:
                return answered
        total, selective = await self.counted(session, total)
        if total == 0:
            return [], 0
        if after is not None:
            rows = self.rows(selective=selective, after=after, limit=size + 1)
            return list(await session.scalars(rows)), total
        rows, backwards = self.numbered_page(page, size, total, selective)
        found = list(await session.scalars(rows))
        return found[::-1] if backwards else found, total

    async def _read_among_few(
        self,
        session: AsyncSession,
        population: Select[Any],
        page: int,
        size: int,
        after: list[Any] | None,
    ) -> tuple[list[Any], int] | None:
        """The page and the total from one statement, if the filters keep at most 1 row
        in SELECTIVE of the `population`; None if they keep more."""
        few = population.scalar_subquery() // SELECTIVE + 1
        skip = 0 if after is not None else offset(page, size)
        statement = self.among_few(few, after=after, skip=skip, limit=size + 1)
        rows = (await session.execute(statement)).all()
        if not rows[0].complete:
            return None
        return [row[-1] for row in rows if row[-1] is not None], rows[0].found

    def numbered_page(
        self, page: int, size: int, total: int, selective: bool
    ) -> tuple[Select[Any], bool]:
        """Page `page`'s rows plus the one after it, and whether they come in reverse.

        OFFSET walks every row it skips, so a page past the middle is read
        backwards from the end: no page skips more than half of the rows.
        """
        skipped = offset(page, size)
        if skipped <= total // 2:
            return self.rows(selective=selective, skip=skipped, limit=size + 1), False
        following = total - skipped - size  # rows after this page
        if following > 0:
            return self.rows(
                backwards=True, selective=selective, skip=following - 1, limit=size + 1
            ), True
        return self.rows(backwards=True, selective=selective, limit=max(size + following, 0)), True

    def position(self, cursor: str) -> list[Any]:
        """The position a cursor marks: the values of its row's sort fields (or a 400)."""
        return self._decode(cursor)

    def _beyond(self, source: Any, values: list[Any]) -> ColumnElement[bool]:
        """Rows strictly after `values`, in this query's order.

        The first sort field's own bound leads (`year <= 1976` for `-year`), so that
        the database reads its index from the cursor on instead of filtering every row.
        """
        alternatives = []
        for index, (name, descending) in enumerate(self.order):
            column = getattr(source, name)
            ties = [getattr(source, n) == values[i] for i, (n, _) in enumerate(self.order[:index])]
            beyond = column < values[index] if descending else column > values[index]
            alternatives.append(and_(*ties, beyond))
        first, descending = getattr(source, self.order[0][0]), self.order[0][1]
        bound = first <= values[0] if descending else first >= values[0]
        return and_(bound, or_(false(), *alternatives))

    def cursor_after(self, row: Any) -> str:
        """The opaque cursor for the page that follows `row`."""
        values = [_json_value(getattr(row, name)) for name, _ in self.order]
        raw = orjson.dumps({"v": values, "f": self._fingerprint()})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def page_key(self, size: int, page: int | None, cursor: str | None) -> str:
        """The cache key of one page: the same listing, however its parameters were written."""
        position = f"page={page}" if cursor is None else f"cursor={cursor}"
        return f"{self.listing.name}:page:{self._fingerprint()}:size={size}:{position}"

    def total_key(self) -> str:
        """The cache key of the count, shared by every sort order and page of these filters."""
        return f"{self.listing.name}:total:{_digest(sorted(self.filters.items()))}"

    def _fingerprint(self) -> str:
        """Ties a cursor to the sort and the filters in use it was made under (so a
        filter added to the listing later leaves the cursors that do not use it valid)."""
        return _digest([self.order, sorted(self.filters.items())])

    def _first_fingerprint(self) -> str | None:
        """The fingerprint of a cursor made before cursors were versioned: it listed
        the listing's filters of the time by position, unset ones as null."""
        first = self.listing.first_cursor_filters
        if not first or not set(self.filters) <= set(first):
            return None
        return _digest([self.order, *(self.filters.get(name) for name in first)])

    def _decode(self, cursor: str) -> list[Any]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            data = orjson.loads(raw)
            made_for = data["f"] if "f" in data else data["q"]
            expected = self._fingerprint() if "f" in data else self._first_fingerprint()
            if made_for != expected or len(data["v"]) != len(self.order):
                raise ValueError("cursor made for another listing")
            return [
                self._typed_value(name, value)
                for (name, _), value in zip(self.order, data["v"], strict=True)
            ]
        except (binascii.Error, ValueError, TypeError, KeyError, orjson.JSONDecodeError):
            raise Problem(
                400,
                "The cursor is not valid for this listing: "
                "send it back with the same sort and filters.",
                title="Invalid Cursor",
            ) from None

    def _typed_value(self, name: str, value: Any) -> Any:
        """A cursor value checked against its column's type, so that a forged cursor is
        a 400, not a 500."""
        kind = self.listing.model.__table__.c[name].type.python_type
        if kind is datetime:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                raise ValueError(f"{name} needs a UTC offset")
            return moment
        if kind is int:
            if type(value) is not int or not -(2**31) <= value < 2**31:
                raise ValueError(f"{name} must be a 32-bit integer")
            return value
        if not isinstance(value, kind):
            raise ValueError(f"{name} must be a {kind.__name__}")
        return value


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
