"""The public tracking endpoints: the redirect and the impression pixel.

The answer to a hit is decided once, here, as an `Answer`; the fast path (fastpath.py) writes
it straight to the socket, and the aiohttp routes (for connections the fast path handed over)
turn it into a web.Response.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from aiohttp import web

from .. import metrics
from ..campaigns import Campaign
from ..errors import ApiError, error_body, not_found
from ..ingest.params import read_params
from ..ingest.track import LAST_CLICK_COOKIE, VISITOR_COOKIE
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


def error_answer(exc: ApiError) -> Answer:
    return Answer(exc.status, [("Cache-Control", NO_STORE)],
                  error_body(exc.status, exc.code, exc.message, exc.field), "application/json")


def _redirect(location: str) -> Answer:
    return Answer(302, [("Location", location), ("Cache-Control", NO_STORE)])


def _cookie_attributes(secure: bool) -> str:
    return "; Path=/; HttpOnly; SameSite=None; Secure" if secure else "; Path=/; HttpOnly; SameSite=Lax"


PIXEL = Answer(200, [("Cache-Control", NO_STORE)], GIF, "image/gif")


class Tracking:
    """The answers to hits, with what they need taken from the app once (the campaign cache,
    the request tracker, the cookies' attributes) rather than once per request: the fast
    path keeps one for good."""

    __slots__ = ("campaigns", "tracker", "logger", "visitor_tail", "last_click_tail")

    def __init__(self, app: web.Application) -> None:
        self.campaigns = app[CAMPAIGNS]
        self.tracker = app[TRACKER]
        self.logger = app.logger
        attributes = _cookie_attributes(app[SETTINGS].secure_cookies)
        # Written by hand: both values are ULIDs (nothing to quote), and http.cookies' Morsel
        # costs more than the rest of the response.
        self.visitor_tail = f"; Max-Age={YEAR}{attributes}"
        self.last_click_tail = f"; Max-Age={LAST_CLICK_AGE}{attributes}"

    async def click(self, hit: Hit) -> Answer:
        campaign = self.campaigns.get(hit.slug) or await self.campaigns.find(hit.slug)
        if campaign is None or campaign.status != "active":
            return self._not_active(campaign)
        try:
            params = read_params(hit.query)
        except ApiError as exc:
            metrics.dropped("click", DropReason.INVALID_PARAMS)
            return error_answer(exc)
        if hit.method == "HEAD":
            # Link checkers and unfurlers probe with HEAD: same answer, nothing recorded.
            return _redirect(self.tracker.location(campaign, params, "")[1])
        result = await self.tracker.click(hit, campaign, params)
        headers = [("Location", result.location), ("Cache-Control", NO_STORE),
                   ("Set-Cookie", f"{VISITOR_COOKIE}={result.visitor_id}{self.visitor_tail}")]
        if result.recorded:
            headers.append(
                ("Set-Cookie", f"{LAST_CLICK_COOKIE}={result.click_id}{self.last_click_tail}"))
        return Answer(302, headers)

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

    async def pixel(self, hit: Hit) -> Answer:
        """Always the GIF: a broken pixel must never break the page that carries it."""
        if hit.method == "HEAD":
            return PIXEL
        try:
            campaigns = self.campaigns
            campaign = campaigns.get(hit.slug) or await campaigns.find(hit.slug)
            if campaign is None:
                metrics.dropped("impression", DropReason.UNKNOWN_CAMPAIGN if campaigns.loaded
                                else DropReason.NOT_READY)
            else:
                await self.tracker.impression(hit, campaign, read_params(hit.query))
        except ApiError:
            metrics.dropped("impression", DropReason.INVALID_PARAMS)
        except Exception:  # noqa: BLE001 - whatever failed is counted, the GIF still goes out
            metrics.dropped("impression", DropReason.INTERNAL_ERROR)
            self.logger.exception("impression not recorded")
        return PIXEL


async def answer_click(app: web.Application, hit: Hit) -> Answer:
    return await Tracking(app).click(hit)


async def answer_pixel(app: web.Application, hit: Hit) -> Answer:
    return await Tracking(app).pixel(hit)


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
    for name, value in answer.headers:
        response.headers.add(name, value)
    return response


async def click(request: web.Request) -> web.StreamResponse:
    return response_of(await answer_click(request.app, hit_of(request)))


async def impression(request: web.Request) -> web.StreamResponse:
    return response_of(await answer_pixel(request.app, hit_of(request)))
