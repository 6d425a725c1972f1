"""/postback: identity, statuses, read-your-writes, revenue and reports, end to end."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from ..conftest import Running, eventually, flush


def click_id_of(location: str) -> str:
    return parse_qs(urlsplit(location).query)["cid"][0]


async def new_click(s: Running, slug: str, query: str = "pub=p1&sub1=s") -> str:
    r = await s.click(slug, query)
    assert r.status == 302
    return click_id_of(r.headers["Location"])


async def postback(s: Running, query: str = "", method: str = "GET", *, via_aiohttp: bool = False,
                   **kwargs: Any) -> tuple[int, Any]:
    """A postback. A GET goes on a connection that only ever tracked, so the worker's own fast
    path answers it; a POST (a body) is handed to aiohttp, as are GETs with via_aiohttp."""
    http = s.track if method in ("GET", "HEAD") and not via_aiohttp else s.http
    async with http.request(method, s.url("/postback" + (f"?{query}" if query else "")),
                            **kwargs) as r:
        ctype = r.headers.get("Content-Type", "")
        return r.status, (await r.json() if "json" in ctype else await r.text())


async def report(s: Running, query: str = "") -> dict[str, Any]:
    status, body = await s.api("GET", "/api/reports?" + query)
    assert status == 200, body
    data: dict[str, Any] = body
    return data


async def test_accepted_then_duplicate_then_updated_with_history(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="pb", payouts=[{"event": "lead", "amount": "2.50"}])
    click = await new_click(s, "pb")

    status, first = await postback(s, f"click_id={click}&event=lead&status=pending")
    assert status == 200 and first["status"] == "accepted", first
    conversion_id = first["conversion_id"]
    status, again = await postback(s, f"cid={click}&goal=lead&status=pending")
    assert (status, again) == (200, {"status": "duplicate", "conversion_id": conversion_id})
    status, approved = await postback(s, f"clickid={click}&type=lead&status=approved")
    assert (status, approved) == (200, {"status": "updated", "conversion_id": conversion_id})

    # Read-your-writes: nothing is in PostgreSQL yet (the writer is not running).
    assert await pg.fetchval("SELECT count(*) FROM conversions") == 0
    status, body = await s.api("GET", f"/api/conversions/{conversion_id}")
    assert status == 200, body
    assert body["status"] == "approved" and body["amount"] == "2.5" and body["event"] == "lead"
    assert [(h["old_status"], h["status"]) for h in body["history"]] == [
        (None, "pending"), ("pending", "approved")]
    assert body["click"]["click_id"] == click and body["click"]["pub"] == "p1"
    status, click_body = await s.api("GET", f"/api/clicks/{click}")
    assert [c["conversion_id"] for c in click_body["conversions"]] == [conversion_id]

    await flush(s)
    row = await pg.fetchrow("SELECT status, version, revenue FROM conversions")
    assert (row["status"], row["version"], str(row["revenue"])) == ("approved", 2, "2.500000000")
    assert await pg.fetchval("SELECT count(*) FROM conversion_history") == 2
    status, stored = await s.api("GET", f"/api/conversions/{conversion_id}")
    assert stored["status"] == "approved" and len(stored["history"]) == 2

    totals = (await report(s))["totals"]
    assert totals["conversions"] == 1 and totals["revenue"] == "2.5"
    assert totals["pending_conversions"] == 0 and totals["cr"] == 1.0


async def test_a_reversal_takes_revenue_back_and_pending_is_reported_apart(
        quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="rev")
    a, b = await new_click(s, "rev"), await new_click(s, "rev")
    assert (await postback(s, f"click_id={a}&amount=10&status=approved"))[1]["status"] == "accepted"
    assert (await postback(s, f"click_id={b}&amount=4&status=pending"))[1]["status"] == "accepted"
    await flush(s)
    totals = (await report(s))["totals"]
    assert (totals["conversions"], totals["revenue"]) == (1, "10")
    assert (totals["pending_conversions"], totals["pending_revenue"]) == (1, "4")
    assert (await postback(s, f"click_id={a}&status=reversed"))[1]["status"] == "updated"
    await flush(s)
    totals = (await report(s))["totals"]
    assert (totals["conversions"], totals["revenue"]) == (0, "0")


async def test_transitions_the_rules_refuse_are_409_and_change_nothing(quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="tr")
    click = await new_click(s, "tr")
    await postback(s, f"click_id={click}&status=declined&amount=3")
    status, body = await postback(s, f"click_id={click}&status=approved&amount=3")
    assert status == 409 and body["error"]["code"] == "invalid_transition", body
    status, body = await postback(s, f"click_id={(await new_click(s, 'tr'))}&status=reversed")
    assert status == 409 and body["error"]["code"] == "invalid_transition"
    await flush(s)
    totals = (await report(s))["totals"]
    assert totals["conversions"] == 0 and totals["pending_conversions"] == 0


async def test_aiohttp_answers_postbacks_as_the_fast_path_does(quiet_service: Running) -> None:
    # A connection that made an API call is aiohttp's for good: its GETs take the other road.
    s = quiet_service
    await s.create_campaign(slug="both")
    click = await new_click(s, "both")
    for via_aiohttp in (True, False):
        status, body = await postback(s, f"click_id={click}&txid={via_aiohttp}&return=OK",
                                      via_aiohttp=via_aiohttp)
        assert (status, body) == (200, "OK")
        status, body = await postback(s, f"click_id={click}&cid=x", via_aiohttp=via_aiohttp)
        assert (status, body["error"]["code"]) == (400, "repeated_parameter")
        status, body = await postback(s, "click_id=01JD0000000000000000000000",
                                      via_aiohttp=via_aiohttp)
        assert (status, body["error"]["code"]) == (404, "unknown_click")
        status, body = await postback(s, f"click_id={click}&txid={via_aiohttp}&status=reversed",
                                      via_aiohttp=via_aiohttp)
        assert status == 200 and body["status"] == "updated"
        status, body = await postback(s, f"click_id={click}&txid={via_aiohttp}&status=pending",
                                      via_aiohttp=via_aiohttp)
        assert (status, body["error"]["code"]) == (409, "invalid_transition")
        status, _ = await postback(s, f"click_id={click}", method="HEAD",
                                   via_aiohttp=via_aiohttp)
        assert status == 405
    status, body = await postback(s, f"click_id={click}&txid=True&status=reversed")
    assert body["status"] == "duplicate"


async def test_an_unknown_or_malformed_click_id(quiet_service: Running) -> None:
    s = quiet_service
    status, body = await postback(s, "click_id=01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert status == 404 and body["error"]["code"] == "unknown_click"
    status, body = await postback(s, "click_id=nope")
    assert status == 400 and body["error"]["field"] == "click_id"
    status, body = await postback(s, "cid=a&cid=b")
    assert status == 400 and body["error"]["field"] == "click_id"
    status, body = await postback(s, "click_id=" + "A" * 5000)
    assert status in (400, 414)


async def test_ten_identical_postbacks_at_once_are_one_conversion(
        service: Running, pg: asyncpg.Connection) -> None:
    s = service
    await s.create_campaign(slug="race", payouts=[{"event": "sale", "amount": "5"}])
    click = await new_click(s, "race")
    answers = await asyncio.gather(*[postback(s, f"click_id={click}&event=sale&txid=T1")
                                     for _ in range(10)])
    outcomes = sorted(body["status"] for _, body in answers)
    assert outcomes == ["accepted"] + ["duplicate"] * 9, answers

    async def written() -> bool:
        return await pg.fetchval("SELECT count(*) FROM conversion_history") == 1
    assert await eventually(written)
    assert await pg.fetchval("SELECT sum(conversions) FROM conversion_rollup_15m "
                             "WHERE basis = 'conversion'") == 1


async def test_a_repeat_after_redis_lost_everything_is_not_counted_twice(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="flush")
    click = await new_click(s, "flush")
    _, first = await postback(s, f"click_id={click}&amount=7&txid=X")
    await flush(s)
    # Redis loses this deployment's data (a flush, a restart without persistence).
    redis = aioredis.Redis.from_url(s.settings.redis_url)
    keys = [k async for k in redis.scan_iter(f"{s.settings.redis_prefix}*")]
    await redis.delete(*keys)
    await redis.aclose()
    status, again = await postback(s, f"click_id={click}&amount=7&txid=X")
    assert (status, again) == (200, {"status": "duplicate", "conversion_id": first["conversion_id"]})
    await flush(s)
    assert await pg.fetchval("SELECT sum(conversions) FROM conversion_rollup_15m "
                             "WHERE basis = 'conversion'") == 1


async def test_a_thousand_identical_postbacks_from_fifty_connections(
        service: Running, pg: asyncpg.Connection) -> None:
    s = service
    await s.create_campaign(slug="storm")
    click = await new_click(s, "storm")
    answers: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as http:
        async def send() -> None:
            async with http.get(s.url(f"/postback?click_id={click}&txid=same&amount=3")) as r:
                assert r.status == 200
                answers.append((await r.json())["status"])
        await asyncio.gather(*[send() for _ in range(1000)])
    assert sorted(answers) == ["accepted"] + ["duplicate"] * 999

    async def written() -> bool:
        return await pg.fetchval("SELECT count(*) FROM conversion_history") == 1
    assert await eventually(written)
    assert await pg.fetchval("SELECT count(*) FROM conversions") == 1
    rolled = await pg.fetchrow("SELECT sum(conversions) AS n, sum(revenue) AS revenue "
                               "FROM conversion_rollup_15m WHERE basis = 'conversion'")
    assert (rolled["n"], str(rolled["revenue"])) == (1, "3.000000000")


async def test_the_ad_platforms_click_ids_are_kept_on_the_click_and_the_conversion(
        quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="ads")
    click = await new_click(s, "ads", "gclid=Cj0KCQ-abc_123&fbclid=IwAR0xyz&msclkid=m1")
    _, body = await postback(s, f"click_id={click}")
    status, view = await s.api("GET", f"/api/conversions/{body['conversion_id']}")
    assert status == 200
    assert (view["click"]["gclid"], view["click"]["fbclid"], view["click"]["msclkid"]) == (
        "Cj0KCQ-abc_123", "IwAR0xyz", "m1")
    await flush(s)
    status, stored = await s.api("GET", f"/api/clicks/{click}")
    assert stored["gclid"] == "Cj0KCQ-abc_123" and stored["ttclid"] == ""


async def test_the_conversion_pixel_always_answers_its_gif(
        quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="px")
    r = await s.click("px")
    click = click_id_of(r.headers["Location"])
    for path in ["/conversion.gif", "/conversion.gif?amount=NaN",
                 "/conversion.gif?click_id=01JD0000000000000000000000",
                 "/conversion.gif?click_id=" + "x" * 3000, "/conversion.gif?cid=%FF%FE"]:
        async with s.track.get(s.url(path)) as answer:
            assert answer.status == 200 and answer.headers["Content-Type"] == "image/gif", path
            assert answer.headers["Cache-Control"] == "no-store"
    # The click id from the last-click cookie, when the page does not name one.
    async with s.track.get(s.url("/conversion.gif?event=purchase&amount=19.99"),
                          headers={"Cookie": f"tlc={click}"}) as answer:
        assert answer.status == 200
    await flush(s)
    rows = await pg.fetch("SELECT event, amount::text, source FROM conversions")
    assert [tuple(r) for r in rows] == [("purchase", "19.990000", "pixel")]
    async with s.http.get(s.url("/metrics")) as m:
        text = await m.text()
    assert 'tracker_events_dropped_total{reason="unknown_click",type="conversion"}' in text
    assert 'tracker_events_total{outcome="accepted",type="conversion"}' in text


async def test_lookups_while_postgres_is_away_answer_503_not_500(settings: Any) -> None:
    from ..conftest import start

    # A database URL nothing listens on: every lookup that reaches PostgreSQL fails to connect.
    runner, s = await start(settings.with_(database_url="postgresql://postgres@127.0.0.1:9/none"))
    try:
        for path in ("/api/clicks/01JD0000000000000000000000",
                     "/api/conversions/01JD0000000000000000000000", "/api/reports"):
            status, body = await s.api("GET", path)
            assert (status, body["error"]["code"]) == (503, "not_ready"), (path, body)
    finally:
        await s.close()
        await runner.cleanup()
