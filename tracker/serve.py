"""`tracker serve`: a small supervisor. It starts the embedded servers when no URLs are set,
migrates, then runs one worker process per core and restarts any that dies. SIGTERM/SIGINT:
workers stop accepting, answer what is in flight, flush, and exit; then the embedded servers
stop."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from .embedded import servers
from .settings import Settings
from .storage.migrations import migrate
from .worker import run_worker

log = logging.getLogger("tracker")

STOP_GRACE_SECONDS = 10.0


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
    log.info("no TRACKER_API_TOKEN set: made one, kept in %s", path)
    return token


def metrics_dir(settings: Settings) -> Path:
    """A fresh folder for prometheus_client's multiprocess files (one set per worker)."""
    path = (settings.data_dir / "metrics").resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    with servers(settings.database_url, settings.redis_url, settings.data_dir) as (db_url, redis_url):
        settings = settings.with_(database_url=db_url, redis_url=redis_url,
                                  api_token=api_token(settings))
        if settings.migrate_on_start:
            applied = asyncio.run(migrate(db_url))
            if applied:
                log.info("migrated: %s", ", ".join(applied))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir(settings))
        context = multiprocessing.get_context("spawn")
        workers: list[BaseProcess] = []

        def start_worker() -> BaseProcess:
            process = context.Process(target=run_worker, args=(settings,), daemon=False)
            process.start()
            return process

        workers = [start_worker() for _ in range(settings.workers)]
        log.info("serving on http://%s with %d workers (public URL %s)",
                 settings.listen, settings.workers, settings.base_url)
        while not stopping:
            time.sleep(0.2)
            for i, process in enumerate(workers):
                if not process.is_alive() and not stopping:
                    log.error("worker %s exited with %s; starting another", process.pid,
                              process.exitcode)
                    _mark_dead(process.pid)
                    workers[i] = start_worker()
        log.info("stopping workers")
        for process in workers:
            if process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
    log.info("stopped")
    return 0


def _mark_dead(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
