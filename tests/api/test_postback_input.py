"""Bad postbacks get a clear 4xx naming the parameter, never a 500, and record nothing."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.conversion.params import ALIASES

from ..conftest import Running, flush
from .test_postback import new_click, postback

CLICK = "{click}"


@pytest.mark.parametrize("query, field, code", [
    ("event=bad event", "event", "invalid_event"),
    ("event=" + "e" * 65, "event", "invalid_event"),
    ("amount=1.1234567", "amount", "invalid_amount"),
    ("amount=-1", "amount", "invalid_amount"),
    ("payout=NaN", "amount", "invalid_amount"),
    ("sum=Infinity", "amount", "invalid_amount"),
    ("revenue=1e3", "amount", "invalid_amount"),
    ("amount=1234567890123", "amount", "invalid_amount"),
    ("amount=1,5", "amount", "invalid_amount"),
    ("currency=US", "currency", "invalid_currency"),
    ("currency=ABC", "currency", "invalid_currency"),
    ("status=weird", "status", "invalid_status"),
    ("txid=" + "t" * 256, "txid", "value_too_long"),
    ("tid=a%00b", "txid", "invalid_value"),
    ("customer_id=%FF%FE", "customer_id", "invalid_encoding"),
    ("order_value=abc", "order_value", "invalid_order_value"),
    ("txid=a&order_id=b", "txid", "repeated_parameter"),
    ("status=approved&status=approved", "status", "repeated_parameter"),
    ("cid=x", "click_id", "repeated_parameter"),
])
async def test_a_malformed_parameter_is_named(quiet_service: Running, pg: asyncpg.Connection,
                                              query: str, field: str, code: str) -> None:
    s = quiet_service
    await s.create_campaign(slug="bad")
    click = await new_click(s, "bad")
    status, body = await postback(s, f"click_id={click}&{query}")
    assert status == 400, body
    assert (body["error"]["field"], body["error"]["code"]) == (field, code), body
    await flush(s)
    assert await pg.fetchval("SELECT count(*) FROM conversions") == 0


async def test_missing_and_oversized_click_ids(quiet_service: Running) -> None:
    s = quiet_service
    status, body = await postback(s, "amount=1")
    assert (status, body["error"]["field"], body["error"]["code"]) == (400, "click_id", "required")
    status, body = await postback(s, "click_id=" + "A" * 41)
    assert (status, body["error"]["field"]) == (400, "click_id")
    status, body = await postback(s, "click_id=" + "A" * 5000)
    assert status in (400, 414)
    # A well-formed id that was never issued.
    status, body = await postback(s, "click_id=01JD0000000000000000000000")
    assert (status, body["error"]["code"]) == (404, "unknown_click")


async def test_bodies_the_postback_cannot_read(quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="body")
    click = await new_click(s, "body")

    async def post(data: bytes, content_type: str) -> tuple[int, Any]:
        return await postback(s, method="POST", data=data, headers={"Content-Type": content_type})

    status, body = await post(b"[1, 2]", "application/json")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = await post(b"{nope", "application/json")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = await post(b'{"click_id": "%s", "amount": NaN}' % click.encode(),
                              "application/json")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = await post(b'{"click_id": "%s", "txid": {"a": 1}}' % click.encode(),
                              "application/json")
    assert (status, body["error"]["field"]) == (400, "txid")
    status, body = await post(f"click_id={click}".encode(), "text/plain")
    assert (status, body["error"]["code"]) == (400, "unsupported_content_type")
    status, body = await post(b"click_id=" + click.encode() + b"&txid=\xff\xfe",
                              "application/x-www-form-urlencoded")
    assert (status, body["error"]["code"]) == (400, "invalid_encoding")
    status, body = await post(b"x" * (70 * 1024), "application/x-www-form-urlencoded")
    assert status == 413
    # The query and the body together: a parameter in both is repeated.
    async with s.http.post(s.url(f"/postback?click_id={click}"), data={"cid": click}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "repeated_parameter"


KNOWN = sorted(alias for aliases in ALIASES.values() for alias in aliases)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(KNOWN + ["x", "click_id"]),
                                st.text(max_size=30)), max_size=6))
async def test_fuzzed_postbacks_never_get_a_500(service: Running, pairs: list[tuple[str, str]]) -> None:
    async with service.http.get(service.url("/postback"), params=pairs) as r:
        assert r.status in (200, 400, 401, 404, 409, 422), await r.text()
        body = await r.json(content_type=None) if r.status != 200 else None
        if body is not None:
            assert set(body["error"]) >= {"code", "message"}
