"""The hot path's own HTTP/1.1 server: `GET|HEAD /c/{slug}` and `/i/{slug}` without a
framework in between.

A redirect is a few hundred bytes in and out; aiohttp's request and response machinery costs
several times what the tracking itself does. So each worker listens with this protocol:
it frames bodiless GET/HEAD requests for the tracking routes itself (httptools parses them),
asks handlers/tracking.py for the answer and writes it straight to the socket. The first
request on a connection that is anything else (the operator API, /metrics, a body) hands the
whole connection to aiohttp, which serves it from there on (tracking routes included, with the
same answers).

Requests on one connection are answered one at a time, in order (HTTP/1.1 pipelining is
honoured by reading the next only after answering the current).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from email.utils import formatdate
from typing import Any, cast
from urllib.parse import parse_qsl, unquote_to_bytes

import httptools
from aiohttp import web

from . import metrics
from .errors import ApiError, error_body
from .handlers.tracking import Answer, answer_click, answer_pixel, error_answer
from .ingest.track import VISITOR_COOKIE
from .ingest.visitor import Hit
from .keys import TRACKER
from .middleware import HANDLER_ARGS, MAX_HEADER, MAX_URL, JsonErrors

HOT_PREFIXES = (b"GET /c/", b"GET /i/", b"HEAD /c/", b"HEAD /i/")
LONGEST_PREFIX = max(len(p) for p in HOT_PREFIXES)
MAX_HEAD = 64 * 1024           # request line and headers
MAX_BUFFERED = 256 * 1024      # pipelined bytes held before we stop reading
KEEPALIVE_SECONDS = 75.0
REASONS = {200: b"OK", 302: b"Found", 400: b"Bad Request", 404: b"Not Found",
           414: b"URI Too Long", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error"}
ROUTES = {b"/c/": "/c/{slug}", b"/i/": "/i/{slug}"}


class _Head:
    """httptools callbacks: collect what a tracking hit needs from one request head."""

    __slots__ = ("url", "headers", "has_body", "keep_alive", "http10", "parser")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.has_body = False
        self.keep_alive = False
        self.http10 = False
        self.parser = httptools.HttpRequestParser(self)

    def on_headers_complete(self) -> None:
        # llhttp forgets `Connection: close` once the message is complete: ask now.
        self.keep_alive = self.parser.should_keep_alive()
        self.http10 = self.parser.get_http_version() == "1.0"

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding"):
            self.has_body = self.has_body or value.strip() not in (b"", b"0")
        if name == b"x-forwarded-for" and name in self.headers:
            # A proxy may add its own line instead of appending to the client's: every line
            # counts, in order, or the client's own line would name the visitor.
            self.headers[name] += b"," + value
            return
        # The first of any other repeated header wins, as in aiohttp's headers.get().
        self.headers.setdefault(name, value)


class FastServer:
    def __init__(self, app: web.Application, runner: web.AppRunner) -> None:
        self.app = app
        self.runner = runner
        self.connections: set[FastProtocol] = set()
        self.country_header = app[TRACKER].country_header.lower().encode()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.date = b""
        self._date_second = 0
        self._series: dict[tuple[str, bytes, int], tuple[Any, Any]] = {}

    def series(self, route: str, method: bytes, status: int) -> tuple[Any, Any]:
        """The request counter and latency histogram of one (route, method, status), looked
        up once: labels() costs as much as the increment itself."""
        key = (route, method, status)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = (
                metrics.HTTP_REQUESTS.labels(route, method.decode(), str(status)),
                metrics.HTTP_LATENCY.labels(route, str(status)))
        return found

    def http_date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self.date = formatdate(now, usegmt=True).encode()
        return self.date

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FastProtocol(self), host, port, reuse_port=True, backlog=2048)
        self._sweeper = asyncio.create_task(self._sweep(), name="fastpath-idle")

    async def stop(self, timeout: float) -> None:
        """Stop accepting; answer what is in flight; close the rest."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + timeout
        for conn in list(self.connections):
            conn.close_when_idle()
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            limit = time.monotonic() - KEEPALIVE_SECONDS
            for conn in list(self.connections):
                if not conn.busy and conn.last_active < limit:
                    conn.abort()


