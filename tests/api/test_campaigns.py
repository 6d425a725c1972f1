"""The operator API for campaigns."""

from __future__ import annotations

import asyncpg

from tracker.settings import Settings

from ..conftest import AUTH, Running, eventually, start


async def test_create_returns_ready_made_urls(service: Running) -> None:
    status, body = await service.api("POST", "/api/campaigns", json={
        "slug": "summer-sale", "name": "Summer sale",
        "destination_url": "https://shop.example/lp?cid={click_id}&src={pub}&s1={sub1}",
        "rotation": [{"url": "https://shop.example/a?cid={click_id}", "weight": 70},
                     {"url": "https://shop.example/b?cid={click_id}", "weight": 30}],
        "fallback_url": "https://shop.example/",
        "cost_model": "cpc", "cost_value": "0.25", "currency": "USD",
        "payouts": [{"event": "lead", "amount": "2.00"}, {"event": "sale", "percent": "10"}],
        "postback_url": "https://network.example/pb?click={ext_click_id}&payout={payout}&event={event}",
        "status": "active"})
    assert status == 201, body
    assert isinstance(body["id"], int)
    assert body["tracking_url"] == "http://tracker.test/c/summer-sale"
    assert body["impression_url"] == "http://tracker.test/i/summer-sale"
    assert body["conversion_pixel_url"].startswith("http://tracker.test/conversion.gif")
    assert body["cost_value"] == "0.25" and body["payouts"][0]["amount"] == "2"
    status, got = await service.api("GET", f"/api/campaigns/{body['id']}")
    assert status == 200 and got == body


async def test_slug_is_generated_when_absent(service: Running) -> None:
    a = await service.create_campaign()
    b = await service.create_campaign()
    assert a["slug"] != b["slug"]
    r = await service.click(a["slug"])
    assert r.status == 302


async def test_duplicate_slug_is_a_conflict(service: Running) -> None:
    await service.create_campaign(slug="twice")
    status, body = await service.api("POST", "/api/campaigns", json={
        "slug": "twice", "destination_url": "https://x.example/"})
    assert status == 409 and body["error"]["field"] == "slug"


async def test_list_get_patch_delete(service: Running, pg: asyncpg.Connection) -> None:
    ids = [(await service.create_campaign(slug=f"c{i}"))["id"] for i in range(3)]
    status, page = await service.api("GET", "/api/campaigns?limit=2")
    assert status == 200 and [c["id"] for c in page["campaigns"]] == ids[:2]
    status, page2 = await service.api("GET", f"/api/campaigns?limit=2&after={page['next_after']}")
    assert [c["id"] for c in page2["campaigns"]] == ids[2:] and page2["next_after"] is None

    status, patched = await service.api("PATCH", f"/api/campaigns/{ids[0]}", json={
        "destination_url": "https://new.example/?c={click_id}", "name": "Renamed"})
    assert status == 200 and patched["name"] == "Renamed"
    r = await service.click("c0")
    assert r.headers["Location"].startswith("https://new.example/?c=")

    await service.click("c1")
    async def both_written() -> bool:
        return await pg.fetchval("SELECT coalesce(sum(clicks), 0) FROM rollup_15m") == 2

    assert await eventually(both_written)
    status, _ = await service.api("DELETE", f"/api/campaigns/{ids[1]}")
    assert status == 204
    assert (await service.api("GET", f"/api/campaigns/{ids[1]}"))[0] == 404
    assert (await service.api("DELETE", f"/api/campaigns/{ids[1]}"))[0] == 404
    assert (await service.click("c1")).status == 404
    status, listed = await service.api("GET", "/api/campaigns")
    assert ids[1] not in [c["id"] for c in listed["campaigns"]]
    # A deleted campaign's past clicks stay reportable.
    status, report = await service.api("GET", "/api/reports?group_by=campaign")
    assert status == 200
    assert [(r["campaign"], r["clicks"]) for r in report["rows"]] == [("c0", 1), ("c1", 1)]
    # Its slug is never handed to another campaign.
    status, body = await service.api("POST", "/api/campaigns", json={
        "slug": "c1", "destination_url": "https://x.example/"})
    assert status == 409


async def test_patch_validates_the_merged_campaign(service: Running) -> None:
    c = await service.create_campaign(slug="merge")
    status, body = await service.api("PATCH", f"/api/campaigns/{c['id']}",
                                     json={"destination_url": None})
    assert status == 400 and body["error"]["field"] == "destination_url"
    status, body = await service.api("PATCH", f"/api/campaigns/{c['id']}", json={"weight": 3})
    assert status == 400 and body["error"] == {
        "code": "unknown_field", "message": "unknown field 'weight'", "field": "weight"}


async def test_a_campaign_nobody_announced_is_served_after_the_next_refresh(
        settings: Settings) -> None:
    """Written straight to PostgreSQL with no announcement (as when Redis was away while it
    was made elsewhere): unknown at first (404, no query per click), served once the worker's
    periodic check sees that campaigns changed."""
    from tracker.keys import PG
    from tracker.storage import campaigns as store

    runner, running = await start(settings.with_(campaign_refresh_seconds=1))
    try:
        await store.insert(running.app[PG], {"slug": "elsewhere", "name": "e",
                                              "destination_url": "https://e.example/"})
        assert (await running.click("elsewhere")).status == 404

        async def served() -> bool:
            r = await running.click("elsewhere")
            return r.status == 302 and r.headers["Location"] == "https://e.example/"

        assert await eventually(served, timeout=5)
    finally:
        await running.close()
        await runner.cleanup()


async def test_every_operator_route_needs_the_token(service: Running) -> None:
    c = await service.create_campaign(slug="locked")
    routes = [("GET", "/api/campaigns"), ("POST", "/api/campaigns"),
              ("GET", f"/api/campaigns/{c['id']}"), ("PATCH", f"/api/campaigns/{c['id']}"),
              ("DELETE", f"/api/campaigns/{c['id']}"), ("GET", "/api/reports"),
              ("GET", "/api/clicks/01JD0000000000000000000000"), ("GET", "/api/nothing-here"),
              ("PUT", "/api/campaigns")]
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="},
                    {"Authorization": "Bearer"}, {"Authorization": AUTH["Authorization"] + "x"}]:
        for method, path in routes:
            status, body = await service.api(method, path, headers=headers, json={})
            assert status == 401, (method, path, headers)
            assert body["error"]["code"] == "unauthorized"
    assert (await service.api("GET", f"/api/campaigns/{c['id']}"))[0] == 200


async def test_a_generated_slug_is_also_the_default_name(service: Running) -> None:
    c = await service.create_campaign()
    assert c["name"] == c["slug"]
    named = await service.create_campaign(name="Black Friday")
    assert named["name"] == "Black Friday" and named["slug"] != "Black Friday"
