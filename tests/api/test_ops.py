"""/healthz, /readyz, /metrics."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from tracker.settings import Settings

from ..conftest import AUTH, OwnRedis, Running, eventually, free_port, start


async def test_healthz(service: Running) -> None:
    status, body = await service.api("GET", "/healthz", headers={})
    assert status == 200 and body == {"status": "ok"}


async def test_readyz_reports_each_part(service: Running) -> None:
    status, body = await service.api("GET", "/readyz", headers={})
    assert status == 200, body
    assert body["status"] == "ready" and body["not_ready"] == []
    assert body["postgres"]["ok"] and body["redis"]["ok"] and body["backlog"]["ok"]


async def test_readyz_is_503_naming_the_backlog_when_it_is_over_its_limit(settings, pg) -> None:  # type: ignore[no-untyped-def]
    from ..conftest import start

    runner, running = await start(settings.with_(backlog_limit=3), run_writer=False)
    try:
        await running.create_campaign(slug="full")
        for _ in range(3):
            await running.click("full")
        status, body = await running.api("GET", "/readyz", headers={})
        assert status == 503, body
        assert body["not_ready"] == ["backlog"]
        assert body["backlog"]["events"] == 3 and body["backlog"]["limit"] == 3
        assert body["postgres"]["ok"] and body["redis"]["ok"]
    finally:
        await running.close()
        await runner.cleanup()


def samples(text: str, family: str) -> list[str]:
    """The sample lines of a family (never its HELP or TYPE line)."""
    return [line for line in text.splitlines()
            if line.startswith(family) and line[len(family):len(family) + 1] in ("{", " ", "_")]


async def test_metrics_have_the_contract_families(service: Running, pg: asyncpg.Connection) -> None:
    await service.create_campaign(slug="m")
    await service.click("m")
    await service.click("nope")
    await service.click("m", "sub1=" + "x" * 300)
    assert await eventually(lambda: pg.fetchval("SELECT count(*) FROM clicks"))
    async with service.http.get(service.url("/metrics")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    # Families with samples, not just a HELP line. (tracker_outbound_postbacks_total is
    # declared for the contract; its tries start with conversions, so it has none yet.)
    for family in ["tracker_http_requests_total", "tracker_http_request_duration_seconds_bucket",
                   "tracker_events_total", "tracker_batch_rows_bucket",
                   "tracker_batch_duration_seconds_bucket", "tracker_write_backlog_events",
                   "tracker_write_backlog_oldest_age_seconds", "tracker_events_dropped_total",
                   "tracker_write_lag_seconds_bucket", "tracker_backend_up"]:
        assert samples(text, family), family
    assert 'tracker_http_request_duration_seconds_bucket{le="0.0001",route="/c/{slug}",status="302"}' in text
    assert 'route="/c/{slug}",status="404"' in text
    # (This process's counters add up across tests: their presence is what is checked.)
    assert 'tracker_events_total{outcome="accepted",type="click"}' in text
    assert 'tracker_events_total{outcome="rejected",type="click"}' in text
    assert 'tracker_events_dropped_total{reason="invalid_params",type="click"}' in text
    assert 'tracker_events_dropped_total{reason="unknown_campaign",type="click"}' in text
    assert 'tracker_backend_up{backend="redis"} 1.0' in text
    # No high-cardinality labels: never a slug.
    assert 'nope' not in text and '"m"' not in text


async def test_metrics_and_health_on_their_own_address(settings: Settings) -> None:
    """TRACKER_ADMIN_LISTEN: /metrics and the health checks there, not on the public port
    (where anyone on the internet would read them), and nothing else there."""
    admin = f"127.0.0.1:{free_port()}"
    settings = settings.with_(admin_listen=admin)
    runner, running = await start(settings)
    try:
        await running.create_campaign(slug="adm")
        assert (await running.click("adm")).status == 302
        for path in ["/metrics", "/healthz", "/readyz", "/readyz/tracking"]:
            status, _ = await running.api("GET", path, headers={})
            assert status == 404, path
            async with running.http.get(f"http://{admin}{path}") as r:
                assert r.status == 200, path
        async with running.http.get(f"http://{admin}/c/adm", allow_redirects=False) as r:
            assert r.status == 404
        async with running.http.get(f"http://{admin}/api/campaigns", headers=AUTH) as r:
            assert r.status == 404
    finally:
        await running.close()
        await runner.cleanup()


async def test_tracking_readiness_holds_through_a_redis_outage(settings: Settings, tmp_path: Path) -> None:
    """The contract's /readyz names Redis; /readyz/tracking (the load balancer's question)
    stays 200: redirects are answered and events spooled meanwhile."""
    own = OwnRedis(tmp_path)
    own.start()
    runner, running = await start(settings.with_(redis_url=own.url))
    try:
        await running.create_campaign(slug="lb")
        own.stop()
        status, body = await running.api("GET", "/readyz", headers={})
        assert status == 503 and "redis" in body["not_ready"]
        status, body = await running.api("GET", "/readyz/tracking", headers={})
        assert status == 200 and body["campaigns_loaded"] is True
        assert (await running.click("lb")).status == 302

        async def redis_down_shows() -> bool:
            async with running.http.get(running.url("/metrics")) as r:
                return 'tracker_backend_up{backend="redis"} 0.0' in await r.text()

        assert await eventually(redis_down_shows, timeout=10)
    finally:
        await running.close()
        await runner.cleanup()
        own.stop()


async def test_dead_letters_are_counted(quiet_service: Running, pg: asyncpg.Connection) -> None:
    from datetime import UTC, datetime

    from ..api.test_reports import buffer_events, click

    c = await quiet_service.create_campaign(slug="dl")
    before = _value("tracker_dead_letters_total")
    await buffer_events(quiet_service, [click(c["id"], datetime.now(UTC), sub1="a\x00b"),
                                        click(c["id"], datetime.now(UTC), is_bot="no")])
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 2
    assert _value("tracker_dead_letters_total") == before + 2


def _value(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0
