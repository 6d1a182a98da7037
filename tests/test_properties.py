"""Property-based tests (Hypothesis) of the parsers that hostile input reaches first:
the ISBN normaliser, the `sort` grammar, and cursors."""

import re
from datetime import UTC, datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError
from responder import Problem
from stdnum import ean
from stdnum import isbn as stdnum_isbn

from books import BOOKS
from models import Book
from schemas import normalize_isbn


@st.composite
def isbn13(draw: st.DrawFn) -> str:
    body = draw(st.sampled_from(["978", "979"])) + draw(
        st.text("0123456789", min_size=9, max_size=9)
    )
    return body + ean.calc_check_digit(body)


@st.composite
def isbn10(draw: st.DrawFn) -> str:
    body = "978" + draw(st.text("0123456789", min_size=9, max_size=9))
    number = stdnum_isbn.to_isbn10(body + ean.calc_check_digit(body))
    return number.lower() if draw(st.booleans()) else number


@st.composite
def written_as_people_do(draw: st.DrawFn, number: str) -> str:
    """`number` with hyphens or spaces between some of its characters."""
    parts = [number[0]]
    for character in number[1:]:
        parts.append(draw(st.sampled_from(["", "", "-", " "])) + character)
    return "".join(parts)


@given(isbn13())
def test_a_stored_isbn_is_kept_as_it_is(number: str):
    assert normalize_isbn(number) == number


@given(
    st.one_of(isbn13(), isbn10()).flatmap(lambda n: st.tuples(st.just(n), written_as_people_do(n)))
)
def test_hyphens_spaces_and_isbn10_normalise_to_the_same_13_digits(pair: tuple[str, str]):
    number, written = pair
    expected = stdnum_isbn.to_isbn13(number.upper())
    assert normalize_isbn(written) == expected
    assert re.fullmatch(r"97[89][0-9]{10}", expected)


@given(isbn13(), st.integers(0, 12), st.integers(1, 9))
def test_one_wrong_digit_is_always_refused(number: str, position: int, change: int):
    wrong = str((int(number[position]) + change) % 10)
    mistyped = number[:position] + wrong + number[position + 1 :]
    with pytest.raises(PydanticCustomError):
        normalize_isbn(mistyped)


@given(st.text(max_size=30))
@example("٩٧٨٠٤٤١١٧٢٧١٩")  # Arabic-Indic digits: not an ISBN
@example("9780441172719\n")
@settings(max_examples=500)
def test_any_text_is_an_isbn_or_a_clean_refusal(text: str):
    """The fast path and python-stdnum agree, and nothing but a 422-shaped error escapes."""
    try:
        normalised = normalize_isbn(text)
    except PydanticCustomError:
        assert not stdnum_isbn.is_valid(text)
        return
    assert stdnum_isbn.is_valid(text)
    assert normalised == stdnum_isbn.to_isbn13(stdnum_isbn.compact(text))


sort_terms = st.lists(
    st.tuples(st.sampled_from(BOOKS.sortable), st.booleans()), min_size=1, max_size=8
)


@given(sort_terms)
def test_every_sort_in_the_grammar_orders_by_first_mentions_then_id(terms):
    sort = ",".join(("-" if descending else "") + field for field, descending in terms)
    assert re.fullmatch(BOOKS.sort_pattern, sort)
    order = BOOKS.query(sort, {}).order
    first_mentions: dict[str, bool] = {}
    for field, descending in terms:
        first_mentions.setdefault(field, descending)
    first_mentions.setdefault("id", False)
    assert order == list(first_mentions.items())
    assert [field for field, _ in order].count("id") == 1


@given(st.text(max_size=40))
@example("title,")
@example("-")
@example("year,,id")
@example("Title")
@example("title ")
def test_the_sort_grammar_takes_exactly_comma_separated_known_fields(sort: str):
    tokens = sort.split(",")
    well_formed = all(token.removeprefix("-") in BOOKS.sortable for token in tokens)
    assert bool(re.fullmatch(BOOKS.sort_pattern, sort)) == well_formed


@given(st.sampled_from(BOOKS.sortable), st.text(max_size=60))
@settings(max_examples=300)
def test_a_cursor_that_does_not_decode_is_a_400(field: str, cursor: str):
    query = BOOKS.query(field, {})
    try:
        query.position(cursor)
    except Problem as problem:
        assert problem.status_code == 400


@given(
    st.sampled_from(BOOKS.sortable),
    st.integers(1, 2**31 - 1),
    st.text(min_size=1, max_size=20),
    st.integers(-9999, 9999),
    st.datetimes(
        timezones=st.just(UTC), min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1)
    ),
)
def test_a_cursor_made_by_a_listing_is_read_back_by_it(field, book_id, text, year, moment):
    book = Book(
        id=book_id, title=text, author=text, year=year, created_at=moment, updated_at=moment
    )
    query = BOOKS.query(f"-{field}", {})
    cursor = query.cursor_after(book)
    assert query._decode(cursor) == [getattr(book, name) for name, _ in query.order]
    with pytest.raises(Problem):
        BOOKS.query(field, {"q": "other"})._decode(cursor)  # another listing's cursor
