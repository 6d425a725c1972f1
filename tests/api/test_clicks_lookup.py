"""GET /api/clicks/{click_id}: read-your-writes."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import asyncpg
import redis.asyncio as aioredis

from tracker.redis_keys import keys_for

from ..conftest import Running, eventually, flush


def click_id_of(location: str) -> str:
    return parse_qs(urlsplit(location).query)["cid"][0]


async def test_a_click_is_found_the_moment_its_redirect_was_sent(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="ryw", cost_model="cpc", cost_value="0.10")
    r = await s.click("ryw", "pub=p1&sub1=x&utm_source=fb", headers={"CF-IPCountry": "DE"})
    click_id = click_id_of(r.headers["Location"])
    # The writer is not running: the row is not in PostgreSQL, yet the lookup answers.
    assert await pg.fetchval("SELECT count(*) FROM clicks") == 0
    status, body = await s.api("GET", f"/api/clicks/{click_id}")
    assert status == 200, body
    assert body["click_id"] == click_id and body["campaign"] == "ryw"
    assert body["pub"] == "p1" and body["sub1"] == "x" and body["utm_source"] == "fb"
    assert body["country"] == "DE" and body["ip"] == "127.0.0.0"
    assert body["is_unique"] is True and body["is_bot"] is False
    assert body["destination"] == r.headers["Location"]
    assert body["cost"] == "0.1" and body["conversions"] == []

    # Once its row is committed, the writer takes its entry out of the set that named it for
    # read-your-writes (what Redis keeps of a stored click is its uniqueness mark alone),
    # and PostgreSQL answers the same.
    recent = keys_for(s.settings).recent_of(click_id)
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    try:
        assert await redis.scard(recent) == 1
        await flush(s)
        assert await pg.fetchval("SELECT count(*) FROM clicks") == 1
        assert not await redis.exists(recent)
    finally:
        await redis.aclose()
    status, from_db = await s.api("GET", f"/api/clicks/{click_id}")
    assert status == 200
    assert from_db == body


async def test_unknown_click_is_404_and_malformed_is_400(service: Running) -> None:
    status, body = await service.api("GET", "/api/clicks/01JD0000000000000000000000")
    assert status == 404 and body["error"]["code"] == "unknown_click"
    for bad in ["nope", "01JD00000000000000000000000", "01JD000000000000000000000U", "%00"]:
        status, body = await service.api("GET", f"/api/clicks/{bad}")
        assert status == 400, bad
        assert body["error"]["field"] == "click_id"


async def test_lookup_is_exact_for_many_clicks(service: Running, pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="many")
    ids = [click_id_of((await service.click("many", f"sub2={i}")).headers["Location"])
           for i in range(20)]

    async def all_written() -> bool:
        return await pg.fetchval("SELECT count(*) FROM clicks") == 20

    assert await eventually(all_written)
    for i, click_id in enumerate(ids):
        status, body = await service.api("GET", f"/api/clicks/{click_id}")
        assert status == 200 and body["sub2"] == str(i)


async def test_a_click_older_than_its_redis_copy_is_read_from_postgresql(
        quiet_service: Running) -> None:
    """Past TRACKER_CLICK_CACHE_TTL the lookup asks PostgreSQL alone (no Redis round trip):
    it must still find every field, and an id PostgreSQL lacks is still a 404."""
    from datetime import UTC, datetime, timedelta

    import orjson

    from tracker.ids import new_id

    s = quiet_service
    c = await s.create_campaign(slug="old")
    when = datetime.now(UTC) - timedelta(days=1)
    click_id = str(new_id(int(when.timestamp() * 1000)))
    event = {"type": "click", "id": click_id, "campaign_id": c["id"], "visitor_id": "v1",
             "pub": "p9", "sub3": "s", "country": "TR", "device": "mobile", "ip": "203.0.113.0",
             "is_unique": True, "is_bot": False, "destination": "https://shop.example/",
             "cost": "0.25"}
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    await redis.xadd(keys_for(s.settings).stream, {"e": orjson.dumps(event)})
    await redis.aclose()
    await flush(s)
    status, body = await s.api("GET", f"/api/clicks/{click_id}")
    assert status == 200, body
    assert (body["campaign"], body["pub"], body["sub3"], body["country"], body["cost"]) == \
        ("old", "p9", "s", "TR", "0.25")
    assert body["time"].startswith(when.strftime("%Y-%m-%dT%H:%M")) and body["conversions"] == []
    missing = str(new_id(int(when.timestamp() * 1000)))
    status, body = await s.api("GET", f"/api/clicks/{missing}")
    assert status == 404 and body["error"]["code"] == "unknown_click"
