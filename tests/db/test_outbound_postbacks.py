"""Outbound postbacks end to end: a network's postback → the conversion stored → the traffic
source's URL called, through a real local receiver that fails before it answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from tracker.settings import Settings

from ..conftest import Served, eventually, free_port, start


class Receiver:
    """A traffic source's postback endpoint that fails its first `failures` calls."""

    def __init__(self, failures: int, status: int = 503) -> None:
        self.failures, self.status = failures, status
        self.calls: list[dict[str, str]] = []
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/pb"

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(dict(request.query))
        if len(self.calls) <= self.failures:
            return web.Response(status=self.status, text="try later")
        return web.Response(text="ok")


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_get("/pb", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()


TEMPLATE = ("?click={click_id}&ext={ext_click_id}&payout={payout}&event={event}&status={status}"
            "&txid={txid}&cur={currency}&s1={sub1}")


async def test_a_receiver_failing_three_times_gets_it_on_the_fourth(
        settings: Settings, pg: asyncpg.Connection) -> None:
    runner, s = await start(settings.with_(postback_allow_private=True, postback_backoff_ms=100))
    try:
        before = await tries_counted(s)
        async with receiving(Receiver(failures=3)) as receiver:
            await s.create_campaign(slug="out", postback_url=receiver.url + TEMPLATE)
            r = await s.click("out", "ext_click_id=NET-42&sub1=a b")
            click = parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0]
            async with s.track.get(s.url(f"/postback?click_id={click}&amount=2.5&event=sale"
                                         f"&txid=T1")) as answer:
                conversion = (await answer.json())["conversion_id"]

            async def delivered() -> Any:
                _, view = await s.api("GET", f"/api/conversions/{conversion}")
                outbound = view.get("postbacks") or []
                return view if outbound and outbound[0]["state"] == "delivered" else None
            view = await eventually(delivered, timeout=20)
            assert view, "the postback was never delivered"
            tries = view["postbacks"][0]["tries"]
            assert [t["http_status"] for t in tries] == [503, 503, 503, 200]
            assert [t["n"] for t in tries] == [1, 2, 3, 4]
            assert len(receiver.calls) == 4
            assert receiver.calls[-1] == {"click": click, "ext": "NET-42",
                                          "payout": "2.5", "event": "sale", "status": "approved",
                                          "txid": "T1", "cur": "USD", "s1": "a b"}
            await asyncio.sleep(0.5)  # nothing more is sent once delivered
            assert len(receiver.calls) == 4
        after = await tries_counted(s)
        assert (after["delivered"] - before["delivered"], after["retry"] - before["retry"]) == (1, 3)
    finally:
        await s.close()
        await runner.cleanup()


async def tries_counted(s: Any) -> dict[str, float]:
    """tracker_outbound_postbacks_total by outcome, as /metrics says (this process's counters
    outlive a test, so a test compares before and after)."""
    async with aiohttp.ClientSession() as http, http.get(s.url("/metrics")) as m:
        text = await m.text()
    counted = {"delivered": 0.0, "retry": 0.0}
    for line in text.splitlines():
        if line.startswith('tracker_outbound_postbacks_total{outcome="'):
            outcome = line.split('"')[1]
            counted[outcome] = float(line.rsplit(" ", 1)[1])
    return counted


async def test_approved_only_campaigns_call_back_on_approval(
        settings: Settings, pg: asyncpg.Connection) -> None:
    runner, s = await start(settings.with_(postback_allow_private=True, postback_backoff_ms=100))
    try:
        async with receiving(Receiver(failures=0)) as receiver:
            await s.create_campaign(slug="appr", postback_url=receiver.url + TEMPLATE,
                                    postback_on="approved")
            r = await s.click("appr")
            click = parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0]
            for status in ("pending", "approved"):
                async with s.track.get(s.url(f"/postback?click_id={click}&amount=1"
                                             f"&status={status}")) as answer:
                    assert answer.status == 200
            assert await eventually(lambda: _calls(receiver), timeout=20)
            await asyncio.sleep(0.5)
            assert [c["status"] for c in receiver.calls] == ["approved"]
    finally:
        await s.close()
        await runner.cleanup()


async def _calls(receiver: Receiver) -> bool:
    return bool(receiver.calls)


async def test_a_sigkill_between_tries_still_delivers_once(
        backing: tuple[str, str], pg: asyncpg.Connection, tmp_path: Path) -> None:
    env = {"TRACKER_WORKERS": "2", "TRACKER_POSTBACK_ALLOW_PRIVATE": "true",
           "TRACKER_POSTBACK_BACKOFF_MS": "2000", "TRACKER_CLAIM_IDLE_MS": "1000"}
    served = Served(backing, tmp_path / "data", **env)
    redis = aioredis.Redis.from_url(backing[1])
    again: Served | None = None
    try:
        async with receiving(Receiver(failures=1, status=500)) as receiver:
            await served.healthy()
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{served.base}/api/campaigns", headers={"Authorization": "Bearer k"},
                                     json={"slug": "kill", "destination_url": "https://s.example/?c={click_id}",
                                           "postback_url": receiver.url + TEMPLATE}) as r:
                    assert r.status == 201
                async with http.get(f"{served.base}/c/kill", allow_redirects=False) as r:
                    click = parse_qs(urlsplit(r.headers["Location"]).query)["c"][0]
                async with http.get(f"{served.base}/postback?click_id={click}&amount=3") as r:
                    conversion = (await r.json())["conversion_id"]
            # The first try fails; the service dies before the retry is due.
            assert await eventually(lambda: _calls(receiver), timeout=20)
            served.kill_everything()
            served.proc.wait()
            assert len(receiver.calls) == 1
            again = Served(backing, tmp_path / "data", prefix=served.prefix, port=served.port, **env)
            await again.healthy()

            async def delivered() -> bool:
                state = await pg.fetchval("SELECT state FROM postback_deliveries")
                return state == "delivered"
            assert await eventually(delivered, timeout=30)
            await asyncio.sleep(1.0)
            assert len(receiver.calls) == 2, receiver.calls
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{again.base}/api/conversions/{conversion}",
                                    headers={"Authorization": "Bearer k"}) as r:
                    view = await r.json()
            assert [t["http_status"] for t in view["postbacks"][0]["tries"]] == [500, 200]
            again.stop()
    finally:
        if again is not None:
            await again.close()
        await served.close(redis)
        await redis.aclose()


async def test_private_targets_are_refused_by_default(
        settings: Settings, pg: asyncpg.Connection) -> None:
    runner, s = await start(settings.with_(postback_backoff_ms=100))
    try:
        async with receiving(Receiver(failures=0)) as receiver:
            await s.create_campaign(slug="ssrf", postback_url=receiver.url + TEMPLATE)
            r = await s.click("ssrf")
            click = parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0]
            async with s.track.get(s.url(f"/postback?click_id={click}")) as answer:
                conversion = (await answer.json())["conversion_id"]

            async def finished() -> Any:
                _, view = await s.api("GET", f"/api/conversions/{conversion}")
                outbound = view.get("postbacks") or []
                return outbound and outbound[0]["state"] == "failed" and outbound[0]
            delivery = await eventually(finished, timeout=20)
            assert delivery, "the private target was not refused"
            assert "private" in (delivery["tries"][0]["error"] or "") or "loopback" in (
                delivery["tries"][0]["error"] or "")
            assert receiver.calls == []
    finally:
        await s.close()
        await runner.cleanup()

