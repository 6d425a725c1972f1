"""Currencies and postback security through the service."""

from __future__ import annotations

import time

import asyncpg

from tracker.conversion.security import sign

from ..conftest import Running, flush
from .test_postback import new_click, postback, report


async def test_a_foreign_amount_is_kept_and_reported_in_the_campaigns_currency(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="fx", currency="USD")
    click = await new_click(s, "fx")
    status, body = await postback(s, f"click_id={click}&amount=10&currency=EUR")
    assert (status, body["error"]["code"], body["error"]["field"]) == (
        422, "currency_unsupported", "currency")
    status, body = await s.api("PUT", "/api/fx-rates", json={"base": "EUR", "rates": {"USD": "1.1"}})
    assert status == 200, body
    status, body = await postback(s, f"click_id={click}&amount=10&currency=eur")
    assert (status, body["status"]) == (200, "accepted"), body
    status, view = await s.api("GET", f"/api/conversions/{body['conversion_id']}")
    assert (view["amount"], view["currency"], view["revenue"], view["revenue_currency"]) == (
        "10", "EUR", "11", "USD")
    await flush(s)
    row = await pg.fetchrow("SELECT amount::text, currency, revenue::text FROM conversions")
    assert tuple(row) == ("10.000000", "EUR", "11.000000000")
    totals = (await report(s))["totals"]
    assert (totals["revenue"], totals["currency"]) == ("11", "USD")


async def test_the_postback_token_is_required_when_the_campaign_has_one(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="tok", postback_token="s3cret-token")
    click = await new_click(s, "tok")
    for query in (f"click_id={click}", f"click_id={click}&token=wrong", f"click_id={click}&token="):
        status, body = await postback(s, query)
        assert (status, body["error"]["code"]) == (401, "unauthorized"), query
    status, body = await postback(s, f"click_id={click}&token=s3cret-token")
    assert (status, body["status"]) == (200, "accepted")
    await flush(s)
    assert await pg.fetchval("SELECT count(*) FROM conversions") == 1


async def test_signed_postbacks_with_either_secret_once_and_in_time(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    await s.create_campaign(slug="sig", postback_secrets=[old, new])
    click = await new_click(s, "sig")

    def signed(secret: str, ts: int, **params: str) -> str:
        pairs = [("click_id", click), *params.items(), ("ts", str(ts))]
        return "&".join(f"{k}={v}" for k, v in pairs) + f"&sig={sign(pairs, secret, ts)}"

    now = int(time.time())
    status, body = await postback(s, f"click_id={click}&amount=1")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = await postback(s, signed("not-the-secret-0000", now, amount="1"))
    assert status == 401
    status, body = await postback(s, signed(old, now - 3600, amount="1"))
    assert status == 401  # expired
    tampered = signed(new, now, amount="1").replace("amount=1", "amount=1000")
    assert (await postback(s, tampered))[0] == 401
    good = signed(new, now, amount="1", status="pending")
    status, body = await postback(s, good)
    assert (status, body["status"]) == (200, "accepted"), body
    status, body = await postback(s, good)  # the same signed URL again: a replay
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = await postback(s, signed(old, now + 1, amount="1", status="approved"))
    assert (status, body["status"]) == (200, "updated")
    # A signed postback the rules refuse does not spend its signature: the network's retry
    # of the same URL is refused for the same reason, not as a replay.
    backwards = signed(new, now + 2, amount="1", status="pending")
    for _ in range(2):
        status, body = await postback(s, backwards)
        assert (status, body["error"]["code"]) == (409, "invalid_transition")
    await flush(s)
    assert await pg.fetchval("SELECT count(*) FROM conversion_history") == 2
