"""The public tracking endpoints: the redirect and the impression pixel.

The answer to a hit is decided once, here, as an `Answer`; the fast path (fastpath.py) writes
it straight to the socket, and the aiohttp routes (for connections the fast path handed over)
turn it into a web.Response.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .. import metrics
from ..campaigns import Campaign
from ..errors import ApiError, error_body, not_found
from ..ingest.params import read_params
from ..ingest.track import LAST_CLICK_COOKIE, VISITOR_COOKIE, Click
from ..ingest.visitor import Hit
from ..keys import CAMPAIGNS, SETTINGS, TRACKER
from ..metrics import DropReason

GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = "no-store"
YEAR = 365 * 24 * 3600
LAST_CLICK_AGE = 90 * 24 * 3600


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    content_type: str | None = None
    # The headers already as the head's text (`Name: value` CRLF each), instead of `headers`:
    # a click's redirect is written this way, a part per header cost more than the rest.
    head: str | None = None

    def header_pairs(self) -> list[tuple[str, str]]:
        if self.head is None:
            return self.headers
        return [(name, value) for name, _, value in
                (line.partition(": ") for line in self.head.split("\r\n") if line)]


def error_answer(exc: ApiError) -> Answer:
    return Answer(exc.status, [("Cache-Control", NO_STORE)],
                  error_body(exc.status, exc.code, exc.message, exc.field), "application/json")


def _redirect(location: str) -> Answer:
    return Answer(302, [("Location", location), ("Cache-Control", NO_STORE)])


def _cookie_attributes(secure: bool) -> str:
    return "; Path=/; HttpOnly; SameSite=None; Secure" if secure else "; Path=/; HttpOnly; SameSite=Lax"


PIXEL = Answer(200, [("Cache-Control", NO_STORE)], GIF, "image/gif")
INTERNAL = Answer(500, [("Cache-Control", NO_STORE)], error_body(500, "internal", "internal error"),
                  "application/json")
# Where a decision goes: called once with the answer.
Reply = Callable[[Answer], None]


class Tracking:
    """The answers to hits, with what they need taken from the app once (the campaign cache,
    the request tracker, the cookies' attributes) rather than once per request: the fast
    path keeps one for good."""

    __slots__ = ("campaigns", "tracker", "logger", "visitor_tail", "last_click_tail", "_tasks")

    def __init__(self, app: web.Application) -> None:
        self.campaigns = app[CAMPAIGNS]
        self.tracker = app[TRACKER]
        self.logger = app.logger
        attributes = _cookie_attributes(app[SETTINGS].secure_cookies)
        # Written by hand: both values are ULIDs (nothing to quote), and http.cookies' Morsel
        # costs more than the rest of the response.
        self.visitor_tail = f"; Max-Age={YEAR}{attributes}"
        self.last_click_tail = f"; Max-Age={LAST_CLICK_AGE}{attributes}"
        # The few lookups that wait for PostgreSQL or Redis (a campaign this worker has not
        # loaded): kept until done.
        self._tasks: set[asyncio.Task[None]] = set()

    def click(self, hit: Hit, answer: Reply) -> None:
        """Decide the answer to a click; `answer` gets it, now or once the click is buffered
        (no task per click: the fast path's requests are answered from the buffer's reply)."""
        campaign = self.campaigns.get(hit.slug)
        if campaign is None:
            # Not in this worker's memory: a campaign made a moment ago, or none.
            self._spawn(self._click_found(hit, answer))
            return
        self._click(hit, campaign, answer)

    async def _click_found(self, hit: Hit, answer: Reply) -> None:
        try:
            campaign = await self.campaigns.find(hit.slug)
        except Exception:  # noqa: BLE001 - the visitor still gets an answer
            self.logger.exception("campaign lookup failed")
            answer(INTERNAL)
            return
        if campaign is None:
            answer(self._not_active(None))
        else:
            self._click(hit, campaign, answer)

    def _click(self, hit: Hit, campaign: Campaign, answer: Reply) -> None:
        if campaign.status != "active":
            answer(self._not_active(campaign))
            return
        try:
            params = read_params(hit.query)
        except ApiError as exc:
            metrics.dropped("click", DropReason.INVALID_PARAMS)
            answer(error_answer(exc))
            return
        if hit.method == "HEAD":
            # Link checkers and unfurlers probe with HEAD: same answer, nothing recorded.
            answer(_redirect(self.tracker.location(campaign, params, "")[1]))
            return

        def recorded(result: Click) -> None:
            location = result.location
            if "\r" in location or "\n" in location:  # never let a value split the head
                location = location.replace("\r", "%0D").replace("\n", "%0A")
            head = (f"Location: {location}\r\nCache-Control: no-store\r\n"
                    f"Set-Cookie: {VISITOR_COOKIE}={result.visitor_id}{self.visitor_tail}\r\n")
            if result.recorded:
                head += f"Set-Cookie: {LAST_CLICK_COOKIE}={result.click_id}{self.last_click_tail}\r\n"
            answer(Answer(302, head=head))

        self.tracker.click(hit, campaign, params, recorded)

    def _not_active(self, campaign: Campaign | None) -> Answer:
        if campaign is None:
            if not self.campaigns.loaded:
                # PostgreSQL has been away since this worker started and no snapshot exists:
                # the link may well be real, so not a 404.
                metrics.dropped("click", DropReason.NOT_READY)
                return error_answer(ApiError(503, "not_ready",
                                             "campaigns are not loaded yet; try again shortly"))
            metrics.dropped("click", DropReason.UNKNOWN_CAMPAIGN)
            return error_answer(not_found("no active campaign has this link", code="unknown_link"))
        metrics.dropped("click", DropReason.CAMPAIGN_PAUSED)
        if campaign.fallback_url:
            return _redirect(campaign.fallback_url)
        return error_answer(not_found("this campaign is paused", code="campaign_paused"))

    def pixel(self, hit: Hit, answer: Reply) -> None:
        """Always the GIF: a broken pixel must never break the page that carries it."""
        if hit.method == "HEAD":
            answer(PIXEL)
            return
        campaign = self.campaigns.get(hit.slug)
        if campaign is None:
            self._spawn(self._pixel_found(hit, answer))
            return
        self._pixel(hit, campaign, answer)

    async def _pixel_found(self, hit: Hit, answer: Reply) -> None:
        try:
            campaign = await self.campaigns.find(hit.slug)
        except Exception:  # noqa: BLE001 - counted; the GIF still goes out
            metrics.dropped("impression", DropReason.INTERNAL_ERROR)
            self.logger.exception("impression not recorded")
            answer(PIXEL)
            return
        if campaign is None:
            metrics.dropped("impression", DropReason.UNKNOWN_CAMPAIGN if self.campaigns.loaded
                            else DropReason.NOT_READY)
            answer(PIXEL)
        else:
            self._pixel(hit, campaign, answer)

    def _pixel(self, hit: Hit, campaign: Campaign, answer: Reply) -> None:
        try:
            params = read_params(hit.query)
        except ApiError:
            metrics.dropped("impression", DropReason.INVALID_PARAMS)
            answer(PIXEL)
            return
        try:
            self.tracker.impression(hit, campaign, params, lambda: answer(PIXEL))
        except Exception:  # noqa: BLE001 - whatever failed is counted, the GIF still goes out
            metrics.dropped("impression", DropReason.INTERNAL_ERROR)
            self.logger.exception("impression not recorded")
            answer(PIXEL)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _answered(decide: Callable[[Hit, Reply], None], hit: Hit) -> Answer:
    """One of Tracking's decisions, awaited (the aiohttp routes)."""
    future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

    def answer(result: Answer) -> None:
        if not future.done():
            future.set_result(result)

    decide(hit, answer)
    return await future


async def answer_click(app: web.Application, hit: Hit) -> Answer:
    return await _answered(Tracking(app).click, hit)


async def answer_pixel(app: web.Application, hit: Hit) -> Answer:
    return await _answered(Tracking(app).pixel, hit)


# -- aiohttp routes ----------------------------------------------------------------------------


def hit_of(request: web.Request) -> Hit:
    headers = request.headers
    country_header = request.app[TRACKER].country_header
    return Hit(
        method=request.method,
        slug=request.match_info["slug"],
        query=request.query,
        peer=request.remote or "",
        user_agent=headers.get("User-Agent", ""),
        referer=headers.get("Referer", ""),
        visitor_cookie=request.cookies.get(VISITOR_COOKIE, ""),
        # Every line, in order: a proxy may add a line instead of appending to the client's.
        forwarded_for=",".join(headers.getall("X-Forwarded-For", ())),
        country_header=headers.get(country_header, "") if country_header else "",
    )


def response_of(answer: Answer) -> web.Response:
    response = web.Response(status=answer.status, body=answer.body or None,
                            content_type=answer.content_type)
    for name, value in answer.header_pairs():
        response.headers.add(name, value)
    return response


async def click(request: web.Request) -> web.StreamResponse:
    return response_of(await answer_click(request.app, hit_of(request)))


async def impression(request: web.Request) -> web.StreamResponse:
    return response_of(await answer_pixel(request.app, hit_of(request)))
