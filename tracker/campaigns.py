"""Campaigns: what the operator sends, checked field by field, and the compiled form the
redirect path uses."""

from __future__ import annotations

import bisect
import random
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from . import money
from .errors import ApiError, bad_request, object_with
from .macros import CLICK_MACROS, POSTBACK_MACROS, Template, TemplateError, check_url, compile_template

SLUG = re.compile(r"[A-Za-z0-9_-]{1,64}")
EVENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
COST_MODELS = ("cpc", "cpm", "cpa", "revshare", "none")
STATUSES = ("active", "paused")
FIELDS = frozenset(
    ["slug", "name", "destination_url", "rotation", "fallback_url", "cost_model",
     "cost_value", "currency", "payouts", "postback_url", "status", "postback_token",
     "postback_secrets", "postback_on"]
)
POSTBACK_ON = ("all", "approved")
MIN_SECRET = 16
MAX_SECRETS = 2
MAX_ROTATION = 100


def _str(body: dict[str, Any], name: str, max_len: int) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise bad_request("invalid_type", f"{name} must be a string", name)
    if len(value) > max_len:
        raise bad_request("too_long", f"{name} must be at most {max_len} characters", name)
    return value


def _url(value: Any, name: str, macros: frozenset[str]) -> str:
    if not isinstance(value, str):
        raise bad_request("invalid_type", f"{name} must be a string", name)
    try:
        check_url(value, macros)
    except TemplateError as exc:
        raise bad_request("invalid_url", f"{name} {exc}", name) from None
    return value


def _decimal(value: Any, name: str) -> Decimal:
    try:
        return money.parse(value)
    except money.MoneyError as exc:
        raise bad_request("invalid_decimal", f"{name} {exc}", name) from None


