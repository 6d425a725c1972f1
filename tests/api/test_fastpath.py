"""The tracking fast path speaks HTTP/1.1 itself: framing, pipelining, handing a connection
over to aiohttp, and answers identical to aiohttp's for the same request."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import asyncpg
import httptools
import pytest

from tracker import fastpath
from tracker.handlers.tracking import GIF
from tracker.settings import Settings

from ..conftest import AUTH, BROWSER, Running, eventually, start


async def raw(service: Running, payload: bytes, read_until_close: bool = True,
              eof: bool = False) -> bytes:
    """Send payload (then close our side when eof), read the answers."""
    reader, writer = await asyncio.open_connection(service.settings.host, service.settings.port)
    writer.write(payload)
    if eof:
        writer.write_eof()
    await writer.drain()
    if read_until_close:
        data = await asyncio.wait_for(reader.read(), 10)
    else:
        data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return data


def responses(data: bytes) -> list[tuple[int, dict[str, list[str]], bytes]]:
    """Split a stream of HTTP/1.1 responses (all with Content-Length)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            headers.setdefault(name.lower(), []).append(value)
        length = int(headers.get("content-length", ["0"])[0])
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return out


async def test_both_servers_answer_a_click_alike(service: Running) -> None:
    await service.create_campaign(slug="alike")
    fast = await service.click("alike", "sub1=a")
    # service.http's connection went to aiohttp when it created the campaign.
    async with service.http.get(service.url("/c/alike?sub1=a"), allow_redirects=False) as slow:
        await slow.read()
    for r in (fast, slow):
        assert r.status == 302
        assert r.headers["Location"].startswith("https://shop.example/lp?cid=")
        assert r.headers["Cache-Control"] == "no-store"
        cookies = sorted(h.split("=", 1)[0] for h in r.headers.getall("Set-Cookie"))
        assert cookies == ["tlc", "tv"]
    assert [h.split(";", 1)[1] for h in fast.headers.getall("Set-Cookie")] == \
        [h.split(";", 1)[1] for h in slow.headers.getall("Set-Cookie")]
    for path in ["/c/none", "/c/alike?sub1=" + "x" * 300]:
        async with service.track.get(service.url(path), allow_redirects=False) as a:
            fast_body = await a.json()
        async with service.http.get(service.url(path), allow_redirects=False) as b:
            slow_body = await b.json()
        assert (a.status, fast_body) == (b.status, slow_body)


async def test_pipelined_requests_are_answered_in_order(service: Running) -> None:
    await service.create_campaign(slug="pipe", destination_url="https://shop.example/?s={sub1}")
    ua = f"User-Agent: {BROWSER}\r\n".encode()
    payload = b"".join(
        b"GET /c/pipe?sub1=" + str(i).encode() + b" HTTP/1.1\r\nHost: t\r\n" + ua + b"\r\n"
        for i in range(5)) + b"GET /i/pipe HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    got = responses(await raw(service, payload))
    assert [status for status, _, _ in got] == [302] * 5 + [200]
    assert [h["location"][0].rsplit("=", 1)[1] for _, h, _ in got[:5]] == [str(i) for i in range(5)]
    assert got[5][1]["content-type"] == ["image/gif"] and got[5][2] == GIF
    assert got[5][1]["connection"] == ["close"]


async def test_a_connection_is_handed_to_aiohttp_mid_stream(service: Running) -> None:
    await service.create_campaign(slug="mixed")
    payload = (b"GET /c/mixed HTTP/1.1\r\nHost: t\r\n\r\n"
               b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
               b"GET /api/campaigns HTTP/1.1\r\nHost: t\r\nAuthorization: "
               + AUTH["Authorization"].encode() + b"\r\nConnection: close\r\n\r\n")
    data = await raw(service, payload)
    assert data.count(b"HTTP/1.1 ") == 3
    assert data.startswith(b"HTTP/1.1 302 Found")
    assert b'{"status":"ok"}' in data and b'"slug":"mixed"' in data


