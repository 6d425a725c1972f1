"""The hot path's own HTTP/1.1 server: `GET|HEAD /c/{slug}` and `/i/{slug}` without a
framework in between.

A redirect is a few hundred bytes in and out; aiohttp's request and response machinery costs
several times what the tracking itself does. So each worker listens with this protocol: it
frames bodiless GET/HEAD requests for the tracking routes itself, asks handlers/tracking.py for
the answer and writes it straight to the socket. The first request on a connection that is
anything else (the operator API, /metrics, a body) hands the connection, from that request's
first byte on, to aiohttp, which serves it from there on (tracking routes included, with the
same answers).

Framing: one httptools (llhttp) parser per connection is fed each read as it arrives, and its
callbacks collect each request. Every byte is fed once (twice at most for a request with raw
UTF-8 in its URL, see _parse), so a head trickling in a byte at a time costs linear work. llhttp reports no byte offsets, but a head it accepted in strict mode (no
bare LF, no CR inside a line) ends at the first CRLFCRLF after its start: that is searched once
per head, when llhttp says the head is complete, never per read. So the raw bytes of a request
to hand over are known without parsing anything twice.

Headers are not taken from llhttp one callback each (a browser sends a dozen, each a Python
call): once llhttp has accepted the head, the few headers the tracking routes read are found
in it by one regular expression. In strict mode every header line is `name:` OWS value CRLF,
with no CR, LF or control character inside a value, so a line starts right after each CRLF;
values are what llhttp would give (leading whitespace dropped, trailing kept).

Requests on one connection are answered one at a time, in order: complete requests are queued
as they arrive (pipelining), and what a client sent before closing its side is answered too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from email.utils import formatdate
from typing import Any, NoReturn, cast
from urllib.parse import parse_qsl, unquote_to_bytes

import httptools
from aiohttp import web

from . import metrics
from .errors import ApiError
from .handlers.postback import address_of, answer_postback
from .handlers.postback import answer_pixel as answer_conversion_pixel
from .handlers.tracking import INTERNAL, Answer, Tracking, error_answer
from .ingest.track import VISITOR_COOKIE
from .ingest.visitor import Hit
from .keys import SETTINGS, TRACKER
from .middleware import HANDLER_ARGS, MAX_HEADER, MAX_URL, JsonErrors

MAX_HEAD = 64 * 1024           # request line and headers
# A line of the head still unfinished at this length holds a header name or value over
# MAX_HEADER (or a URL over MAX_URL): refused before it ends. (httptools joins the pieces of a
# header itself, each time one more arrives: the cut keeps that work bounded per byte.)
MAX_LINE = 2 * MAX_HEADER + 8
MAX_BUFFERED = 256 * 1024      # pipelined bytes held before we stop reading
KEEPALIVE_SECONDS = 75.0
REASONS = {200: b"OK", 302: b"Found", 400: b"Bad Request", 401: b"Unauthorized",
           404: b"Not Found", 405: b"Method Not Allowed", 409: b"Conflict",
           414: b"URI Too Long", 422: b"Unprocessable Content",
           431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           503: b"Service Unavailable"}
# Each answer's first bytes, up to the Date header's value.
STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\nDate: " % (status, reason)
                for status, reason in REASONS.items()}
CLICK_ROUTE = "/c/{slug}"
PIXEL_ROUTE = "/i/{slug}"
ROUTES = {b"/c/": CLICK_ROUTE, b"/i/": PIXEL_ROUTE}
# Conversions by GET: whole paths (a body, a POST, goes to aiohttp).
CONVERSION_ROUTES = {b"/postback": "/postback", b"/click.php": "/click.php",
                     b"/conversion.gif": "/conversion.gif"}
LAST_CLICK = "tlc"
HOT_METHODS = (b"GET", b"HEAD")
METHOD_NAMES = {b"GET": "GET", b"HEAD": "HEAD"}
FORWARDED_FOR = b"x-forwarded-for"
BODY_HEADERS = (b"content-length", b"transfer-encoding")
# What the tracking and conversion answers read (and the configured country header).
READ_HEADERS = (b"user-agent", b"referer", b"cookie", FORWARDED_FOR) + BODY_HEADERS

# What the connection does with what arrives next.
FEED = 0        # parse it
KEEP = 1        # keep it for aiohttp: a request to hand over is queued
DROP = 2        # ignore it: the last request this connection will answer is queued


class _Request:
    """One request as the parser's callbacks collect it."""

    __slots__ = ("url_parts", "url_len", "headers", "forwarded", "method", "url",
                 "keep_alive", "http10", "size", "route", "started")

    def __init__(self) -> None:
        self.url_parts: list[bytes] = []
        self.url_len = 0
        self.headers: dict[bytes, bytes] = {}    # lower-case name: first value (those we read)
        self.forwarded: list[bytes] | None = None  # every X-Forwarded-For line, in order
        self.method = b""
        self.url = b""
        self.keep_alive = False
        self.http10 = False
        self.size = 0               # bytes of its head
        self.route = ""             # the route it is answered under (metrics' label)
        self.started = 0.0          # when its answer began to be decided


