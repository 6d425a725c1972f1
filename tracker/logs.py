"""Logging for every process of the service: our own lines at TRACKER_LOG_LEVEL, libraries'
(pgserver, aiohttp, asyncio) at WARNING unless TRACKER_LOG_LEVEL=DEBUG, so that a start shows
the few lines a user needs and an outage shows one line, not one per retry."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def configure(level: str) -> None:
    logging.basicConfig(level=logging.DEBUG if level == "DEBUG" else logging.WARNING,
                        format=FORMAT, force=True)
    logging.getLogger("tracker").setLevel(level)
