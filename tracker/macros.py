"""URL templates with `{macro}` placeholders: checked once when a campaign is saved,
compiled once when it is loaded, filled per click with every value URL-encoded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

CLICK_MACROS = frozenset(
    ["click_id", "campaign", "pub", "sub1", "sub2", "sub3", "sub4", "sub5", "ext_click_id",
     "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content"]
)
POSTBACK_MACROS = frozenset(
    ["ext_click_id", "click_id", "payout", "event", "txid", "status", "currency",
     "conversion_id", "campaign", "pub", "sub1", "sub2", "sub3", "sub4", "sub5",
     "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "customer_id",
     "gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid"]
)

_MACRO = re.compile(r"\{([^{}]*)\}")
# A placeholder that cannot occur in a real URL, to see where macros sit in a template.
_SENTINEL = "macro0placeholder"

# A compiled template: literal text and macro names, alternating (literal first).
Template = tuple[str, ...]


class TemplateError(ValueError):
    pass


def check_url(template: str, allowed: frozenset[str]) -> None:
    """Raise TemplateError unless `template` is an absolute http(s) URL whose macros are all
    known and sit only in its path, query or fragment (never scheme or host: a request must
    not choose where the browser goes)."""
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in template):
        raise TemplateError("must not contain spaces or control characters")
    if not template.isascii():
        raise TemplateError("must be ASCII: percent-encode other characters (punycode for hosts)")
    if len(template) > 4096:
        raise TemplateError("must be at most 4096 characters")
    for name in _MACRO.findall(template):
        if name not in allowed:
            raise TemplateError(
                f"unknown macro {{{name}}}; known: " + ", ".join(sorted(allowed)))
    bare = _MACRO.sub(_SENTINEL, template)
    if "{" in bare or "}" in bare:
        raise TemplateError("has an unbalanced { or }")
    try:
        parts = urlsplit(bare)
    except ValueError as exc:
        raise TemplateError(f"is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise TemplateError("must be an absolute http:// or https:// URL")
    if not parts.hostname:
        raise TemplateError("must name a host")
    if _SENTINEL in parts.netloc or _SENTINEL in parts.scheme:
        raise TemplateError("macros may not be used in the scheme or host")
    if "\\" in parts.netloc or "@" in parts.netloc:
        raise TemplateError("must not carry credentials or backslashes in the host")


def compile_template(template: str) -> Template:
    return tuple(_MACRO.split(template))


def fill(template: Template, values: Mapping[str, str]) -> str:
    out = [template[0]]
    for i in range(1, len(template), 2):
        value = values.get(template[i], "")
        if value:
            # ASCII letters and digits are what quote() leaves alone; checking costs a tenth
            # of quoting (click ids, numbers and most sub ids are such).
            out.append(value if value.isalnum() and value.isascii() else quote(value, safe=""))
        out.append(template[i + 1])
    return "".join(out)
