"""The conversion pixel in a real browser (Debian's Chromium, driven by Playwright).

A visitor clicks the tracking link, lands on a shop served by the test (127.0.0.1 on another
port: the same site as the tracker, so the tracker's SameSite=Lax cookies go along with the
shop's image requests), and reaches a thank-you page whose `<img>` names no click: only the
last-click cookie the redirect set can attribute the conversion. What counts is what the
operator then sees through the API, and that a broken pixel still shows the shop a GIF.

Needs /usr/bin/chromium (`apt-get install chromium`) and the `playwright` package of the test
extras; Playwright never downloads a browser here (no `playwright install`). Without them the
tests skip, unless TRACKER_REQUIRE_TOOLS=1 (CI) makes them fail.
"""

from __future__ import annotations

import html
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tracker.handlers.tracking import GIF
from tracker.ids import new_id

from ..conftest import Running, eventually, flush

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Page, Response

CHROMIUM = Path("/usr/bin/chromium")
PIXEL_PATH = "/conversion.gif"
# The campaign's destination on the shop (after the shop's base URL).
SHOP_LANDING = "/landing?cid={click_id}"


def _missing(reason: str) -> NoReturn:
    if os.environ.get("TRACKER_REQUIRE_TOOLS") == "1":
        pytest.fail(f"TRACKER_REQUIRE_TOOLS=1 but: {reason}")
    pytest.skip(reason)


# -- the shop ---------------------------------------------------------------------------------


class Shop:
    """A shop on 127.0.0.1:<port>: a landing page that links to a thank-you page, and pages
    whose `<img>` tags load the tracker's conversion pixel with the query strings a test
    gives (`pages[name]`), as a shop's template would."""

    def __init__(self, tracker_base: str) -> None:
        self.tracker_base = tracker_base
        self.pages: dict[str, list[str]] = {}
        self.base = ""
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def pixel_url(self, query: str) -> str:
        return f"{self.tracker_base}{PIXEL_PATH}?{query}"

    async def _landing(self, request: web.Request) -> web.Response:
        return self._html("Landing", '<a id="buy" href="/page/thanks">Buy now</a>')

    async def _page(self, request: web.Request) -> web.Response:
        pixels = self.pages.get(request.match_info["name"])
        if pixels is None:
            raise web.HTTPNotFound()
        imgs = "".join(f'<img class="pixel" width="1" height="1" alt="" '
                       f'src="{html.escape(self.pixel_url(q))}">' for q in pixels)
        return self._html("Thank you", f"<p>Thank you for your order.</p>{imgs}")

    @staticmethod
    def _html(title: str, body: str) -> web.Response:
        return web.Response(text=f"<!doctype html><html><head><title>{title}</title></head>"
                                 f"<body>{body}</body></html>", content_type="text/html")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/landing", self._landing)
        app.router.add_get("/page/{name}", self._page)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def shop(service: Running) -> AsyncIterator[Shop]:
    assert urlsplit(service.base).hostname == "127.0.0.1"  # same site as the shop
    found = Shop(service.base)
    try:
        await found.start()
        yield found
    finally:
        await found.stop()


# -- the browser ------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, closed (with Playwright's driver) whatever the test did."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        _missing("install Debian's chromium: apt-get install chromium")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("install playwright (the test extras): .venv/bin/pip install -e '.[test]'")
    playwright = await async_playwright().start()
    try:
        # Root cannot run Chromium's sandbox; Playwright passes --no-sandbox by default, said
        # here so it does not depend on that default.
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, chromium_sandbox=False)
        try:
            yield launched
        finally:
            await launched.close()
    finally:
        await playwright.stop()


async def visitor(browser: Browser) -> BrowserContext:
    """A fresh profile (no cookies) with a visitor's User-Agent: headless Chromium calls
    itself HeadlessChrome, which the bot list flags (rightly), and a flagged click is not
    billed, which is not what this test is about."""
    major = browser.version.split(".")[0]
    user_agent = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  f"Chrome/{major}.0.0.0 Safari/537.36")
    return await browser.new_context(user_agent=user_agent)


def _is_pixel(response: Response) -> bool:
    return urlsplit(response.url).path == PIXEL_PATH


async def open_with_pixels(page: Page, url: str, count: int) -> list[Response]:
    """Open `url` and wait until its `count` conversion pixels have answered, and until the
    page itself has loaded and decoded every image."""
    seen: list[Response] = []
    page.on("response", lambda r: seen.append(r) if _is_pixel(r) else None)
    await page.goto(url, wait_until="load")
    await eventually_sync(lambda: len(seen) >= count)
    for response in seen:
        await response.finished()
    return seen