def _rotation(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise bad_request("invalid_type", "rotation must be a list of {url, weight}", "rotation")
    if len(value) > MAX_ROTATION:
        raise bad_request("too_long", f"rotation holds at most {MAX_ROTATION} URLs", "rotation")
    out = []
    for i, item in enumerate(value):
        where = f"rotation[{i}]"
        if not isinstance(item, dict):
            raise bad_request("invalid_type", f"{where} must be an object {{url, weight}}", where)
        unknown = set(item) - {"url", "weight"}
        if unknown:
            name = sorted(unknown)[0]
            raise bad_request("unknown_field", f"{where} has an unknown field {name!r}",
                              f"{where}.{name}")
        if "url" not in item:
            raise bad_request("required", f"{where}.url is required", f"{where}.url")
        url = _url(item["url"], f"{where}.url", CLICK_MACROS)
        weight = item.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1_000_000:
            raise bad_request("invalid_weight",
                              f"{where}.weight must be a positive integer (1..1000000)",
                              f"{where}.weight")
        out.append({"url": url, "weight": weight})
    return out


def _payouts(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise bad_request("invalid_type", "payouts must be a list", "payouts")
    out = []
    seen = set()
    for i, item in enumerate(value):
        where = f"payouts[{i}]"
        if not isinstance(item, dict):
            raise bad_request("invalid_type", f"{where} must be an object", where)
        unknown = set(item) - {"event", "amount", "percent"}
        if unknown:
            name = sorted(unknown)[0]
            raise bad_request("unknown_field", f"{where} has an unknown field {name!r}",
                              f"{where}.{name}")
        event = item.get("event")
        if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
            raise bad_request("invalid_event", f"{where}.event must match [A-Za-z0-9_.-]{{1,64}}",
                              f"{where}.event")
        if event in seen:
            raise bad_request("duplicate_event", f"{where}.event {event!r} is listed twice",
                              f"{where}.event")
        seen.add(event)
        if ("amount" in item) == ("percent" in item):
            raise bad_request("invalid_payout", f"{where} needs exactly one of amount or percent",
                              where)
        if "amount" in item:
            out.append({"event": event,
                        "amount": money.to_str(_decimal(item["amount"], f"{where}.amount"))})
        else:
            percent = _decimal(item["percent"], f"{where}.percent")
            if percent > 100:
                raise bad_request("invalid_decimal", f"{where}.percent must be at most 100",
                                  f"{where}.percent")
            out.append({"event": event, "percent": money.to_str(percent)})
    return out


def _secrets(value: Any) -> list[str]:
    """Up to two HMAC keys: two, so that a network can move to a new key while postbacks
    signed with the old one still arrive."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_SECRETS:
        raise bad_request("invalid_secrets", f"postback_secrets must be a list of at most "
                          f"{MAX_SECRETS} strings", "postback_secrets")
    for i, secret in enumerate(value):
        if not isinstance(secret, str) or not MIN_SECRET <= len(secret) <= 255 \
                or not secret.isascii() or not secret.isprintable():
            raise bad_request("invalid_secret", f"postback_secrets[{i}] must be {MIN_SECRET} to "
                              "255 printable ASCII characters", f"postback_secrets[{i}]")
    return list(value)


def validate(body: Any, *, partial: bool) -> dict[str, Any]:
    """The clean column values of a create (partial=False) or patch (partial=True) body."""
    body = object_with(body, FIELDS)
    clean: dict[str, Any] = {}
    if "slug" in body:
        slug = _str(body, "slug", 64)
        if not SLUG.fullmatch(slug):
            raise bad_request("invalid_slug", "slug must match [A-Za-z0-9_-]{1,64}", "slug")
        clean["slug"] = slug
    if "name" in body:
        name = _str(body, "name", 200)
        if not name or not name.strip():
            raise bad_request("invalid_name", "name must not be empty", "name")
        clean["name"] = name
    if "destination_url" in body:
        clean["destination_url"] = (
            None if body["destination_url"] is None and partial
            else _url(body["destination_url"], "destination_url", CLICK_MACROS))
    if "rotation" in body:
        clean["rotation"] = [] if body["rotation"] is None else _rotation(body["rotation"])
    if "fallback_url" in body:
        clean["fallback_url"] = (
            None if body["fallback_url"] is None
            else _url(body["fallback_url"], "fallback_url", frozenset()))
    if "cost_model" in body:
        if body["cost_model"] not in COST_MODELS:
            raise bad_request("invalid_cost_model",
                              "cost_model must be one of " + ", ".join(COST_MODELS), "cost_model")
        clean["cost_model"] = body["cost_model"]
    if "cost_value" in body:
        clean["cost_value"] = _decimal(body["cost_value"], "cost_value")
    if "currency" in body:
        code = money.currency(body["currency"])
        if code is None:
            raise bad_request("invalid_currency", "currency must be an ISO 4217 code such as USD",
                              "currency")
        clean["currency"] = code
    if "payouts" in body:
        clean["payouts"] = [] if body["payouts"] is None else _payouts(body["payouts"])
    if "postback_url" in body:
        clean["postback_url"] = (
            None if body["postback_url"] is None
            else _url(body["postback_url"], "postback_url", POSTBACK_MACROS))
    if "postback_token" in body:
        token = body["postback_token"]
        if token is not None:
            token = _str(body, "postback_token", 255)
            if not token or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in token):
                raise bad_request("invalid_token", "postback_token must be printable, without "
                                  "spaces", "postback_token")
        clean["postback_token"] = token
    if "postback_secrets" in body:
        clean["postback_secrets"] = _secrets(body["postback_secrets"])
    if "postback_on" in body:
        if body["postback_on"] not in POSTBACK_ON:
            raise bad_request("invalid_postback_on", "postback_on must be all or approved",
                              "postback_on")
        clean["postback_on"] = body["postback_on"]
    if "status" in body:
        if body["status"] not in STATUSES:
            raise bad_request("invalid_status", "status must be active or paused", "status")
        clean["status"] = body["status"]
    if not partial and not clean.get("destination_url") and not clean.get("rotation"):
        raise bad_request("required", "destination_url or a non-empty rotation is required",
                          "destination_url")
    return clean


def check_whole(row: dict[str, Any]) -> None:
    """Rules over the merged campaign, after a patch."""
    if not row.get("destination_url") and not row.get("rotation"):
        raise bad_request("required", "a campaign needs destination_url or a non-empty rotation",
                          "destination_url")


def new_slug() -> str:
    return secrets.token_urlsafe(6).replace("-", "x").replace("_", "y")


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign as the tracking endpoints use it: URLs compiled, weights summed."""

    id: int
    slug: str
    status: str
    cost_model: str
    cost_value: Decimal
    currency: str
    fallback_url: str | None
    targets: tuple[tuple[str, Template], ...]  # (url as configured, compiled)
    cumulative: tuple[int, ...]                # running sum of weights, for a weighted pick
    # What one billable click and one billable impression cost, as the decimal strings
    # events carry (money.to_str), made once per load rather than once per event.
    click_cost: str
    impression_cost: str
    # Conversions: event → ("amount" | "percent", value); the outbound postback.
    payouts: dict[str, tuple[str, Decimal]]
    postback_url: Template | None
    postback_token: str | None
    postback_secrets: tuple[str, ...]
    postback_on: str

    @classmethod
    def from_row(cls, row: Any) -> Campaign:
        rotation = row["rotation"] or []
        if rotation:
            urls = [(r["url"], int(r["weight"])) for r in rotation]
        else:
            urls = [(row["destination_url"], 1)]
        cumulative, total = [], 0
        cost: Decimal = row["cost_value"]
        for _, weight in urls:
            total += weight
            cumulative.append(total)
        return cls(
            id=row["id"], slug=row["slug"], status=row["status"],
            cost_model=row["cost_model"], cost_value=row["cost_value"],
            currency=row["currency"], fallback_url=row["fallback_url"],
            targets=tuple((url, compile_template(url)) for url, _ in urls),
            cumulative=tuple(cumulative),
            click_cost=money.to_str(cost) if row["cost_model"] == "cpc" else "0",
            impression_cost=money.to_str(money.per_mille(cost)) if row["cost_model"] == "cpm" else "0",
            payouts=_payout_rules(_get(row, "payouts") or []),
            postback_url=compile_template(url) if (url := _get(row, "postback_url")) else None,
            postback_token=_get(row, "postback_token"),
            postback_secrets=tuple(_get(row, "postback_secrets") or ()),
            postback_on=_get(row, "postback_on") or "all",
        )

    def pick(self, rng: random.Random) -> tuple[str, Template]:
        if len(self.targets) == 1:
            return self.targets[0]
        point = rng.randrange(self.cumulative[-1])
        return self.targets[bisect.bisect_right(self.cumulative, point)]


def _get(row: Any, name: str) -> Any:
    """A field a snapshot written by an older version may lack."""
    try:
        return row[name]
    except KeyError:
        return None


def _payout_rules(payouts: list[dict[str, str]]) -> dict[str, tuple[str, Decimal]]:
    rules = {}
    for rule in payouts:
        kind = "amount" if "amount" in rule else "percent"
        rules[rule["event"]] = (kind, Decimal(rule[kind]))
    return rules


def to_json(row: Any, base_url: str) -> dict[str, Any]:
    """The operator API's view of a campaign row."""
    slug = row["slug"]
    return {
        "id": row["id"],
        "slug": slug,
        "name": row["name"],
        "destination_url": row["destination_url"],
        "rotation": row["rotation"] or [],
        "fallback_url": row["fallback_url"],
        "cost_model": row["cost_model"],
        "cost_value": money.to_str(row["cost_value"]),
        "currency": row["currency"],
        "payouts": row["payouts"] or [],
        "postback_url": row["postback_url"],
        "postback_token": row["postback_token"],
        "postback_secrets": list(row["postback_secrets"] or []),
        "postback_on": row["postback_on"],
        "status": row["status"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "tracking_url": f"{base_url}/c/{slug}",
        "impression_url": f"{base_url}/i/{slug}",
        "conversion_pixel_url": f"{base_url}/conversion.gif?event=conversion",
    }


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def slug_taken(slug: str) -> ApiError:
    return ApiError(409, "slug_taken", f"slug {slug!r} is already used by another campaign", "slug")