class FastProtocol(asyncio.Protocol):
    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closing = False
        self.write_paused = False
        self.read_paused = False
        self.peer = ""
        self.last_active = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_BUFFERED and self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        self._next()

    def eof_received(self) -> bool:
        self.closing = True
        if not self.busy:
            self.abort()
        return True  # we close the transport ourselves once the answer is out

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._next()

    # -- framing -----------------------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the next complete request in the buffer, if we are free to."""
        if self.busy or self.write_paused or self.transport is None:
            return
        buffer = self.buffer
        if not buffer:
            if self.closing:
                self.abort()
            return
        if not buffer.startswith(HOT_PREFIXES):
            if len(buffer) < LONGEST_PREFIX and any(p.startswith(buffer) for p in HOT_PREFIXES):
                return  # too little to tell yet
            self._hand_over()
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._fail(431, "headers_too_large", "the request head is too large")
            return
        head_bytes = bytes(buffer[:end + 4])
        head = _Head()
        parser = head.parser
        try:
            parser.feed_data(head_bytes)
        except httptools.HttpParserUpgrade:
            self._hand_over()
            return
        except httptools.HttpParserError:
            self._fail(400, "bad_request", "malformed HTTP request")
            return
        if head.has_body:
            self._hand_over()  # a body on a tracking GET: let the full server deal with it
            return
        del buffer[:end + 4]
        if self.read_paused and len(buffer) < MAX_BUFFERED // 2 and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        self.busy = True
        keep_alive = head.keep_alive
        method = parser.get_method()
        asyncio.get_running_loop().create_task(self._serve(method, head, keep_alive))

    def _hand_over(self) -> None:
        """Give this connection, and what it sent so far, to aiohttp for good."""
        transport = self.transport
        assert transport is not None
        self.server.connections.discard(self)
        manager = self.server.runner.server
        assert manager is not None
        # What manager() would make, but answering its parse errors in JSON.
        handler = JsonErrors(manager, loop=asyncio.get_running_loop(), **HANDLER_ARGS)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.read_paused:
            transport.resume_reading()
        if self.buffer:
            handler.data_received(bytes(self.buffer))
        self.buffer = bytearray()
        self.transport = None

    # -- answering ---------------------------------------------------------------------------

    async def _serve(self, method: bytes, head: _Head, keep_alive: bool) -> None:
        started = time.perf_counter()
        route = ROUTES[head.url[:3]]
        is_head = method == b"HEAD"
        try:
            answer = await self._answer(method, head)
        except Exception:  # noqa: BLE001 - the visitor still gets an answer
            self.server.app.logger.exception("tracking request failed")
            answer = Answer(500, [("Cache-Control", "no-store")],
                            error_body(500, "internal", "internal error"), "application/json")
        self._write(answer, keep_alive and not self.closing, is_head, head.http10)
        requests, latency = self.server.series(route, method, answer.status)
        requests.inc()
        latency.observe(time.perf_counter() - started)
        self.busy = False
        self.last_active = time.monotonic()
        if not keep_alive or self.closing:
            self.abort(graceful=True)
        else:
            self._next()

    async def _answer(self, method: bytes, head: _Head) -> Answer:
        url = head.url
        if len(url) > MAX_URL:
            return error_answer(ApiError(414, "uri_too_long", f"the URL must be at most {MAX_URL} bytes"))
        if any(len(v) > MAX_HEADER for v in head.headers.values()):
            return error_answer(ApiError(431, "headers_too_large",
                                   f"a header must be at most {MAX_HEADER} bytes"))
        path, _, query = url.partition(b"?")
        path, _, _ = path.partition(b"#")
        headers = head.headers
        hit = Hit(
            method=method.decode(),
            slug=unquote_to_bytes(path[3:]).decode("utf-8", "replace"),
            query=_query(query),
            peer=self.peer,
            user_agent=_text(headers.get(b"user-agent")),
            referer=_text(headers.get(b"referer")),
            visitor_cookie=_cookie(headers.get(b"cookie"), VISITOR_COOKIE),
            forwarded_for=_text(headers.get(b"x-forwarded-for")),
            country_header=_text(headers.get(self.server.country_header))
            if self.server.country_header else "",
        )
        app = self.server.app
        return await (answer_click(app, hit) if path[1:2] == b"c" else answer_pixel(app, hit))

    def _write(self, answer: Answer, keep_alive: bool, is_head: bool, http10: bool = False) -> None:
        if self.transport is None:
            return  # the visitor left; what was recorded stays recorded
        parts = [b"HTTP/1.1 ", str(answer.status).encode(), b" ",
                 REASONS.get(answer.status, b"Unknown"), b"\r\nDate: ", self.server.http_date(),
                 b"\r\nContent-Length: ", str(len(answer.body)).encode(), b"\r\n"]
        if answer.content_type:
            parts += [b"Content-Type: ", answer.content_type.encode(), b"\r\n"]
        for name, value in answer.headers:
            if "\r" in value or "\n" in value:
                continue  # never let a value split the head
            parts += [name.encode(), b": ", value.encode(), b"\r\n"]
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif http10:
            parts.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
        parts.append(b"\r\n")
        if not is_head:
            parts.append(answer.body)
        self.transport.write(b"".join(parts))

    def _fail(self, status: int, code: str, message: str) -> None:
        self._write(error_answer(ApiError(status, code, message)), keep_alive=False, is_head=False)
        self.abort(graceful=True)

    # -- closing -----------------------------------------------------------------------------

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy:
            self.abort(graceful=True)

    def abort(self, graceful: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        self.server.connections.discard(self)
        if graceful:
            transport.close()  # flushes what was written
        else:
            transport.abort()
        self.transport = None


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _query(raw: bytes) -> dict[str, str]:
    """First value of each parameter, decoded as aiohttp does ('+' is a space, bytes that are
    not UTF-8 become U+FFFD, which read_params refuses by name)."""
    params: dict[str, str] = {}
    if raw:
        text = raw.decode("utf-8", "replace")
        for name, value in parse_qsl(text, keep_blank_values=True, errors="replace"):
            params.setdefault(name, value)
    return params


def _cookie(header: bytes | None, name: str) -> str:
    if not header:
        return ""
    prefix = name + "="
    for part in header.decode("latin-1").split(";"):
        part = part.strip()
        if part.startswith(prefix):
            return part[len(prefix):].strip('"')
    return ""


@contextlib.asynccontextmanager
async def serving(app: web.Application, runner: web.AppRunner, host: str, port: int,
                  timeout: float) -> Any:
    fast = FastServer(app, runner)
    await fast.start(host, port)
    try:
        yield fast
    finally:
        await fast.stop(timeout)
