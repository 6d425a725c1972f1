"""`tracker serve` as a user runs it: no URLs (embedded PostgreSQL and Redis), a generated
token, two workers; SIGTERM stops everything cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from ..conftest import BROWSER, free_port


@pytest.mark.slow
async def test_serve_on_the_embedded_default_then_sigterm() -> None:
    data = Path(tempfile.mkdtemp(prefix="trks"))  # short: PostgreSQL's socket path is bounded
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"TRACKER_LISTEN": f"127.0.0.1:{port}", "TRACKER_WORKERS": "2",
            "TRACKER_DATA_DIR": str(data), "TRACKER_LOG_LEVEL": "WARNING"}
    env.pop("TRACKER_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
            for _ in range(300):
                try:
                    async with http.get(f"{base}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            token = (data / "api-token").read_text().strip()
            auth = {"Authorization": f"Bearer {token}"}
            async with http.post(f"{base}/api/campaigns", headers=auth, json={
                    "slug": "emb", "destination_url": "https://shop.example/?c={click_id}"}) as r:
                assert r.status == 201
            click_ids = []
            for _ in range(10):
                async with http.get(f"{base}/c/emb", allow_redirects=False) as r:
                    assert r.status == 302
                    click_ids.append(r.headers["Location"].rsplit("=", 1)[1])
            for _ in range(100):
                async with http.get(f"{base}/api/reports", headers=auth) as r:
                    if (await r.json())["totals"]["clicks"] == 10:
                        break
                await asyncio.sleep(0.1)
            assert (await r.json())["totals"]["clicks"] == 10
            # Both workers answer lookups (each from Redis or PostgreSQL).
            for click_id in click_ids:
                async with http.get(f"{base}/api/clicks/{click_id}", headers=auth) as r:
                    assert r.status == 200
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            # The two workers' counts add up in one answer.
            assert 'tracker_events_total{outcome="accepted",type="click"} 10.0' in text
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        stopped_in = time.monotonic() - started
    assert code == 0
    assert stopped_in < 10, stopped_in
    leftover = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout
    assert leftover == "", f"embedded servers still running: {leftover}"
