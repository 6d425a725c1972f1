"""One worker process: its own event loop (uvloop), app, pools and batch writer, listening
with SO_REUSEPORT beside its siblings."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from . import logs
from .app import IN_FLIGHT_SECONDS, create_app
from .fastpath import FastServer, serving
from .middleware import HANDLER_ARGS
from .settings import Settings

# How long requests in flight may take to be answered once the worker leaves.
SHUTDOWN_TIMEOUT = IN_FLIGHT_SECONDS


def runner_for(app: web.Application) -> web.AppRunner:
    # The fast path makes the connection handlers itself (middleware.JsonErrors) with the same
    # HANDLER_ARGS when it hands a connection over.
    return web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT,
                         **HANDLER_ARGS)


@contextlib.asynccontextmanager
async def listening(app: web.Application, runner: web.AppRunner,
                    settings: Settings) -> AsyncIterator[FastServer]:
    """The worker's sockets: the admin address when there is one (metrics and health, not
    on the public port), and the public port, where the fast path takes every connection
    and hands non-tracking ones to aiohttp (runner.server). Leaving stops accepting and
    answers what is in flight."""
    if settings.admin_listen:
        admin = web.TCPSite(runner, settings.admin_host, settings.admin_port, reuse_port=True)
        await admin.start()
    async with serving(app, runner, settings.host, settings.port, SHUTDOWN_TIMEOUT) as fast:
        yield fast


async def serve_worker(settings: Settings, slot: int) -> None:
    app = create_app(settings, slot=slot)
    runner = runner_for(app)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with listening(app, runner, settings):
        await stop.wait()
    # Then aiohttp's connections, then the cleanup contexts (the writer flushes the buffer).
    await runner.cleanup()


def run_worker(settings: Settings, slot: int) -> None:
    logs.configure(settings.log_level)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_worker(settings, slot))
