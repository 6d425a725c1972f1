"""A click URL's query, read the cheap way when nothing in it needs decoding, gives what the
general reading gives: the same values, the same refusals naming the same parameter."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tracker.errors import ApiError
from tracker.fastpath import _query
from tracker.ingest.params import TRACKING_PARAMS, _read_each, read_params
from tracker.macros import compile_template, fill

NAMES = st.sampled_from([*TRACKING_PARAMS, "other", "x", ""])
# Mostly plain values, some that every rule has a say on: long, control characters, U+FFFD,
# non-ASCII, and URL syntax.
VALUES = st.one_of(
    st.text(alphabet="abcXYZ019-_.~", max_size=8),
    st.text(max_size=8),
    st.sampled_from(["", "x" * 256, "a\x01b", "\ufffd", "çağrı", "a=b", "a&b", "a+b", "%41"]),
)


def general(raw: bytes) -> dict[str, str]:
    """What the query was before: parse_qsl, the first value of each name."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True,
                                 errors="replace"):
        params.setdefault(name, value)
    return params


@given(st.lists(st.tuples(NAMES, VALUES), max_size=6), st.booleans())
@example([("sub1", "a"), ("sub1", "b"), ("pub", "")], False)
@example([("sub1", "a b")], True)
def test_the_query_reads_as_parse_qsl_reads_it(pairs: list[tuple[str, str]], encode: bool) -> None:
    if encode:
        raw = "&".join(f"{quote(n)}={quote(v)}" for n, v in pairs)
    else:  # as sent by hand: raw syntax characters, bare names, empty fields
        raw = "&".join(n if v == "" and n == "x" else f"{n}={v}" for n, v in pairs) + "&&"
    data = raw.encode("utf-8", "surrogatepass")
    assert _query(data) == general(data)


def outcome(query: dict[str, str], read: object) -> object:
    try:
        return read(query)  # type: ignore[operator]
    except ApiError as exc:
        return (exc.status, exc.code, exc.field)


@given(st.dictionaries(NAMES, VALUES, max_size=8))
@example({"sub1": "x" * 256, "pub": "\x01"})
@example({"pub": "\x01", "sub1": "x" * 256})
@example({"gclid": "x" * 256, "sub2": "ok"})
@example({"pub": "a\x01b"})
@example({"gclid": "a\x7f", "sub1": "ok"})
def test_params_read_in_one_pass_as_rule_by_rule(query: dict[str, str]) -> None:
    assert outcome(query, read_params) == outcome(query, _read_each)


def test_a_repeated_name_from_aiohttp_is_its_first_value() -> None:
    from multidict import MultiDict, MultiDictProxy

    query = MultiDictProxy(MultiDict([("sub1", ""), ("sub1", "late"), ("pub", "a"), ("pub", "b")]))
    assert read_params(query) == {"pub": "a"}


@given(st.text(max_size=12))
@example("AZaz09")
@example("²")
def test_macros_encode_every_value_as_quote_does(value: str) -> None:
    template = compile_template("https://s.example/?a={sub1}")
    assert fill(template, {"sub1": value}) == "https://s.example/?a=" + quote(value, safe="")


@pytest.mark.parametrize("header, expected", [
    ("Mozilla/5.0 (X11)", "Mozilla/5.0 (X11)"),
    ("bad\x00agent\x7f\ttab", "badagenttab"),
    ("çağrı ✓", "çağrı ✓"),
])
def test_user_agents_are_stored_without_control_characters(header: str, expected: str) -> None:
    from tracker.ingest.visitor import UserAgents

    assert UserAgents().facts(header)[0] == expected
    assert UserAgents().facts("x" * 600 + "\x01")[0] == "x" * 512
