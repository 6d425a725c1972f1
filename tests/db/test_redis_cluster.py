"""The service on a real Redis Cluster: three masters from Debian's `redis-server` (own ports,
own folder), two `tracker serve` instances on different ports in front of it, one PostgreSQL.

Without redis-server these tests skip with the install command as the reason, unless
TRACKER_REQUIRE_TOOLS=1 (CI) makes them fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tracker.redis_client import CLUSTER_SHARDS
from tracker.redis_keys import Keys

from ..conftest import BROWSER, Served, eventually

INSTALL = "apt-get install redis-server"
MASTERS = 3


def _require_tools() -> None:
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not found: {INSTALL}"
        if os.environ.get("TRACKER_REQUIRE_TOOLS") == "1":
            pytest.fail(f"TRACKER_REQUIRE_TOOLS=1 but: {reason}")
        pytest.skip(reason)


def _cluster_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports


def _ping(port: int) -> bool:
    done = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
    return done.stdout.strip() == "PONG"


def _cluster_ok(port: int) -> bool:
    done = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True,
                          text=True)
    return "cluster_state:ok" in done.stdout


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[int]]:
    """A 3-master Redis Cluster on ports of its own; its master ports."""
    _require_tools()
    ports = _cluster_ports(MASTERS)
    folder = tmp_path / "cluster"
    folder.mkdir()
    procs = []
    try:
        for port in ports:
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-node-timeout", "2000", "--dir", str(folder), "--save", "",
                 "--appendonly", "no", "--logfile", str(folder / f"{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not all(_ping(p) for p in ports):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True)
        assert created.returncode == 0, created.stdout + created.stderr
        while not all(_cluster_ok(p) for p in ports):
            assert time.monotonic() < deadline + 20, "the cluster never became ok"
            time.sleep(0.1)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cluster_url(ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


@pytest_asyncio.fixture(loop_scope="session")
async def two_instances(redis_cluster: list[int], backing: tuple[str, str], pg: asyncpg.Connection,
                        tmp_path: Path) -> AsyncIterator[tuple[Served, Served]]:
    prefix = f"c{uuid.uuid4().hex[:6]}:"
    env = {"REDIS_URL": cluster_url(redis_cluster), "TRACKER_WORKERS": "2",
           "TRACKER_BATCH_WAIT_MS": "20"}
    first = Served(backing, tmp_path / "a", prefix=prefix, **env)
    second = Served(backing, tmp_path / "b", prefix=prefix, **env)
    try:
        await first.healthy()
        await second.healthy()
        yield first, second
    finally:
        for served in (first, second):
            if served.proc.poll() is None:
                served.stop()


AUTH = {"Authorization": "Bearer k"}
# A browser's: bots never take a visitor's uniqueness.
AS_BROWSER = {"User-Agent": BROWSER}


async def _create(http: aiohttp.ClientSession, served: Served, slug: str) -> None:
    async with http.post(f"{served.base}/api/campaigns", headers=AUTH,
                         json={"slug": slug, "destination_url": "https://shop.example/?cid={click_id}"}) as r:
        assert r.status == 201, await r.text()


async def _click(http: aiohttp.ClientSession, served: Served, slug: str, visitor: str = "") -> str:
    cookies = {"tv": visitor} if visitor else {}
    async with http.get(f"{served.base}/c/{slug}", allow_redirects=False, cookies=cookies,
                        headers=AS_BROWSER) as r:
        assert r.status == 302, await r.text()
        return parse_qs(urlsplit(r.headers["Location"]).query)["cid"][0]


@pytest.mark.asyncio(loop_scope="session")
async def test_two_instances_on_a_cluster_store_every_click_once(
        two_instances: tuple[Served, Served], redis_cluster: list[int],
        pg: asyncpg.Connection) -> None:
    first, second = two_instances
    slug = f"cl{uuid.uuid4().hex[:6]}"
    # No cookie jar: each click without a cookie is a new visitor.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        await _create(http, first, slug)
        # The other instance learns of the campaign at once (the announcement on Redis).
        await _click(http, second, slug)
        answered = [await _click(http, (first, second)[i % 2], slug) for i in range(200)]
        # A returning visitor, through both instances: one unique click.
        visitor = "01JD0000000000000000000001"
        again = [await _click(http, served, slug, visitor) for served in (first, second, first)]
        # Read-your-writes: each instance finds a click the other answered a moment ago.
        async with http.get(f"{second.base}/api/clicks/{answered[0]}", headers=AUTH) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["click_id"] == answered[0]
        async with http.get(f"{first.base}/api/clicks/{answered[1]}", headers=AUTH) as r:
            assert r.status == 200, await r.text()

        everything = answered + again

        async def stored() -> bool:
            rows = await pg.fetch("SELECT c.id FROM clicks c JOIN campaigns k ON k.id = c.campaign_id"
                                  " WHERE k.slug = $1", slug)
            return len(rows) >= len(everything) + 1

        await eventually(stored, timeout=30)
        rows = await pg.fetch("SELECT c.id, c.is_unique, c.visitor_id FROM clicks c"
                              " JOIN campaigns k ON k.id = c.campaign_id WHERE k.slug = $1", slug)
        assert len(rows) == len(everything) + 1  # every answered click, each once
        returning = [r for r in rows if r["visitor_id"] == visitor]
        assert sorted(r["is_unique"] for r in returning) == [False, False, True]

        # Found from PostgreSQL once committed (the Redis copy is gone then).
        async with http.get(f"{first.base}/api/clicks/{answered[-1]}", headers=AUTH) as r:
            assert r.status == 200, await r.text()

    # The event streams are spread over the masters, and nothing of a stored click but its
    # uniqueness mark is left in Redis (the sets that named its entry for read-your-writes
    # are gone once it was committed).
    keys = Keys(first.prefix, CLUSTER_SHARDS, tagged=True)
    holders = set()
    copies = 0
    for port in redis_cluster:
        node = aioredis.Redis(port=port)
        try:
            names = {k.decode() for k in await node.keys(f"{first.prefix}*")}
        finally:
            await node.aclose()
        if names & set(keys.streams):
            holders.add(port)
        copies += sum(1 for n in names if "}recent:" in n)
    assert len(holders) > 1, holders
    assert copies == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_postbacks_and_lookups_on_a_cluster(two_instances: tuple[Served, Served],
                                                  pg: asyncpg.Connection) -> None:
    first, second = two_instances
    slug = f"cv{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession() as http:
        await _create(http, first, slug)
        await eventually(lambda: _answers(http, second, slug), timeout=10)
        clicks = [await _click(http, first, slug) for _ in range(20)]
        ids = []
        for i, click_id in enumerate(clicks):
            served = (first, second)[i % 2]
            async with http.get(f"{served.base}/postback",
                                params={"click_id": click_id, "txid": f"o{i}", "amount": "10"}) as r:
                body = await r.json()
                assert r.status == 200 and body["status"] == "accepted", body
                ids.append(body["conversion_id"])
            # The same postback again, through the other instance: a duplicate.
            other = (second, first)[i % 2]
            async with http.get(f"{other.base}/postback",
                                params={"click_id": click_id, "txid": f"o{i}", "amount": "10"}) as r:
                assert (await r.json())["status"] == "duplicate"
        # Looked up by id at once, before PostgreSQL has it or after.
        async with http.get(f"{second.base}/api/conversions/{ids[0]}", headers=AUTH) as r:
            assert r.status == 200, await r.text()

        async def stored() -> bool:
            return await pg.fetchval("SELECT count(*) FROM conversions WHERE id = ANY($1::uuid[])",
                                     [_uuid(i) for i in ids]) == len(ids)

        await eventually(stored, timeout=30)


async def _answers(http: aiohttp.ClientSession, served: Served, slug: str) -> bool:
    async with http.get(f"{served.base}/c/{slug}", allow_redirects=False) as r:
        return r.status == 302


def _uuid(ulid: str) -> str:
    from tracker.ids import decode_id
    return str(decode_id(ulid)[0])