class _Refusal:
    """An error answer that ends the connection."""

    __slots__ = ("status", "code", "message")

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message


class _HandOver:
    """Hand the connection to aiohttp from here on."""


HAND_OVER = _HandOver()
MALFORMED = _Refusal(400, "bad_request", "malformed HTTP request")
URL_TOO_LONG = _Refusal(414, "uri_too_long", f"the URL must be at most {MAX_URL} bytes")
HEADER_TOO_LARGE = _Refusal(431, "headers_too_large",
                            f"a header must be at most {MAX_HEADER} bytes")
HEAD_TOO_LARGE = _Refusal(431, "headers_too_large",
                          f"the request head must be at most {MAX_HEAD} bytes")
_Item = _Request | _Refusal | _HandOver


_HIGH = re.compile(rb"[\x80-\xff]")


def _escape(raw: bytearray) -> bytes:
    return _HIGH.sub(lambda byte: b"%%%02X" % byte[0][0], raw)


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; what happens next is queued."""


class FastServer:
    def __init__(self, app: web.Application, runner: web.AppRunner) -> None:
        self.app = app
        self.runner = runner
        self.connections: set[FastProtocol] = set()
        # Those waiting for a request (new, or kept alive after an answer), longest first: at
        # the cap the first makes room, as nginx reuses its idle connections.
        self.idle: dict[FastProtocol, None] = {}
        self.max_connections = app[SETTINGS].max_connections
        self.country_header = app[TRACKER].country_header.lower().encode()
        self.tracking = Tracking(app)
        names = READ_HEADERS + ((self.country_header,) if self.country_header else ())
        # Run over the lower-cased head: group 1 the name, group 2 the value (leading
        # whitespace left out, trailing kept, as llhttp gives it). One pass: a search per
        # name costs more, and a callback per header more again (measured in instructions).
        self.header_lines = re.compile(
            rb"\r\n(" + b"|".join(map(re.escape, names)) + rb"):[ \t]*([^\r]*)")
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

    def make_room(self) -> bool:
        """Close the connection that has waited longest for a request, if one is waiting."""
        oldest = next(iter(self.idle), None)
        if oldest is None:
            return False
        oldest.abort(graceful=True)
        return True

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
    __slots__ = ("server", "transport", "parser", "request", "queue", "held", "buffer", "start",
                 "head_end", "line", "reading", "escaping", "reparsed", "busy", "closing", "eof", "write_paused",
                 "read_paused", "peer", "last_active", "current", "_on_answer")

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request = _Request()           # the one being parsed
        self.queue: deque[_Item] = deque()  # parsed, waiting for their answer
        self.held = 0                       # bytes of the queued requests' heads
        # Raw bytes from the start of the request being parsed (what aiohttp gets if it is
        # not ours); complete requests are cut off after each read.
        self.buffer = bytearray()
        self.start = 0                      # where that request starts in buffer
        self.head_end = 0                   # where its head ends, once complete
        self.line = 0                       # bytes of the head's line that has not ended
        self.reading = FEED
        self.escaping = False               # percent-encode bytes >= 0x80 until the line ends
        self.reparsed = False               # the request being parsed started over already
        self.busy = False
        self.closing = False                # the server is stopping
        self.eof = False                    # the client closed its side
        self.write_paused = False
        self.read_paused = False
        self.peer = ""
        self.last_active = time.monotonic()
        self.current: _Request | None = None  # the click or impression being decided
        self._on_answer = self._answered      # bound once, handed to every decision

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        if len(server.connections) >= server.max_connections and not server.make_room():
            transport.close()  # every connection is mid-request: refuse this one
            return
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        server.connections.add(self)
        server.idle[self] = None

    def data_received(self, data: bytes) -> None:
        reading = self.reading
        if reading != FEED:
            if reading == KEEP:
                self.buffer += data
                self._pause_if_full()
            return
        self.server.idle.pop(self, None)
        buffer = self.buffer
        buffer += data
        lf = data.rfind(b"\n")  # from the end: one step for a read that ends a head
        self.line = self.line + len(data) if lf < 0 else len(data) - lf - 1
        self._parse(data)
        if self.start:
            del buffer[:self.start]  # the requests that ended in this read
            self.start = 0
        if self.reading == FEED and (len(buffer) > MAX_HEAD or self.line > MAX_LINE):
            # Checked on every read: too much has come without the head, or a line, ending.
            self._refuse(HEAD_TOO_LARGE if len(buffer) > MAX_HEAD else HEADER_TOO_LARGE)
        if self.held + len(buffer) > MAX_BUFFERED:
            self._pause_if_full()
        self._next()

    def _parse(self, data: bytes) -> None:
        """Feed what arrived to the parser.

        llhttp refuses raw bytes >= 0x80 in a URL, but networks send raw UTF-8 in click URLs:
        the request that has them is parsed again from its first byte by a new parser, once,
        with the bytes >= 0x80 of its request line percent-encoded (the query is then read as
        UTF-8, and what is not UTF-8 refused by name, as for %XX). The bytes that follow in the
        request line are encoded as they arrive: every byte is still fed at most twice."""
        offset = -1  # -1: data, as it came
        while True:
            try:
                if self.escaping:
                    self._feed_escaped(len(self.buffer) - len(data) if offset < 0 else offset)
                elif offset < 0:
                    self.parser.feed_data(data)
                else:
                    with memoryview(self.buffer) as view, view[offset:] as rest:
                        self.parser.feed_data(rest)
                return
            except httptools.HttpParserInvalidURLError:
                offset = self._first_byte()
                line_end = self.buffer.find(b"\n", offset)
                if self.reparsed or not _HIGH.search(
                        self.buffer, offset, len(self.buffer) if line_end < 0 else line_end):
                    self._refuse(MALFORMED)
                    return
                self.parser = httptools.HttpRequestParser(self)
                self.reparsed = self.escaping = True
            except httptools.HttpParserCallbackError as exc:
                if self.reading == FEED:  # not one of our stops: a bug in a callback
                    self.server.app.logger.error("fast path parser callback failed",
                                                 exc_info=exc.__context__)
                    self._refuse(_Refusal(500, "internal", "internal error"))
                return
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                self._refuse(MALFORMED)
                return

    def _feed_escaped(self, offset: int) -> None:
        """Feed buffer[offset:], its bytes >= 0x80 percent-encoded up to the request line's end."""
        buffer = self.buffer
        line_end = buffer.find(b"\n", offset)
        if line_end < 0:
            self.parser.feed_data(_escape(buffer[offset:]))
            return
        self.parser.feed_data(_escape(buffer[offset:line_end]))
        self.escaping = False
        with memoryview(buffer) as view, view[line_end:] as rest:
            self.parser.feed_data(rest)

    def _first_byte(self) -> int:
        """Where the request being parsed starts in buffer: after any blank lines before it."""
        buffer = self.buffer
        first = self.start
        while first < len(buffer) and buffer[first] in b"\r\n":
            first += 1
        return first

    def eof_received(self) -> bool:
        # What was complete is still answered; a request cut short never will be.
        self.eof = True
        if not self.busy and not self.queue:
            self.abort(graceful=True)
        return True  # we close the transport ourselves once the answers are out

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._next()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = _Request()

    def on_url(self, url: bytes) -> None:
        request = self.request
        request.url_len += len(url)
        if request.url_len > MAX_URL:
            self._stop(URL_TOO_LONG)  # at once: the rest of the URL is not waited for
        request.url_parts.append(url)

    def on_headers_complete(self) -> None:
        request = self.request
        parser = self.parser
        buffer = self.buffer
        # The head is complete and in buffer: it ends at the first CRLFCRLF after its first
        # byte (blank lines before a request are allowed and skipped).
        first = self.start
        if buffer[first] in b"\r\n":
            first = self._first_byte()
        end = buffer.find(b"\r\n\r\n", first)
        # (-1: an HTTP/0.9 request line without headers; never kept alive, so what follows it
        # is never read.)
        self.head_end = end = len(buffer) if end < 0 else end + 4
        request.size = end - self.start
        head = bytes(buffer[first:end])
        if len(head) > MAX_HEADER and _long_header(head):
            self._stop(HEADER_TOO_LARGE)
        if request.size > MAX_HEAD:
            self._stop(HEAD_TOO_LARGE)
        has_body = self._read_headers(request, head)
        url = request.url = b"".join(request.url_parts)
        method = request.method = parser.get_method()
        route = ROUTES.get(url[:3]) or CONVERSION_ROUTES.get(_path(url))
        if method not in HOT_METHODS or route is None or has_body or parser.should_upgrade():
            self._stop(HAND_OVER)
        request.route = route
        # Asked now: llhttp forgets `Connection: close` once the message is complete.
        request.keep_alive = parser.should_keep_alive()
        request.http10 = parser.get_http_version() == "1.0"
        self.reparsed = False  # the next request may start over once too

    def _read_headers(self, request: _Request, head: bytes) -> bool:
        """Collect the headers we read from a head llhttp accepted; whether it announces a
        body."""
        has_body = False
        headers = request.headers
        for line in self.server.header_lines.finditer(head.lower()):
            name = line[1]
            value = head[line.start(2):line.end(2)]
            if name in BODY_HEADERS:
                has_body = has_body or value.strip() not in (b"", b"0")
            elif name == FORWARDED_FOR:
                # Every line, in order: a proxy may add a line instead of appending to the
                # client's.
                if request.forwarded is None:
                    request.forwarded = [value]
                else:
                    request.forwarded.append(value)
            elif name not in headers:
                headers[name] = value  # the first of a repeated header wins, as in aiohttp
        return has_body

    def on_message_complete(self) -> None:
        request = self.request
        self.queue.append(request)
        self.held += request.size
        self.start = self.head_end
        if not request.keep_alive:
            self.reading = DROP
            raise _Stop  # nothing after it is read

    def _stop(self, item: _Refusal | _HandOver) -> NoReturn:
        self.queue.append(item)
        self.reading = KEEP if item is HAND_OVER else DROP
        raise _Stop

    def _refuse(self, refusal: _Refusal) -> None:
        """Refuse the request being parsed, after answering those before it."""
        self.queue.append(refusal)
        self.reading = DROP

    # -- flow --------------------------------------------------------------------------------

    def _pause_if_full(self) -> None:
        if (not self.read_paused and self.transport is not None
                and self.held + len(self.buffer) > MAX_BUFFERED):
            self.read_paused = True
            self.transport.pause_reading()

    def _next(self) -> None:
        """Start on the next queued request, if we are free to."""
        if self.busy or self.write_paused or self.transport is None:
            return
        queue = self.queue
        if not queue:
            if self.eof or self.closing:
                self.abort(graceful=True)
            elif not self.buffer and self.reading == FEED:
                self.server.idle[self] = None  # waiting for the next request
            return
        item = queue.popleft()
        if type(item) is _Request:
            self.held -= item.size
            if self.read_paused and self.held + len(self.buffer) < MAX_BUFFERED // 2:
                self.read_paused = False
                self.transport.resume_reading()
            self.busy = True
            item.started = time.perf_counter()
            route = item.route
            if route is CLICK_ROUTE or route is PIXEL_ROUTE:
                # Decided in callbacks, answered from the buffer's reply: no task per click.
                self.current = item
                tracking = self.server.tracking
                try:
                    (tracking.click if route is CLICK_ROUTE else tracking.pixel)(
                        self._hit(item), self._on_answer)
                except Exception:  # noqa: BLE001 - the visitor still gets an answer
                    self.server.app.logger.exception("tracking request failed")
                    self._answered(INTERNAL)
            else:
                asyncio.get_running_loop().create_task(self._serve(item))
        elif item is HAND_OVER:
            self._hand_over()
        else:
            self._fail(cast(_Refusal, item))

    def _hand_over(self) -> None:
        """Give this connection, from the first byte of the request it holds on, to aiohttp
        for good."""
        transport = self.transport
        assert transport is not None
        self._forget()
        manager = self.server.runner.server
        assert manager is not None
        # What manager() would make, but answering its parse errors in JSON.
        handler = JsonErrors(manager, loop=asyncio.get_running_loop(), **HANDLER_ARGS)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.read_paused:
            transport.resume_reading()
        data = bytes(self.buffer[self.start:])
        self.buffer = bytearray()
        self.transport = None
        if data:
            handler.data_received(data)

    # -- answering ---------------------------------------------------------------------------

    def _answered(self, answer: Answer) -> None:
        """The answer to the click or impression being decided (once: a second is ignored)."""
        request = self.current
        if request is not None:
            self.current = None
            self._finish(request, answer)

    async def _serve(self, request: _Request) -> None:
        """A conversion by GET (its recording awaits PostgreSQL and Redis)."""
        try:
            answer = await self._answer_conversion(request)
        except Exception:  # noqa: BLE001 - the visitor still gets an answer
            self.server.app.logger.exception("tracking request failed")
            answer = INTERNAL
        self._finish(request, answer)

    def _finish(self, request: _Request, answer: Answer) -> None:
        server = self.server
        # The last answer: asked to close, or stopping, or the client is done sending.
        last = not request.keep_alive or self.closing or (self.eof and not self.queue)
        method = request.method
        self._write(answer, not last, method == b"HEAD", request.http10)
        requests, latency = server.series(request.route, method, answer.status)
        metrics.TALLY.inc(requests)
        metrics.TALLY.observe(latency, time.perf_counter() - request.started)
        self.busy = False
        self.last_active = time.monotonic()
        if last:
            self.abort(graceful=True)
        else:
            self._next()

    def _hit(self, request: _Request) -> Hit:
        path, _, query = request.url.partition(b"?")
        if b"#" in path:
            path = path.partition(b"#")[0]
        slug = path[3:]
        headers = request.headers
        forwarded = request.forwarded
        country_header = self.server.country_header
        # Positional: one Hit per request, and keywords cost more to pass. The URL is ASCII
        # (bytes >= 0x80 arrive percent-encoded, see _parse): no %, nothing to unquote.
        return Hit(
            METHOD_NAMES[request.method],
            (unquote_to_bytes(slug) if b"%" in slug else slug).decode("utf-8", "replace"),
            _query(query),
            self.peer,
            _text(headers.get(b"user-agent")),
            _text(headers.get(b"referer")),
            _cookie(headers.get(b"cookie"), VISITOR_COOKIE),
            _text(b",".join(forwarded)) if forwarded else "",
            _text(headers.get(country_header)) if country_header else "",
        )

    async def _answer_conversion(self, request: _Request) -> Answer:
        app = self.server.app
        path, _, query = request.url.partition(b"?")
        path = path.partition(b"#")[0]
        forwarded = request.forwarded
        address = address_of(app, self.peer, _text(b",".join(forwarded)) if forwarded else "")
        method = request.method.decode()
        pairs = _pairs(query)
        if path == b"/conversion.gif":
            return await answer_conversion_pixel(
                app, method, pairs, address, _cookie(request.headers.get(b"cookie"), LAST_CLICK))
        return await answer_postback(app, method, pairs, address, binom=path == b"/click.php")

    def _write(self, answer: Answer, keep_alive: bool, is_head: bool, http10: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return  # the visitor left; what was recorded stays recorded
        status = answer.status
        body = answer.body
        # The head's text is joined and encoded once: a part per header cost more than the
        # rest of writing the answer.
        lines = [answer.head] if answer.head is not None else [
            f"{name}: {value}\r\n" for name, value in answer.headers
            if "\r" not in value and "\n" not in value]  # never let a value split the head
        if answer.content_type:
            lines.insert(0, f"Content-Type: {answer.content_type}\r\n")
        if not keep_alive:
            lines.append("Connection: close\r\n")
        elif http10:
            lines.append("Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
        lines.append("\r\n")
        transport.write(b"".join((
            STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\nDate: " % status,
            self.server.http_date(), b"\r\nContent-Length: %d\r\n" % len(body),
            "".join(lines).encode(), b"" if is_head else body)))

    def _fail(self, refusal: _Refusal) -> None:
        self._write(error_answer(ApiError(refusal.status, refusal.code, refusal.message)),
                    keep_alive=False, is_head=False)
        self.abort(graceful=True)

    # -- closing -----------------------------------------------------------------------------

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy:
            self.abort(graceful=True)

    def _forget(self) -> None:
        self.server.connections.discard(self)
        self.server.idle.pop(self, None)

    def abort(self, graceful: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        self._forget()
        if graceful:
            transport.close()  # flushes what was written
        else:
            transport.abort()
        self.transport = None


def _long_header(head: bytes) -> bool:
    """Whether a header's name or value is over MAX_HEADER (only a line longer than that can
    hold one)."""
    for line in head.split(b"\r\n")[1:]:
        if len(line) > MAX_HEADER:
            name, _, value = line.partition(b":")
            if len(name) > MAX_HEADER or len(value.lstrip(b" \t")) > MAX_HEADER:
                return True
    return False


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _query(raw: bytes) -> dict[str, str]:
    """First value of each parameter, decoded as aiohttp does ('+' is a space, bytes that are
    not UTF-8 become U+FFFD, which read_params refuses by name)."""
    params: dict[str, str] = {}
    if raw:
        text = raw.decode("utf-8", "replace")
        if "%" in text or "+" in text:
            for name, value in parse_qsl(text, keep_blank_values=True, errors="replace"):
                params.setdefault(name, value)
            return params
        # Nothing to decode: what parse_qsl does, without its per-field unquote() calls
        # (most of a click's query parse).
        for field in text.split("&"):
            if field:
                name, _, value = field.partition("=")
                if name not in params:
                    params[name] = value
    return params


def _path(url: bytes) -> bytes:
    return url.partition(b"?")[0].partition(b"#")[0]


def _pairs(raw: bytes) -> list[tuple[str, str]]:
    """Every parameter, repeats included (a postback refuses a repeated one by name)."""
    if not raw:
        return []
    return parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True, errors="replace")


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
