"""Worker CPU per click on the fast path, without the network, Redis or another process.

    python -m tests.bench.hotpath [--clicks 100000] [--connections 64] [--redis URL]

One process, one uvloop loop: `--connections` in-memory connections each send a click the
moment the answer to the previous one is written, the way wrk's keep-alive connections do.
Every byte goes through the real FastProtocol (httptools framing, the handler, the request
tracker, the metrics in prometheus_client's multiprocess mode as `tracker serve` runs them);
what stands in for the rest of the machine:
- the socket is an object that keeps nothing of what is written;
- the Redis step is the real EventBuffer when --redis is given (its round, its script),
  else a stand-in that answers every event of a tick together one tick later (the shape of
  the real one: each click still waits for the reply), so the figure is the Python work per
  click alone;
- the campaign is in memory, as the campaign cache holds it.

Two clicks: as wrk sends it (two headers), and as a browser sends it (fourteen, a referer and
our cookie). Prints CPU microseconds per click (the best of --runs, as timeit does: other
processes only ever add time), and the same for a fixed 302 written by a bare httptools
protocol through the same stand-in socket (the floor of any Python server here), with their
ratio. Only ratios taken in one run mean anything; on a shared machine even those move by
10-20 %, so compare code with callgrind's instruction counts when it matters (run a fixed
number of clicks twice, with different counts, and divide the difference).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

# As `tracker serve` sets it for its workers, before prometheus_client is first imported:
# a metric increment writes to a memory-mapped file in this mode.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="trkhp"))

import httptools  # noqa: E402
import uvloop  # noqa: E402
from aiohttp import web  # noqa: E402

from tracker.campaigns import Campaign  # noqa: E402
from tracker.fastpath import FastProtocol, FastServer  # noqa: E402
from tracker.ingest.spool import Spool  # noqa: E402
from tracker.ingest.track import RequestTracker  # noqa: E402
from tracker.ingest.visitor import Countries, UserAgents  # noqa: E402
from tracker.keys import CAMPAIGNS, SETTINGS, TRACKER  # noqa: E402
from tracker.settings import Settings  # noqa: E402

UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/120.0 Safari/537.36")
SLUG = "bench"


def click_request(browser: bool) -> bytes:
    """What wrk sends, or what a browser sends: a dozen headers, a referer, our cookie."""
    head = (f"GET /c/{SLUG}?sub1=bench&pub=42 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            f"User-Agent: {UA}\r\n")
    if browser:
        head += ("Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
                 "Accept-Language: en-US,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\n"
                 "Referer: https://news.example/article/123?utm=x\r\nConnection: keep-alive\r\n"
                 "Upgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n"
                 "Sec-Fetch-Mode: navigate\r\nSec-Fetch-Site: cross-site\r\n"
                 'sec-ch-ua: "Chromium";v="120", "Not?A_Brand";v="24"\r\n'
                 "sec-ch-ua-mobile: ?0\r\nsec-ch-ua-platform: \"Windows\"\r\n"
                 "Cookie: _ga=GA1.2.3; tv=01HZY3K8J2V6Q4N5M7P9R0S1T2; tlc=01HZY3K8J2V6Q4N5M7P9R0S1T3\r\n")
    return (head + "\r\n").encode()


class StubBuffer:
    """Answers every event of one tick together, one tick later, as the real buffer's round
    does when Redis answers at once."""

    def __init__(self) -> None:
        self._queued: list[Any] = []

    def _later(self, done: Any) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._answer)
        self._queued.append(done)

    def _answer(self) -> None:
        queued, self._queued = self._queued, []
        for done in queued:
            done(1)

    def stamp(self, click_id: str, campaign_id: int, visitor_id: str) -> str:
        return click_id  # one Redis: the id as made

    def add_click(self, click_id: str, campaign_id: int, visitor_id: str, is_bot: bool,
                  new_visitor: bool, line: str, done: Any) -> None:
        self._later(done)

    def add(self, impression_id: str, campaign_id: int, visitor_id: str, line: str,
            done: Any) -> None:
        self._later(done)


class Socket:
    """A transport that keeps nothing and asks for the next request once an answer is out."""

    def __init__(self, on_write: Any) -> None:
        self.on_write = on_write
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += 1
        self.on_write()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Bare(asyncio.Protocol):
    """A fixed 302 from httptools callbacks: the floor."""

    ANSWER = (b"HTTP/1.1 302 Found\r\nLocation: https://shop.example/lp\r\n"
              b"Content-Length: 0\r\n\r\n")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(self.ANSWER)


async def drive(make: Any, request: bytes, clicks: int, connections: int) -> float:
    """CPU seconds per click, `connections` connections sending back to back."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [clicks]

    def connect() -> None:
        protocol = make()

        def next_request() -> None:
            left[0] -= 1
            if left[0] > 0:
                loop.call_soon(protocol.data_received, request)
            elif not done.done():
                done.set_result(None)

        protocol.connection_made(Socket(next_request))
        loop.call_soon(protocol.data_received, request)

    started = time.process_time()
    for _ in range(connections):
        connect()
    await done
    return (time.process_time() - started) / clicks


