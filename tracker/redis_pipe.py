"""One pipelined connection to one Redis server, for the hot path's call of each tick.

redis-py's asyncio connection costs about 250 µs of Python per round trip (a pooled
connection taken and given back under a lock, a timeout context around every read, a reply
read by one coroutine call per command): at a dozen clicks a tick that was more than all the
rest of a click. Here a round trip is one `transport.write` of the commands packed by hiredis
and one callback, called from `data_received` once hiredis has parsed that many replies (no
task, no future: the hot path answers its requests from inside that call). Several rounds
may be in flight at once, answered in order on the one connection (what Redis promises of a
pipeline).

What a failure does, as redis-py's would: the round's caller gets a `redis.exceptions`
error (ConnectionError when the server cannot be reached or the connection drops,
TimeoutError when Redis has not answered within `timeout`: the connection is dropped, so
that a Redis that hangs never hangs redirects), and the next round connects again. Error
replies stand in their command's place (NoScriptError for NOSCRIPT).

Plain TCP and Unix sockets only (`redis://`, `unix://`); TLS and Cluster go through redis-py
(see redis_client.send).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import (ConnectionError, InvalidResponse, NoScriptError, ResponseError,
                              TimeoutError)

Command = tuple[Any, ...]

log = logging.getLogger(__name__)


def supports(url: str) -> bool:
    """Whether a RedisPipe can serve this URL (one server, no TLS)."""
    return url.startswith(("redis://", "unix://"))


# Called once per round: with its replies, or with the error that ended it.
Done = Callable[[list[Any] | Exception], None]


class _Round:
    __slots__ = ("left", "replies", "done", "sent")

    def __init__(self, count: int, done: Done, sent: float) -> None:
        self.left = count
        self.replies: list[Any] = []
        self.done = done
        self.sent = sent


def _call(done: Done, result: list[Any] | Exception) -> None:
    try:
        done(result)
    except Exception:  # noqa: BLE001 - one caller's bug must not stop the replies to the others
        log.exception("a Redis round's callback failed")


class _Protocol(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.rounds: deque[_Round] = deque()
        self.lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        rounds = self.rounds
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:
                self.fail(exc)
                return
            if reply is False:
                return
            if not rounds:  # a reply nobody asked for: the stream is out of step
                self.fail(InvalidResponse("unexpected reply from Redis"))
                return
            head = rounds[0]
            if type(reply) is ResponseError and str(reply).startswith("NOSCRIPT"):
                reply = NoScriptError(str(reply))
            head.replies.append(reply)
            head.left -= 1
            if not head.left:
                rounds.popleft()
                _call(head.done, head.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail_rounds(ConnectionError(f"Redis connection lost: {exc or 'closed'}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def fail(self, exc: Exception) -> None:
        """Fail every round in flight and drop the connection."""
        self._fail_rounds(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_rounds(self, exc: Exception) -> None:
        rounds, self.rounds = self.rounds, deque()
        for round_ in rounds:
            _call(round_.done, exc)


class RedisPipe:
    def __init__(self, url: str, timeout: float) -> None:
        if not supports(url):
            raise ValueError(f"RedisPipe serves redis:// and unix:// URLs, not {url!r}")
        options = parse_url(url)
        self._path: str | None = (options.get("path")
                                  if options.get("connection_class") is UnixDomainSocketConnection
                                  else None)
        self._host = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._hello: list[Command] = []
        if options.get("password"):
            username = options.get("username")
            self._hello.append(("AUTH", username, options["password"]) if username
                               else ("AUTH", options["password"]))
        if int(options.get("db", 0)):
            self._hello.append(("SELECT", int(options["db"])))
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._watch: asyncio.TimerHandle | None = None

    def send_soon(self, commands: list[Command], done: Done) -> None:
        """Send the commands in one write; `done` gets their replies in order (an error
        reply in its command's place), or the error that ended the round."""
        packed = b"".join(map(hiredis.pack_command, commands))
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            asyncio.get_running_loop().create_task(self._connect_and_send(packed, len(commands), done))
        else:
            self._round(protocol, packed, len(commands), done)

    async def send(self, commands: list[Command]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def done(result: list[Any] | Exception) -> None:
            if future.done():
                return
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

        self.send_soon(commands, done)
        return await future

    async def _connect_and_send(self, packed: bytes, count: int, done: Done) -> None:
        try:
            protocol = await self._connected()
        except ConnectionError as exc:
            _call(done, exc)
            return
        self._round(protocol, packed, count, done)

    def _round(self, protocol: _Protocol, packed: bytes, count: int, done: Done) -> None:
        if protocol.transport is None:
            _call(done, ConnectionError("Redis connection lost"))
            return
        protocol.rounds.append(_Round(count, done, asyncio.get_running_loop().time()))
        protocol.transport.write(packed)

    async def _connected(self) -> _Protocol:
        # One connection attempt at a time; every round that arrives meanwhile waits for it.
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        try:
            if self._path is not None:
                opening = loop.create_unix_connection(lambda: _Protocol(lost), self._path)
            else:
                opening = loop.create_connection(lambda: _Protocol(lost), self._host, self._port)
            _, protocol = await asyncio.wait_for(opening, self._timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectionError(f"cannot connect to Redis: {exc or type(exc).__name__}") from exc
        if self._hello:
            hello: asyncio.Future[list[Any] | Exception] = loop.create_future()
            self._round(protocol, b"".join(map(hiredis.pack_command, self._hello)),
                        len(self._hello), hello.set_result)
            try:
                replies = await asyncio.wait_for(hello, self._timeout)
            except asyncio.TimeoutError:
                replies = TimeoutError("Redis did not answer AUTH/SELECT")
            refused = replies if isinstance(replies, Exception) else next(
                (r for r in replies if isinstance(r, Exception)), None)
            if refused is not None:
                protocol.fail(ConnectionError(f"Redis refused the connection: {refused}"))
                raise ConnectionError(f"Redis refused the connection: {refused}")
        self._protocol = protocol
        self._arm()
        return protocol

    def _arm(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(self._timeout / 4, self._check)

    def _check(self) -> None:
        """Drop a connection whose oldest round has waited past the timeout."""
        self._watch = None
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return
        rounds = protocol.rounds
        if rounds and asyncio.get_running_loop().time() - rounds[0].sent > self._timeout:
            protocol.fail(TimeoutError(f"Redis did not answer within {self._timeout} s"))
            self._protocol = None
            return
        self._arm()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            await asyncio.wait([protocol.lost], timeout=1.0)
