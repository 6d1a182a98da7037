"""The API's request and response shapes, validated by Pydantic v2."""

import re
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError
from responder.ext.pagination import Page
from stdnum import ean
from stdnum import isbn as stdnum_isbn
from stdnum.exceptions import ValidationError as IsbnError

# An ISBN as this API stores and returns it: 13 ASCII digits, a 978/979 prefix.
STORED_ISBN = re.compile(r"97[89][0-9]{10}")


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


Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=300),
    AfterValidator(no_nul),
]
Author = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(no_nul),
]
# For query parameters, which Responder checks with a pattern.
NO_NUL = r"^[^\x00]*$"
# strict: a JSON integer only; "1999", 1999.0 and true are all rejected.
Year = Annotated[int, Field(strict=True, ge=-9999, le=9999)]
Isbn = Annotated[str, AfterValidator(normalize_isbn)]


class BookIn(BaseModel):
    """The body of POST and PUT: a whole book (PUT without `isbn` clears it)."""

    model_config = ConfigDict(extra="forbid")

    title: Title
    author: Author
    year: Year
    isbn: Isbn | None = None


class BookPatch(BaseModel):
    """The body of PATCH: any subset of the fields; only `isbn` may be null."""

    model_config = ConfigDict(extra="forbid")

    title: Title | None = None
    author: Author | None = None
    year: Year | None = None
    isbn: Isbn | None = None

    @field_validator("title", "author", "year")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Defaults are not validated, so this only fires on an explicit null.
        if value is None:
            raise PydanticCustomError("not_null", "may be left out, but not null")
        return value


class BookOut(BaseModel):
    """A book as the API returns it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    author: str
    year: int
    isbn: str | None
    created_at: datetime
    updated_at: datetime


class BookPage(Page[BookOut]):
    """A page of books; `page` is null on a page requested by cursor."""

    page: int | None  # type: ignore[assignment]
    next_cursor: str | None