async def tracker_app(redis_url: str) -> tuple[web.Application, Any]:
    settings = Settings(redis_url=redis_url, data_dir=Path(tempfile.mkdtemp(prefix="trkhp")))
    app = web.Application()
    app[SETTINGS] = settings
    row = {"id": 1, "slug": SLUG, "status": "active", "cost_model": "cpc",
           "cost_value": Decimal("0.10"), "currency": "USD",
           "fallback_url": None, "rotation": None,
           "destination_url": "https://shop.example/lp?cid={click_id}&s={sub1}&p={pub}"}
    campaign = Campaign.from_row(row)

    class Campaigns:
        loaded = True

        def get(self, slug: str) -> Campaign | None:
            return campaign if slug == SLUG else None

        async def find(self, slug: str) -> None:
            return None

    app[CAMPAIGNS] = Campaigns()  # type: ignore[assignment]
    closer = None
    if redis_url:
        import redis.asyncio as aioredis

        from tracker.ingest.buffer import EventBuffer, Keys
        from tracker.redis_pipe import RedisPipe

        client = aioredis.Redis.from_url(redis_url)
        keys = Keys(f"hp{os.getpid()}:")
        buffer: Any = EventBuffer(client, keys, 60, 60, RedisPipe(redis_url, 2.0))

        async def closer() -> None:
            await asyncio.sleep(0.5)  # the clicks still in flight when the count was reached
            await client.delete(keys.stream)
            await client.aclose()
    else:
        buffer = StubBuffer()
    spool = Spool(settings.data_dir / "hotpath-spool-unused", buffer)
    app[TRACKER] = RequestTracker(buffer, spool, UserAgents(), Countries("", ""), 0)
    return app, closer


async def main(args: argparse.Namespace) -> None:
    app, closer = await tracker_app(args.redis)
    server = FastServer(app, None)  # type: ignore[arg-type]
    make = lambda: FastProtocol(server)  # noqa: E731
    # Warm-up: caches filled, metric children made, code paths hot.
    await drive(make, click_request(False), 2000, args.connections)
    await drive(Bare, click_request(False), 2000, args.connections)
    rows = []
    for _ in range(args.runs):
        bare = await drive(Bare, click_request(False), args.clicks, args.connections)
        wrk = await drive(make, click_request(False), args.clicks, args.connections)
        browser = await drive(make, click_request(True), args.clicks, args.connections)
        rows.append((bare, wrk, browser))
    if closer is not None:
        await closer()
    # The best run, as timeit reports: other processes on the machine only ever add time.
    bare, wrk, browser = (min(column) for column in zip(*rows))
    us = 1e6
    print(f"{args.clicks} clicks x {args.runs} runs, {args.connections} connections, "
          f"Redis: {args.redis or 'stand-in'}; best run, CPU microseconds per click")
    print(f"{'bare httptools 302 (the floor)':<40} {bare * us:>8.1f} µs  1.00")
    print(f"{'click as wrk sends it (2 headers)':<40} {wrk * us:>8.1f} µs  {wrk / bare:>5.2f} x floor")
    print(f"{'click as a browser sends it (14)':<40} {browser * us:>8.1f} µs  "
          f"{browser / bare:>5.2f} x floor")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=50_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", default="", help="a Redis URL: the real buffer instead of "
                        "the stand-in (keys under a prefix of their own, deleted after)")
    uvloop.run(main(parser.parse_args()))
    sys.exit(0)