async def eventually_sync(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async def wrapped() -> bool:
        return check()

    assert await eventually(wrapped, timeout), "the pixels never answered"


async def assert_gifs_shown(page: Page, responses: list[Response]) -> None:
    """Each pixel answered 200 image/gif with the GIF, and the page shows it as an image."""
    for response in responses:
        assert response.status == 200, response.url
        headers = await response.all_headers()
        assert headers["content-type"] == "image/gif", (response.url, headers)
        assert await response.body() == GIF, response.url
    images = await page.eval_on_selector_all(
        "img.pixel", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert images and all(i == [True, 1, 1] for i in images), images


# -- what the operator sees -------------------------------------------------------------------


async def dropped(service: Running) -> dict[str, float]:
    """tracker_events_dropped_total of conversions, by reason, from GET /metrics."""
    status, body = await service.api("GET", "/metrics")
    assert status == 200
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if (sample.name == "tracker_events_dropped_total"
                    and sample.labels.get("type") == "conversion"):
                counts[sample.labels["reason"]] = sample.value
    return counts


def increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def click_view(service: Running, click_id: str) -> dict[str, Any]:
    status, body = await service.api("GET", f"/api/clicks/{click_id}")
    assert status == 200, body
    view: dict[str, Any] = body
    return view


async def totals(service: Running) -> dict[str, Any]:
    status, body = await service.api("GET", "/api/reports")
    assert status == 200, body
    found: dict[str, Any] = body["totals"]
    return found


async def click_through(service: Running, shop: Shop, page: Page, slug: str) -> str:
    """The visitor opens the tracking link and lands on the shop; the click id from the
    landing page's address."""
    response = await page.goto(service.url(f"/c/{slug}"), wait_until="load")
    assert response is not None and response.status == 200
    landed = urlsplit(page.url)
    assert f"{landed.scheme}://{landed.netloc}{landed.path}" == shop.url("/landing"), page.url
    # The redirect that got it there, as the browser saw it.
    redirected = response.request.redirected_from
    first = await redirected.response() if redirected is not None else None
    assert first is not None and first.status == 302, response.url
    (click_id,) = parse_qs(landed.query)["cid"]
    cookies = {c["name"]: c["value"] for c in await page.context.cookies(service.base)}
    assert cookies.get("tlc") == click_id, cookies  # the last-click cookie the pixel falls back to
    return click_id


# -- the tests --------------------------------------------------------------------------------


async def test_the_thank_you_pixel_is_attributed_by_the_last_click_cookie(
        browser: Browser, service: Running, shop: Shop) -> None:
    campaign = await service.create_campaign(
        slug="browser-shop", destination_url=shop.url(SHOP_LANDING))
    shop.pages["thanks"] = ["event=purchase&amount=19.99&txid=ORDER-1"]  # no click id
    before = await dropped(service)

    context = await visitor(browser)
    try:
        page = await context.new_page()
        click_id = await click_through(service, shop, page, campaign["slug"])

        async with page.expect_navigation(wait_until="load"):
            async with page.expect_response(_is_pixel) as answered:
                await page.click("#buy")
        pixel = await answered.value
        await pixel.finished()
        assert urlsplit(page.url).path == "/page/thanks"
        assert "click_id" not in pixel.url and "cid" not in pixel.url
        sent = await pixel.request.all_headers()
        assert f"tlc={click_id}" in sent.get("cookie", ""), sent  # the browser sent it along
        await assert_gifs_shown(page, [pixel])
    finally:
        await context.close()

    drops = increase(before, await dropped(service))
    view = await click_view(service, click_id)
    assert view["campaign"] == "browser-shop" and view["is_bot"] is False, view
    conversions = view["conversions"]
    assert len(conversions) == 1, f"conversions {conversions}; pixels dropped, by reason: {drops}"
    assert drops == {}
    (conversion,) = conversions
    expected = {"click_id": click_id, "event": "purchase", "amount": "19.99",
                "status": "approved", "source": "pixel", "txid": "ORDER-1"}
    assert {k: conversion[k] for k in expected} == expected, conversion

    async def stored() -> dict[str, Any] | None:
        found = await totals(service)
        return found if found["conversions"] == 1 else None

    found = await eventually(stored)
    assert found, await totals(service)
    assert (found["clicks"], found["bot_clicks"]) == (1, 0), found
    assert (found["conversions"], found["revenue"]) == (1, "19.99"), found
    # Once stored, the lookup (now from PostgreSQL) still shows the one conversion.
    (again,) = (await click_view(service, click_id))["conversions"]
    assert {k: again[k] for k in expected} == expected, again


async def test_a_broken_pixel_still_shows_a_gif_and_records_nothing(
        browser: Browser, service: Running, shop: Shop) -> None:
    campaign = await service.create_campaign(
        slug="browser-broken", destination_url=shop.url(SHOP_LANDING))
    # A visitor who clicked (the cookie is there), on a page whose template renders NaN.
    shop.pages["nan"] = ["event=purchase&amount=NaN&txid=ORDER-2"]
    # A visitor who never clicked: no click id and no cookie; and a click id never issued.
    shop.pages["orphan"] = ["event=purchase&amount=5&txid=ORDER-3",
                            f"click_id={new_id()}&event=purchase&amount=5&txid=ORDER-4"]
    before = await dropped(service)

    clicked = await visitor(browser)
    stranger = await visitor(browser)
    try:
        page = await clicked.new_page()
        click_id = await click_through(service, shop, page, campaign["slug"])
        answered = await open_with_pixels(page, shop.url("/page/nan"), 1)
        assert f"tlc={click_id}" in (await answered[0].request.all_headers()).get("cookie", "")
        await assert_gifs_shown(page, answered)

        page = await stranger.new_page()
        answered = await open_with_pixels(page, shop.url("/page/orphan"), 2)
        for response in answered:
            assert "tlc=" not in (await response.request.all_headers()).get("cookie", "")
        await assert_gifs_shown(page, answered)
    finally:
        await clicked.close()
        await stranger.close()

    # Each was counted, by what was wrong with it.
    assert increase(before, await dropped(service)) == {"invalid_params": 2, "unknown_click": 1}
    # And nothing was recorded: not in Redis (the lookup reads it first) ...
    assert (await click_view(service, click_id))["conversions"] == []
    # ... nor in PostgreSQL once everything buffered has been written.
    await flush(service)
    found = await totals(service)
    assert (found["clicks"], found["conversions"], found["revenue"]) == (1, 0, "0"), found
    assert (await click_view(service, click_id))["conversions"] == []
