from urllib.parse import parse_qs, urlsplit

import pytest

from tracker.macros import CLICK_MACROS, TemplateError, check_url, compile_template, fill


@pytest.mark.parametrize("url", [
    "https://shop.example/lp?cid={click_id}&src={pub}",
    "http://shop.example:8080/{sub1}/x#frag={sub2}",
    "https://shop.example",
])
def test_accepts_absolute_http_urls_with_known_macros(url: str) -> None:
    check_url(url, CLICK_MACROS)


@pytest.mark.parametrize("url, why", [
    ("javascript:alert(1)", "absolute"),
    ("data:text/html,<script>alert(1)</script>", "absolute"),
    ("/relative/path?x=1", "absolute"),
    ("//shop.example/lp", "absolute"),
    ("ftp://shop.example/file", "absolute"),
    ("https://{sub1}.example/lp", "host"),
    ("https://shop.example{sub1}/lp", "host"),
    ("{pub}://shop.example/", "absolute"),
    ("https://shop.example/lp?x={nope}", "unknown macro"),
    ("https://shop.example/lp?x={click_id", "unbalanced"),
    ("https://shop.example/ lp", "spaces"),
    ("https://user:pw@shop.example/", "credentials"),
    ("https:///nohost", "host"),
    ("https://shop.example/über?x={sub1}", "ASCII"),
    ("https://bücher.example/", "ASCII"),
])
def test_refuses_what_could_redirect_elsewhere_or_break(url: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why):
        check_url(url, CLICK_MACROS)


def test_every_value_is_url_encoded_and_round_trips() -> None:
    template = compile_template("https://shop.example/lp?a={sub1}&b={sub2}&c={pub}#x")
    nasty = {"sub1": "a&b=c#d e", "sub2": "çağrı 東京 ✓", "pub": "x?y/z%"}
    url = fill(template, nasty)
    parts = urlsplit(url)
    assert parts.netloc == "shop.example" and parts.fragment == "x"
    assert parse_qs(parts.query) == {"a": [nasty["sub1"]], "b": [nasty["sub2"]], "c": [nasty["pub"]]}
    assert " " not in url and "#d" not in url


def test_missing_values_fill_empty() -> None:
    assert fill(compile_template("https://s.example/?a={sub1}&b={sub2}"), {"sub1": "x"}) == \
        "https://s.example/?a=x&b="