async def test_headers_are_read_whatever_their_case_order_and_lookalikes(
        service: Running, pg: asyncpg.Connection) -> None:
    """The fast path finds the headers it reads in the head itself: a name in any case, the
    first of a repeated one, never a header whose name merely contains it."""
    await service.create_campaign(slug="hdr")
    iphone = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")
    visitor = "01HZY3K8J2V6Q4N5M7P9R0S1T2"
    data = await raw(service, (
        "GET /c/hdr HTTP/1.1\r\nHost: t\r\nX-User-Agent: curl/8.5.0\r\n"
        f"user-AGENT:  \t{iphone}\r\nUser-Agent: curl/8.5.0\r\n"
        "X-Referer: https://x.example/\r\nREFERER: https://news.example/a?b=c\r\n"
        "Cookie2: tv=01AAAAAAAAAAAAAAAAAAAAAAAA\r\n"
        f"cookie: a=b; tv={visitor}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n").encode())
    ((status, headers, _),) = responses(data)
    assert status == 302 and "server" not in headers  # answered by the fast path
    assert headers["set-cookie"][0].startswith(f"tv={visitor};")

    async def stored() -> asyncpg.Record | None:
        return await pg.fetchrow("SELECT user_agent, referer, device, is_bot, visitor_id "
                                 "FROM clicks")

    row = await eventually(stored)
    assert row is not None
    assert dict(row) == {"user_agent": iphone, "referer": "https://news.example/a?b=c",
                         "device": "mobile", "is_bot": False, "visitor_id": visitor}


