"""GET /c/{slug}: the redirect a visitor's browser follows."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from multidict import CIMultiDict

from tracker.settings import Settings

from ..conftest import Running, eventually, start


async def clicks_in_db(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await pg.fetch("SELECT * FROM clicks ORDER BY ts"))


async def test_redirects_with_every_macro_filled_and_encoded(service: Running) -> None:
    await service.create_campaign(
        slug="enc", destination_url="https://shop.example/lp?cid={click_id}&c={campaign}&p={pub}"
        "&s1={sub1}&s2={sub2}&x={ext_click_id}&u={utm_source}#top")
    values = {"pub": "a&b=c#d", "sub1": "hello world", "sub2": "東京 café ✓",
              "ext_click_id": "n/1?2", "utm_source": "50%+off"}
    from urllib.parse import urlencode
    r = await service.click("enc", urlencode(values))
    assert r.status == 302
    location = urlsplit(r.headers["Location"])
    assert (location.scheme, location.netloc, location.path, location.fragment) == \
        ("https", "shop.example", "/lp", "top")
    q = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert q["p"] == values["pub"] and q["s1"] == values["sub1"] and q["s2"] == values["sub2"]
    assert q["x"] == values["ext_click_id"] and q["u"] == values["utm_source"]
    assert q["c"] == "enc" and len(q["cid"]) == 26
    assert r.headers["Cache-Control"] == "no-store"


async def test_sets_visitor_and_last_click_cookies(service: Running) -> None:
    await service.create_campaign(slug="cookies")
    r = await service.click("cookies")
    cookies = r.cookies
    assert "tv" in cookies and "tlc" in cookies
    assert cookies["tv"]["max-age"] == str(365 * 24 * 3600)
    cid = parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0]
    assert cookies["tlc"].value == cid
    assert not cookies["tv"]["secure"]


async def test_cookies_are_samesite_none_secure_behind_https(settings: Settings) -> None:
    runner, running = await start(settings.with_(public_url="https://t.example"))
    try:
        await running.create_campaign(slug="https")
        r = await running.click("https")
        assert r.status == 302
        headers = r.headers.getall("Set-Cookie")
        assert len(headers) == 2
        for header in headers:
            assert "Secure" in header and "SameSite=None" in header, header
    finally:
        await running.close()
        await runner.cleanup()


async def test_unknown_slug_is_a_json_404(service: Running) -> None:
    r = await service.click("nope")
    assert r.status == 404
    async with service.http.get(service.url("/c/nope")) as r2:
        body = await r2.json()
    assert body["error"]["code"] == "unknown_link"


async def test_paused_campaign_goes_to_fallback_or_404(service: Running) -> None:
    with_fallback = await service.create_campaign(
        slug="p1", status="paused", fallback_url="https://shop.example/home")
    await service.create_campaign(slug="p2", status="paused")
    r = await service.click("p1")
    assert r.status == 302 and r.headers["Location"] == "https://shop.example/home"
    r = await service.click("p2")
    assert r.status == 404
    # Resuming takes effect at once.
    status, _ = await service.api("PATCH", f"/api/campaigns/{with_fallback['id']}",
                                  json={"status": "active"})
    assert status == 200
    r = await service.click("p1")
    assert r.status == 302 and r.headers["Location"].startswith("https://shop.example/lp?cid=")


async def test_the_request_cannot_choose_the_target(service: Running) -> None:
    await service.create_campaign(slug="safe", destination_url="https://shop.example/{sub1}")
    for attack in ["https://evil.example", "//evil.example", "/\\evil.example", "@evil.example"]:
        from urllib.parse import quote
        r = await service.click("safe", f"sub1={quote(attack, safe='')}&url={quote(attack)}"
                                f"&destination={quote(attack)}")
        assert r.status == 302
        assert urlsplit(r.headers["Location"]).netloc == "shop.example", r.headers["Location"]


async def test_head_answers_the_same_and_records_nothing(service: Running,
                                                         pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="head")
    async with service.http.head(service.url("/c/head"), allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"].startswith("https://shop.example/lp?cid=")
        assert r.headers["Cache-Control"] == "no-store"
    await service.click("head")
    await eventually(lambda: clicks_in_db(pg))
    await asyncio.sleep(0.3)
    assert len(await clicks_in_db(pg)) == 1


async def test_bots_are_redirected_recorded_flagged_and_not_billed(
        service: Running, pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="bots", cost_model="cpc", cost_value="0.50")
    preview = {"User-Agent": "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)"}
    r = await service.click("bots", headers=preview)
    assert r.status == 302
    r = await service.click("bots")
    assert r.status == 302
    rows = await eventually(lambda: _two(pg))
    by_bot = {row["is_bot"]: row for row in rows}
    assert by_bot[True]["cost"] == 0 and not by_bot[True]["is_unique"]
    assert by_bot[False]["cost"] == 0.5 and by_bot[False]["is_unique"]


async def _two(pg: asyncpg.Connection) -> list[asyncpg.Record] | None:
    rows = await clicks_in_db(pg)
    return rows if len(rows) == 2 else None


async def test_unique_once_per_visitor_and_campaign_within_the_window(
        settings: Settings, pg: asyncpg.Connection) -> None:
    runner, running = await start(settings.with_(unique_window=2))
    try:
        await running.create_campaign(slug="u1")
        await running.create_campaign(slug="u2")
        first = await running.click("u1")
        visitor = first.cookies["tv"].value
        cookie = {"Cookie": f"tv={visitor}"}
        await running.click("u1", headers=cookie)  # same visitor, same campaign: not unique
        await running.click("u2", headers=cookie)  # same visitor, other campaign: unique
        await running.click("u1")                  # no cookie: a new visitor, unique
        await asyncio.sleep(2.2)
        await running.click("u1", headers=cookie)  # window over: unique again

        async def five() -> list[asyncpg.Record] | None:
            rows = await clicks_in_db(pg)
            return rows if len(rows) == 5 else None

        rows = await eventually(five)
        assert rows is not None
        assert [r["is_unique"] for r in rows] == [True, False, True, True, True]
        assert rows[1]["visitor_id"] == visitor
    finally:
        await running.close()
        await runner.cleanup()


async def test_one_visitors_clicks_at_once_are_one_unique(service: Running,
                                                         pg: asyncpg.Connection) -> None:
    """Twenty clicks of one visitor sent at once, among other visitors': exactly one of hers
    is unique. (That the clicks of one tick share one Redis call, and stay right, is
    tests/db/test_buffer.py's: over HTTP they do not reliably land in one tick.)"""
    await service.create_campaign(slug="burst")
    visitor = (await service.click("burst")).cookies["tv"].value
    cookie = {"Cookie": f"tv={visitor}"}
    others = [service.click("burst") for _ in range(10)]  # new visitors, unique each
    mine = [service.click("burst", headers=cookie) for _ in range(20)]
    assert all(r.status == 302 for r in await asyncio.gather(*others, *mine))

    async def all_31() -> list[asyncpg.Record] | None:
        rows = await clicks_in_db(pg)
        return rows if len(rows) == 31 else None

    rows = await eventually(all_31)
    assert rows is not None
    assert sum(r["is_unique"] for r in rows if r["visitor_id"] == visitor) == 1
    assert sum(r["is_unique"] for r in rows if r["visitor_id"] != visitor) == 10


async def test_device_country_and_masked_ip_are_recorded(service: Running,
                                                        pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="geo")
    iphone = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")
    await service.click("geo", headers={"User-Agent": iphone, "CF-IPCountry": "tr"})
    rows = await eventually(lambda: clicks_in_db(pg))
    assert rows[0]["device"] == "mobile"
    assert rows[0]["country"] == "TR"
    assert str(rows[0]["ip"]) == "127.0.0.0/32" or rows[0]["ip"].exploded == "127.0.0.0"


async def test_rotation_splits_traffic_by_weight(service: Running, pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="ab", rotation=[
        {"url": "https://a.example/?c={click_id}", "weight": 3},
        {"url": "https://b.example/?c={click_id}", "weight": 1}])
    hosts = []
    for _ in range(400):
        r = await service.click("ab")
        hosts.append(urlsplit(r.headers["Location"]).netloc)
    share = hosts.count("a.example") / len(hosts)
    assert set(hosts) == {"a.example", "b.example"}
    assert 0.65 < share < 0.85, share  # 0.75 ± 5 standard deviations


async def test_clicks_survive_redis_forgetting_the_script(service: Running,
                                                         pg: asyncpg.Connection) -> None:
    """After a Redis restart the script cache is empty: the buffer loads it again."""
    import redis.asyncio as aioredis

    await service.create_campaign(slug="noscript")
    redis = aioredis.Redis.from_url(service.settings.redis_url)
    await redis.script_flush()
    await redis.aclose()
    results = await asyncio.gather(*(service.click("noscript") for _ in range(20)))
    assert all(r.status == 302 for r in results)

    async def twenty() -> bool:
        return await pg.fetchval("SELECT count(*) FROM clicks") == 20

    assert await eventually(twenty)


async def test_the_visitor_address_behind_trusted_proxies(settings: Settings,
                                                         pg: asyncpg.Connection) -> None:
    """With one trusted proxy, the address it appended to X-Forwarded-For is the visitor's;
    whatever the client wrote before it is not trusted."""
    runner, running = await start(settings.with_(proxy_hops=1))
    try:
        await running.create_campaign(slug="xff")
        await running.click("xff", "sub1=a", headers={"X-Forwarded-For": "10.9.9.9, 198.51.100.77"})
        await running.click("xff", "sub1=b", headers={"X-Forwarded-For": "2001:db8:1234:5678::1"})
        await running.click("xff", "sub1=c")  # no header: the peer

        async def three() -> list[asyncpg.Record] | None:
            rows = await clicks_in_db(pg)
            return rows if len(rows) == 3 else None

        rows = await eventually(three)
        assert rows is not None
        # By sub id, not by ts: two clicks of one millisecond have the same ts.
        assert {r["sub1"]: str(r["ip"]) for r in rows} == {
            "a": "198.51.100.0", "b": "2001:db8:1234::", "c": "127.0.0.0"}
    finally:
        await running.close()
        await runner.cleanup()


async def clicked_on_both_servers(running: Running, pg: asyncpg.Connection, slug: str,
                                  headers: Any) -> list[asyncpg.Record]:
    """One click through the fast path, one through aiohttp (the connection that made the
    campaign was handed to it), with the same headers; the two stored rows."""
    await running.click(slug, headers=headers)
    async with running.http.get(running.url(f"/c/{slug}"), allow_redirects=False,
                                headers=headers) as r:
        assert r.status == 302

    async def two() -> list[asyncpg.Record] | None:
        rows = await clicks_in_db(pg)
        return rows if len(rows) == 2 else None

    rows = await eventually(two)
    assert rows is not None
    return rows


async def test_every_x_forwarded_for_line_counts_on_both_servers(settings: Settings,
                                                                 pg: asyncpg.Connection) -> None:
    """A proxy that adds its own X-Forwarded-For line (instead of appending to the client's)
    must not let the client's line name the visitor: the lines are one list, in order."""
    runner, running = await start(settings.with_(proxy_hops=1))
    lines = CIMultiDict([("X-Forwarded-For", "203.0.113.9"),          # the client's own
                         ("X-Forwarded-For", "10.0.0.1, 198.51.100.77")])  # the proxy's
    try:
        await running.create_campaign(slug="xff2")
        rows = await clicked_on_both_servers(running, pg, "xff2", lines)
        assert [str(r["ip"]) for r in rows] == ["198.51.100.0", "198.51.100.0"]
    finally:
        await running.close()
        await runner.cleanup()


async def test_the_country_header_is_trusted_only_when_configured(settings: Settings,
                                                                  pg: asyncpg.Connection) -> None:
    """Without a proxy in front that sets it, CF-IPCountry is whatever the client wrote: by
    default no country header is trusted, on either server."""
    assert Settings.from_env({}).country_header == ""
    runner, running = await start(settings.with_(country_header=Settings().country_header))
    try:
        await running.create_campaign(slug="nocountry")
        rows = await clicked_on_both_servers(running, pg, "nocountry", {"CF-IPCountry": "TR"})
        assert [r["country"] for r in rows] == ["", ""]
    finally:
        await running.close()
        await runner.cleanup()
