"""The API's request and response shapes, validated by Pydantic v2."""

import re
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError
from responder.ext.pagination import Page
from stdnum import ean
from stdnum import isbn as stdnum_isbn
from stdnum.exceptions import ValidationError as IsbnError

Value = TypeVar("Value")

# An ISBN as this API stores and returns it: 13 ASCII digits, a 978/979 prefix.
STORED_ISBN = re.compile(r"^97[89][0-9]{10}$")


def normalize_isbn(value: str) -> str:
    """An ISBN-10 or ISBN-13 (hyphens and spaces allowed) as its 13 digits.

    An ISBN already in the stored form needs only its check digit verified,
    which is what the general path would do too, at a fifteenth of the cost
    (it matters when an import validates a million of them).
    """
    if STORED_ISBN.fullmatch(value) and ean.calc_check_digit(value[:12]) == value[12]:
        return value
    try:
        return stdnum_isbn.to_isbn13(stdnum_isbn.validate(value))
    except IsbnError:
        # A PydanticCustomError (not a ValueError) keeps Responder's 422 serialisable.
        raise PydanticCustomError("isbn", "not a valid ISBN-10 or ISBN-13") from None


def no_nul(value: str) -> str:
    """PostgreSQL's text cannot hold U+0000: refuse it here (a 422), not at the database."""
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "may not contain the NUL character (U+0000)")
    return value


TITLE_LENGTH, AUTHOR_LENGTH = 300, 200  # characters, after trimming
Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TITLE_LENGTH),
    AfterValidator(no_nul),
]
Author = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=AUTHOR_LENGTH),
    AfterValidator(no_nul),
]
# For query parameters, which Responder checks with a pattern.
NO_NUL = r"^[^\x00]*$"
# strict: a JSON integer only; "1999", 1999.0 and true are all rejected.
Year = Annotated[int, Field(strict=True, ge=-9999, le=9999)]
# Documented with the pattern of what it takes (10 or 13 digits, an ISBN-10 may end in X,
# hyphens and spaces anywhere); the check digit is verified too. Stored and returned as
# its 13 digits (STORED_ISBN).
Isbn = Annotated[
    str,
    AfterValidator(normalize_isbn),
    Field(
        json_schema_extra={
            "pattern": r"^[ -]*(?:[0-9][ -]*){9}(?:[0-9Xx]|(?:[0-9][ -]*){3}[0-9])[ -]*$",
            "description": "an ISBN-10 or ISBN-13, check digit verified",
        }
    ),
]


class BookIn(BaseModel):
    """The body of POST and PUT: a whole book (PUT without `isbn` clears it)."""

    model_config = ConfigDict(extra="forbid")

    title: Title
    author: Author
    year: Year
    isbn: Isbn | None = None


def not_null(value: Value | None) -> Value:
    """Defaults are not validated, so this only refuses an explicit null."""
    if value is None:
        raise PydanticCustomError("not_null", "may be left out, but not null")
    return value


def not_nullable(schema: dict[str, Any]) -> None:
    """Document an omittable field as its own type: null is refused, not a value (nor
    its default: left out, the field is not changed)."""
    (kind,) = [choice for choice in schema.pop("anyOf") if choice.get("type") != "null"]
    schema.update(kind)
    schema.pop("default", None)


# A PATCH field that may be left out but not sent as null (nor documented as nullable).
Omittable = Annotated[Value | None, AfterValidator(not_null), Field(json_schema_extra=not_nullable)]


class BookPatch(BaseModel):
    """The body of PATCH: any subset of the fields; only `isbn` may be null."""

    model_config = ConfigDict(extra="forbid")

    title: Omittable[Title] = None
    author: Omittable[Author] = None
    year: Omittable[Year] = None
    isbn: Isbn | None = None


class BookOut(BaseModel):
    """A book as the API returns it, with its review figures."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    author: str
    year: int
    isbn: str | None = Field(json_schema_extra={"pattern": STORED_ISBN.pattern})
    created_at: datetime
    updated_at: datetime
    review_count: int = Field(ge=0)
    rating: float | None = Field(ge=1, le=5, description="the mean rating, 2 decimals; null: none")


Reviewer = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(no_nul),
]
Rating = Annotated[int, Field(strict=True, ge=1, le=5)]  # strict: a JSON integer only
ReviewText = Annotated[str, StringConstraints(max_length=5000), AfterValidator(no_nul)]


class ReviewIn(BaseModel):
    """The body of POST /books/{book_id}/reviews."""

    model_config = ConfigDict(extra="forbid")

    reviewer: Reviewer
    rating: Rating
    text: ReviewText = ""


class ReviewPatch(BaseModel):
    """The body of PATCH: any subset of the fields; none may be null."""

    model_config = ConfigDict(extra="forbid")

    reviewer: Omittable[Reviewer] = None
    rating: Omittable[Rating] = None
    text: Omittable[ReviewText] = None


class ReviewOut(BaseModel):
    """A review as the API returns it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    book_id: int
    reviewer: str
    rating: int
    text: str
    created_at: datetime
    updated_at: datetime


Item = TypeVar("Item", bound=BaseModel)


class CursorPage(Page[Item], Generic[Item]):
    """A page of a listing; `page` is null on a page requested by cursor."""

    page: int | None  # type: ignore[assignment]
    next_cursor: str | None


class BookPage(CursorPage[BookOut]):
    """A page of books."""


class ReviewPage(CursorPage[ReviewOut]):
    """A page of a book's reviews."""
