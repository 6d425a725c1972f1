"""SIGKILL of the whole service while postbacks stream in: every `accepted` answer is one
conversion row, none doubled, and the same postbacks sent again after the restart are all
duplicates."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from tracker.ids import uuid_to_id

from ..conftest import BROWSER, Served, eventually

CLICKS = 400


async def make_clicks(base: str, slug: str, n: int) -> list[str]:
    ids = []
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
        for _ in range(n):
            async with http.get(f"{base}/c/{slug}", allow_redirects=False) as r:
                ids.append(parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0])
    return ids


async def stream_postbacks(base: str, queries: list[str], concurrency: int = 50) -> dict[str, list[str]]:
    """Send each query once; return outcome → conversion ids of the answers that came back."""
    answers: dict[str, list[str]] = {"accepted": [], "duplicate": [], "updated": []}
    todo = iter(queries)
    async with aiohttp.ClientSession() as http:
        async def worker() -> None:
            for query in todo:
                try:
                    async with http.get(f"{base}/postback?{query}") as r:
                        if r.status == 200:
                            body = await r.json()
                            answers[body["status"]].append(body["conversion_id"])
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    continue
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return answers


async def test_sigkill_while_postbacks_stream_in(backing: tuple[str, str], pg: asyncpg.Connection,
                                                  tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"TRACKER_WORKERS": "2", "TRACKER_CLAIM_IDLE_MS": "2000"}
    served = Served(backing, data, "conv", **env)
    redis = aioredis.Redis.from_url(backing[1])
    again: Served | None = None
    try:
        await served.ready()
        clicks = await make_clicks(served.base, "conv", CLICKS)
        rng = random.Random(7)
        # Each click: a sale; most also repeated, some approved after pending.
        queries = []
        for i, click in enumerate(clicks):
            first = f"click_id={click}&event=sale&txid=T{i}&amount=1&status=pending"
            queries += [first, first]
            if rng.random() < 0.5:
                queries.append(f"click_id={click}&event=sale&txid=T{i}&amount=1&status=approved")
        queries = queries * 4
        rng.shuffle(queries)

        async def kill_everything() -> None:
            await asyncio.sleep(0.8)
            served.kill_everything()

        killer = asyncio.create_task(kill_everything())
        before = await stream_postbacks(served.base, queries)
        await killer
        served.proc.wait()
        accepted = before["accepted"]
        assert accepted, "no postback was answered before the kill"
        assert len(accepted) == len(set(accepted)), "a conversion was accepted twice"

        again = Served(backing, data, prefix=served.prefix, port=served.port, **env)
        await again.healthy()

        async def all_in() -> bool:
            stored = {uuid_to_id(r["id"]) for r in await pg.fetch("SELECT id FROM conversions")}
            return set(accepted) <= stored
        assert await eventually(all_in, timeout=30)

        # Everything once more, after the restart: what was accepted before is a duplicate
        # now (or a refused step back from approved to pending), never accepted again.
        after = await stream_postbacks(again.base, sorted(set(queries)))
        assert not set(after["accepted"]) & set(accepted)
        # Every conversion got an answer now: exactly those are stored, once each (one whose
        # answer died with the killed process is stored too, and is a duplicate now).
        everything = {i for ids in after.values() for i in ids}
        assert len(everything) == CLICKS and set(accepted) <= everything

        async def settled() -> bool:
            stored = [uuid_to_id(r["id"]) for r in await pg.fetch("SELECT id FROM conversions")]
            backlog = await redis.xlen(f"{served.prefix}events")
            return sorted(stored) == sorted(everything) and backlog == 0
        assert await eventually(settled, timeout=30)
        # The rollups equal a recount of the rows: no change folded twice.
        rows = await pg.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'approved') AS approved, "
            "count(*) FILTER (WHERE status = 'pending') AS pending FROM conversions")
        rolled = await pg.fetchrow(
            "SELECT sum(conversions) AS approved, sum(pending_conversions) AS pending "
            "FROM conversion_rollup_15m WHERE basis = 'conversion'")
        assert (rolled["approved"], rolled["pending"]) == (rows["approved"], rows["pending"])
        gaps = await pg.fetchval(
            "SELECT count(*) FROM (SELECT conversion_id, max(version) AS top, count(*) AS n "
            "FROM conversion_history GROUP BY 1) h WHERE top <> n")
        assert gaps == 0
        again.stop()
    finally:
        if again is not None:
            await again.close()
        await served.close(redis)
        await redis.aclose()
