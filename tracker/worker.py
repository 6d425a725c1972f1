"""One worker process: its own event loop (uvloop), app, pools and batch writer, listening
with SO_REUSEPORT beside its siblings."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .app import create_app
from .fastpath import serving
from .middleware import HANDLER_ARGS
from .settings import Settings

SHUTDOWN_TIMEOUT = 5.0


def runner_for(app: web.Application) -> web.AppRunner:
    # The fast path makes the connection handlers itself (middleware.JsonErrors) with the same
    # HANDLER_ARGS when it hands a connection over.
    return web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT,
                         **HANDLER_ARGS)


async def serve_worker(settings: Settings) -> None:
    app = create_app(settings)
    runner = runner_for(app)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The fast path listens; it hands non-tracking connections to aiohttp (runner.server).
    async with serving(app, runner, settings.host, settings.port, SHUTDOWN_TIMEOUT):
        await stop.wait()
        # Leaving: stop accepting, answer what is in flight.
    # Then aiohttp's connections, then the cleanup contexts (the writer flushes the buffer).
    await runner.cleanup()


def run_worker(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_worker(settings))
