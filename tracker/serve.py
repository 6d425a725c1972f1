"""`tracker serve`: a small supervisor.

It takes the data folder (one `serve` per folder), makes sure the port is not another
service's, starts the embedded servers when no URLs are set (and starts them again if one
dies), migrates (in the background while PostgreSQL is away: workers start anyway), then runs
one worker process per core and restarts any that dies, backing off when one keeps dying.
SIGTERM/SIGINT: workers stop accepting, answer what is in flight, flush and exit; then the
embedded servers stop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO

import asyncpg

from . import logs
from .embedded import EmbeddedError, Servers, servers
from .settings import Settings
from .storage.migrations import migrate
from .worker import run_worker

log = logging.getLogger("tracker")

STOP_GRACE_SECONDS = 10.0
TICK_SECONDS = 0.2
EMBEDDED_CHECK_SECONDS = 1.0
# A worker that lived this long was healthy: its next restart is immediate again.
HEALTHY_AFTER_SECONDS = 30.0
RESTART_BACKOFF_CAP = 30.0
MIGRATE_BACKOFF_CAP = 30.0
# PostgreSQL is not there (yet): migrations wait for it instead of stopping the service.
UNREACHABLE = (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError,
               asyncpg.ConnectionDoesNotExistError)


class ServeError(Exception):
    """A reason not to start, for the person who ran the command."""


def api_token(settings: Settings) -> str:
    """TRACKER_API_TOKEN, or one made once and kept in data_dir, so that a newcomer can use
    the operator API without configuring anything."""
    if settings.api_token:
        return settings.api_token
    path = settings.data_dir / "api-token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def metrics_dir(settings: Settings) -> Path:
    """A fresh folder for prometheus_client's multiprocess files (one set per worker)."""
    path = (settings.data_dir / "metrics").resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold the data folder for as long as the returned file is open. Two services in one
    folder would share the embedded servers, the spool and the writers' names."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "serve.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ServeError(f"another tracker serve (pid {holder}) is using the data folder "
                         f"{data_dir.resolve()}; stop it, or set TRACKER_DATA_DIR") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_port_free(host: str, port: int) -> None:
    """Workers listen with SO_REUSEPORT, which would quietly share the port with another
    `tracker serve`; a plain bind refuses a port anyone listens on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ServeError(f"{host}:{port} is already in use (another tracker serve?): "
                             f"{exc.strerror}; set TRACKER_LISTEN or --listen") from None


class Migrations:
    """Applies sql/ now if PostgreSQL answers, else in the background until it does."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self.failed: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        if not self._try(first=True):
            self._thread = threading.Thread(target=self._retry, name="migrate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _retry(self) -> None:
        delay = 1.0
        while not self._stop.wait(delay):
            if self._try(first=False):
                return
            delay = min(delay * 2, MIGRATE_BACKOFF_CAP)

    def _try(self, first: bool) -> bool:
        try:
            applied = asyncio.run(migrate(self._url))
        except UNREACHABLE as exc:
            if first:
                log.warning("PostgreSQL does not answer (%s); starting anyway, migrating once "
                            "it does", exc or type(exc).__name__)
            return False
        except Exception as exc:  # noqa: BLE001 - reported by the supervisor, which stops
            self.failed = exc
            log.error("migration failed: %r", exc)
            return True
        if applied:
            log.info("migrated: %s", ", ".join(applied))
        elif not first:
            log.info("PostgreSQL answers; schema up to date")
        return True


@dataclass
class Slot:
    """One worker place: the process in it and how its restarts are going."""

    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    failures: int = 0
    start_at: float = 0.0
    causes_logged: set[str] = field(default_factory=set)


def _cause(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self.slots = [Slot(i) for i in range(settings.workers)]

    def start_all(self) -> None:
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        process = self._context.Process(target=run_worker, args=(self._settings, slot.index),
                                        name=f"tracker-worker-{slot.index}", daemon=False)
        process.start()
        slot.process, slot.started = process, time.monotonic()

    def tend(self) -> None:
        """Restart dead workers, each after a capped exponential pause while it keeps dying;
        say so once per cause (a crash loop is one line, not five a second)."""
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is not None and not process.is_alive():
                _mark_dead(process.pid)
                if now - slot.started >= HEALTHY_AFTER_SECONDS:
                    slot.failures, slot.causes_logged = 0, set()
                delay = 0.0 if slot.failures == 0 else min(
                    0.2 * 2 ** (slot.failures - 1), RESTART_BACKOFF_CAP)
                slot.failures += 1
                cause = _cause(process)
                if cause not in slot.causes_logged:
                    slot.causes_logged.add(cause)
                    log.error("worker %d (pid %s) %s; starting another%s", slot.index,
                              process.pid, cause, f" in {delay:.1f} s" if delay else "")
                else:
                    log.debug("worker %d %s again; next try in %.1f s", slot.index, cause, delay)
                slot.process, slot.start_at = None, now + delay
            if slot.process is None and now >= slot.start_at:
                self._start(slot)

    def stop_all(self) -> None:
        alive = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for process in alive:
            if process.pid:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()


def banner(settings: Settings, found: Servers, token_given: bool) -> str:
    data = settings.data_dir.resolve()
    token = "from TRACKER_API_TOKEN" if token_given else f"in {data / 'api-token'}"
    embedded = " and ".join(found.embedded)
    lines = [
        f"tracker serving {settings.base_url} ({settings.workers} workers on {settings.listen})",
        f"  data folder  {data}" + (f" (embedded {embedded})" if embedded else ""),
        f"  API token    {token}",
        f"  metrics      http://{settings.admin_listen or settings.listen}/metrics",
        "  stop with Ctrl-C",
    ]
    return "\n".join(lines)


def serve(settings: Settings) -> int:
    logs.configure(settings.log_level)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        lock = lock_data_dir(settings.data_dir)
        check_port_free(settings.host, settings.port)
        if settings.admin_listen:
            check_port_free(settings.admin_host, settings.admin_port)
    except ServeError as exc:
        print(f"tracker: {exc}", file=sys.stderr)
        return 2
    try:
        with lock, servers(settings.database_url, settings.redis_url, settings.data_dir) as found:
            token_given = bool(settings.api_token)
            settings = settings.with_(database_url=found.database_url, redis_url=found.redis_url,
                                      api_token=api_token(settings))
            migrations = Migrations(settings.database_url)
            if settings.migrate_on_start:
                migrations.run()
            if migrations.failed is not None:
                return 1
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir(settings))
            supervisor = Supervisor(settings)
            supervisor.start_all()
            print(banner(settings, found, token_given), flush=True)
            next_check = 0.0
            while not stopping and migrations.failed is None:
                time.sleep(TICK_SECONDS)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + EMBEDDED_CHECK_SECONDS
                    _check_embedded(found)
                if not stopping:
                    supervisor.tend()
            migrations.stop()
            supervisor.stop_all()
            if migrations.failed is not None:
                return 1
    except EmbeddedError as exc:
        print(f"tracker: {exc}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0


def _check_embedded(found: Servers) -> None:
    try:
        found.check()
    except EmbeddedError as exc:
        log.error("%s; trying again", exc)


def _mark_dead(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
