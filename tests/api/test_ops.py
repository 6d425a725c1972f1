"""/healthz, /readyz, /metrics."""

from __future__ import annotations

from ..conftest import Running


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


async def test_metrics_have_the_contract_families(service: Running) -> None:
    await service.create_campaign(slug="m")
    await service.click("m")
    await service.click("nope")
    await service.click("m", "sub1=" + "x" * 300)
    async with service.http.get(service.url("/metrics")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    for family in ["tracker_http_requests_total", "tracker_http_request_duration_seconds_bucket",
                   "tracker_events_total", "tracker_batch_rows", "tracker_batch_duration_seconds",
                   "tracker_batch_failures_total", "tracker_write_backlog_events",
                   "tracker_write_backlog_oldest_age_seconds", "tracker_outbound_postbacks_total",
                   "tracker_backend_errors_total", "tracker_events_dropped_total"]:
        assert family in text, family
    assert 'tracker_http_request_duration_seconds_bucket{le="0.0001",route="/c/{slug}",status="302"}' in text
    assert 'route="/c/{slug}",status="404"' in text
    assert 'tracker_events_total{outcome="accepted",type="click"}' in text
    assert 'tracker_events_total{outcome="rejected",type="click"}' in text
    assert 'tracker_events_dropped_total{reason="invalid_params",type="click"}' in text
    assert 'tracker_events_dropped_total{reason="unknown_campaign",type="click"}' in text
    # No high-cardinality labels: never a slug.
    assert 'nope' not in text and '"m"' not in text
