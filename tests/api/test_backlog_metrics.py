"""The write backlog in the metrics: its length, its oldest event's age and its limit
(TRACKER_BACKLOG_LIMIT), next to /readyz's verdict."""

from __future__ import annotations

from tracker.settings import Settings

from ..conftest import Running, eventually, start
from .test_ops import samples


async def scrape(running: Running) -> str:
    async with running.http.get(running.url("/metrics")) as r:
        assert r.status == 200
        return await r.text()


def value(text: str, family: str) -> float:
    [line] = samples(text, family)
    return float(line.rsplit(" ", 1)[1])


async def test_a_backlog_past_its_limit_shows_in_the_metrics_and_in_readyz(
        settings: Settings) -> None:
    runner, running = await start(settings.with_(backlog_limit=3), run_writer=False)
    try:
        await running.create_campaign(slug="over")
        for _ in range(5):
            assert (await running.click("over")).status == 302

        async def exported() -> str:
            text = await scrape(running)
            return text if samples(text, "tracker_write_backlog_events") else ""

        text = await eventually(exported)
        assert text, "the only instance holds the gauges lease and exports the backlog"
        assert value(text, "tracker_write_backlog_events") == 5
        assert value(text, "tracker_write_backlog_limit_events") == 3
        assert value(text, "tracker_write_backlog_oldest_age_seconds") >= 0
        status, body = await running.api("GET", "/readyz", headers={})
        assert status == 503 and body["not_ready"] == ["backlog"], body
        assert body["backlog"]["events"] == 5 and body["backlog"]["limit"] == 3
    finally:
        await running.close()
        await runner.cleanup()
