"""The tracking parameters a click or pixel URL may carry, checked once."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import bad_request

# The ad platforms' own click ids, kept so that conversions can be sent back to them.
AD_CLICK_IDS = ("gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid")
TRACKING_PARAMS = (
    "pub", "sub1", "sub2", "sub3", "sub4", "sub5", "ext_click_id",
    "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "customer_id",
) + AD_CLICK_IDS
MAX_VALUE = 255  # gclid and fbclid run to ~100-200 characters


def _keepable(value: str) -> bool:
    return len(value) <= MAX_VALUE and value.isascii() and value.isprintable()


KNOWN = frozenset(TRACKING_PARAMS)


def read_params(query: Mapping[str, str]) -> dict[str, str]:
    """Known parameters only (ad networks append their own; those are ignored). A value that
    is too long, not UTF-8, or holds control characters is refused by name."""
    # The common case, in one pass over what the URL carries (a few parameters, not the 19
    # known names): every known value is printable ASCII of an allowed length, which every
    # rule below accepts as it is. (A dict holds one value a name, the first, as the fast path
    # parses it; aiohttp's multidict may hold repeats, and get() is the first.)
    if type(query) is not dict:
        return _read_each(query)
    params: dict[str, str] = {}
    for name, value in query.items():
        if value and name in KNOWN:
            if len(value) > MAX_VALUE or not value.isascii() or not value.isprintable():
                return _read_each(query)
            params[name] = value
    return params


def _read_each(query: Mapping[str, str]) -> dict[str, str]:
    """read_params with each rule applied, name by name in TRACKING_PARAMS' order (the first
    name at fault is the one refused)."""
    params: dict[str, str] = {}
    for name in TRACKING_PARAMS:
        value = query.get(name)
        if not value:
            continue
        if name in AD_CLICK_IDS and not _keepable(value):
            # The ad platform wrote it, not the operator: the visitor still gets the page,
            # and the click is kept without an id we could not send back intact anyway.
            continue
        if len(value) > MAX_VALUE:
            raise bad_request("value_too_long", f"{name} must be at most {MAX_VALUE} characters",
                              name)
        # aiohttp decodes bytes that are not UTF-8 as U+FFFD.
        if "\ufffd" in value:
            raise bad_request("invalid_encoding", f"{name} is not valid UTF-8", name)
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise bad_request("invalid_value", f"{name} must not hold control characters", name)
        params[name] = value
    return params