async def test_http_1_0_head_and_bodies(service: Running) -> None:
    await service.create_campaign(slug="old")
    got = responses(await raw(service, b"GET /c/old HTTP/1.0\r\n\r\n"))
    assert got[0][0] == 302 and got[0][1]["connection"] == ["close"]
    data = await raw(service, b"GET /c/old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                     read_until_close=False)
    assert b"Connection: keep-alive\r\n" in data
    got = responses(await raw(service, b"HEAD /i/old HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
    assert got[0][0] == 200 and got[0][1]["content-length"] == [str(len(GIF))]
    assert got[0][2] == b""
    # A body on a tracking route: aiohttp takes the connection and refuses the method.
    data = await raw(service, b"POST /c/old HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                              b"Connection: close\r\n\r\nhi")
    assert data.startswith(b"HTTP/1.1 405")
    assert b'"code":"method_not_allowed"' in data


async def test_garbage_gets_a_json_400_and_the_connection_closes(service: Running) -> None:
    data = await raw(service, b"GET /c/x HTTP/1.1\r\nBad Header Line\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"code":"bad_request"' in data
    data = await raw(service, b"GET /c/" + b"x" * 70_000)
    assert data.startswith(b"HTTP/1.1 414")  # a URL too long, not a head


async def test_aiohttp_answers_what_it_cannot_parse_in_json(service: Running) -> None:
    """A connection handed to aiohttp (its first request was /healthz) that then sends a
    malformed request gets the contract's JSON error, not aiohttp's text/plain."""
    reader, writer = await asyncio.open_connection(service.settings.host, service.settings.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 10)
    assert first.startswith(b"HTTP/1.1 200")
    writer.write(b"GET /healthz HTTP/1.1\r\nBad Header Line\r\n\r\n")
    got = responses(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert len(got) == 1
    status, headers, body = got[0]
    assert status == 400
    assert headers["content-type"][0].startswith("application/json")
    assert body.startswith(b'{"error":{"code":"bad_request"')


async def test_bare_lf_line_ends_get_a_400_at_once(service: Running) -> None:
    """llhttp refuses a bare LF as soon as it sees it; nothing waits for a CRLFCRLF that will
    never come."""
    data = await raw(service, b"GET /c/x HTTP/1.1\nHost: t\n\n")
    assert data.startswith(b"HTTP/1.1 400")
    assert b"Content-Type: application/json" in data and b'"code":"bad_request"' in data


async def test_head_limits_hold_however_the_head_arrives(service: Running) -> None:
    # A complete head over 64 KiB in one read, every header under 8 KiB.
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 7000) for i in range(10))
    data = await raw(service, b"GET /c/x HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
    assert data.startswith(b"HTTP/1.1 431") and b'"code":"headers_too_large"' in data
    # A URL over 8 KiB is refused as soon as that much of it has come, before it ends...
    data = await raw(service, b"GET /c/x?gclid=" + b"g" * 9000)
    assert data.startswith(b"HTTP/1.1 414") and b'"code":"uri_too_long"' in data
    # ...and so is a header line that has already outgrown any header.
    data = await raw(service, b"GET /c/x HTTP/1.1\r\nX-Big: " + b"b" * 20_000)
    assert data.startswith(b"HTTP/1.1 431") and b'"code":"headers_too_large"' in data


async def test_pipelined_requests_before_the_clients_eof_are_all_answered(
        service: Running) -> None:
    await service.create_campaign(slug="eof", destination_url="https://shop.example/?s={sub1}")
    payload = b"".join(b"GET /c/eof?sub1=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(3))
    got = responses(await raw(service, payload, eof=True))
    assert [status for status, _, _ in got] == [302] * 3
    assert [h["location"][0].rsplit("=", 1)[1] for _, h, _ in got] == ["0", "1", "2"]
    assert "connection" not in got[0][1] and got[2][1]["connection"] == ["close"]


async def test_a_head_sent_a_byte_at_a_time_costs_linear_work(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read used to search the whole head received so far for its end: a head that
    trickles in cost quadratic work. Count what is searched and what is fed to the parser:
    each byte once or twice, whatever the size of the head, raw UTF-8 in its URL included
    (that request is parsed again from its start once, its request line percent-encoded)."""
    fed = 0
    real_parser = httptools.HttpRequestParser

    class CountingParser:
        def __init__(self, protocol: object) -> None:
            self.parser = real_parser(protocol)

        def feed_data(self, data: bytes) -> None:
            nonlocal fed
            fed += len(data)
            self.parser.feed_data(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.parser, name)

    class CountingBuffer(bytearray):
        searched = 0

        def find(self, sub: Any, start: Any = 0, *rest: Any) -> int:
            CountingBuffer.searched += len(self) - (start or 0)
            return super().find(sub, start, *rest)

    monkeypatch.setattr(fastpath, "httptools", SimpleNamespace(
        **(vars(httptools) | {"HttpRequestParser": CountingParser})))
    runner, running = await start(settings)
    try:
        await running.create_campaign(slug="slow")
        reader, writer = await asyncio.open_connection(settings.host, settings.port)
        for _ in range(100):
            if runner.fast.connections:
                break
            await asyncio.sleep(0.01)
        (protocol,) = runner.fast.connections
        protocol.buffer = CountingBuffer(protocol.buffer)
        headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 900) for i in range(40))
        payload = (b"GET /c/slow?sub1=a&q=" + "é".encode() * 1200 + b" HTTP/1.1\r\n"
                   b"Host: t\r\nUser-Agent: " + BROWSER.encode()
                   + b"\r\n" + headers + b"Connection: close\r\n\r\n")
        for i in range(len(payload)):  # one read per byte
            protocol.data_received(payload[i:i + 1])
        got = responses(await asyncio.wait_for(reader.read(), 10))
        writer.close()
        assert [status for status, _, _ in got] == [302]
        # The URL's 2,400 raw bytes are fed as 7,200 percent-encoded ones.
        assert fed + CountingBuffer.searched <= 3 * len(payload), \
            (fed, CountingBuffer.searched, len(payload))
    finally:
        await running.close()
        await runner.cleanup()


async def test_at_the_connection_cap_the_longest_idle_connection_makes_room(
        settings: Settings) -> None:
    assert Settings.from_env({}).max_connections == 10_000
    assert Settings.from_env({"TRACKER_MAX_CONNECTIONS": "5"}).max_connections == 5
    runner, running = await start(settings.with_(max_connections=2))
    host, port = settings.host, settings.port
    get = b"GET /c/cap HTTP/1.1\r\nHost: t\r\n"
    opened = []

    async def until(check: Any) -> None:
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the server never got there")

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, port)
        opened.append(writer)
        return reader, writer

    try:
        await running.create_campaign(slug="cap")  # on a connection aiohttp took: not counted
        a_in, a_out = await connect()              # answered, then kept alive: idle
        a_out.write(get + b"\r\n")
        assert (await asyncio.wait_for(a_in.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 302")
        b_in, b_out = await connect()              # mid-request: not idle
        b_out.write(get)
        await until(lambda: len(runner.fast.connections) == 2 and len(runner.fast.idle) == 1)
        c_in, c_out = await connect()              # at the cap: A makes room
        assert await asyncio.wait_for(a_in.read(), 10) == b""
        c_out.write(get)
        await until(lambda: len(runner.fast.connections) == 2 and not runner.fast.idle)
        d_in, _ = await connect()                  # at the cap, nobody idle: refused
        assert await asyncio.wait_for(d_in.read(), 10) == b""
        for reader, writer in ((b_in, b_out), (c_in, c_out)):  # B and C are still served
            writer.write(b"Connection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 302")
    finally:
        for writer in opened:
            writer.close()
        await running.close()
        await runner.cleanup()
