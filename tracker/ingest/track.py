"""One object decides what a tracking request records (Shlink's RequestTracker): it turns a
request for a campaign into an event and hands it to the buffer. Handlers only answer."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from .. import metrics
from ..metrics import DropReason
from ..campaigns import Campaign
from ..ids import new_id_text
from ..macros import fill
from ..storage.lines import click_line, impression_line
from .buffer import EventBuffer
from .spool import Spool
from .visitor import MAX_REFERER, Countries, Hit, UserAgents, clean_header, visitor_of

log = logging.getLogger(__name__)

WARN_EVERY_SECONDS = 10.0
VISITOR_COOKIE = "tv"
LAST_CLICK_COOKIE = "tlc"


@dataclass(slots=True)  # not frozen: cheaper to make, one per click
class Click:
    click_id: str
    visitor_id: str
    location: str
    recorded: bool


class RequestTracker:
    def __init__(self, buffer: EventBuffer, spool: Spool, agents: UserAgents, countries: Countries,
                 proxy_hops: int) -> None:
        self._buffer = buffer
        self._spool = spool
        self._agents = agents
        self._countries = countries
        self._proxy_hops = proxy_hops
        self._rng = random.Random()
        self._last_warning = -WARN_EVERY_SECONDS
        # Counter children looked up once: labels() costs as much as inc() itself.
        self._click_outcomes = {o: metrics.EVENTS.labels("click", o)
                                for o in ("accepted", "duplicate", "bot")}
        self._impression_outcomes = {o: metrics.EVENTS.labels("impression", o)
                                     for o in ("accepted", "bot")}
        # Which request header carries a trusted country code (read by the servers).
        self.country_header = countries.header

    def _warn_redis_down(self, exc: Exception) -> None:
        # At thousands of hits a second, one line per hit would drown the log: one line per
        # interval says the same, and tracker_events_dropped_total counts every hit.
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning("Redis failed (%s: %s); events go to the local spool until it is back",
                        type(exc).__name__, exc)

    def visitor_id(self, hit: Hit) -> str:
        cookie = hit.visitor_cookie
        # Ours are ULIDs; anything else of that shape is harmless as a key part, and this
        # check costs a tenth of decoding it.
        if len(cookie) == 26 and cookie.isascii() and cookie.isalnum():
            return cookie
        return new_id_text()

    def location(self, campaign: Campaign, params: dict[str, str], click_id: str) -> tuple[str, str]:
        """(the configured URL picked by weight, that URL with the click's macros filled)."""
        url, template = campaign.pick(self._rng)
        values = dict(params, click_id=click_id, campaign=campaign.slug)
        return url, fill(template, values)

    def click(self, hit: Hit, campaign: Campaign, params: dict[str, str],
              done: Callable[[Click], None]) -> None:
        """Record a click; `done` gets what to answer once the buffer took it (or the spool,
        when Redis failed). Called back, not awaited: no task, no future per click."""
        visitor_id = self.visitor_id(hit)
        new_visitor = visitor_id != hit.visitor_cookie  # made for this click: unique
        click_id = self._buffer.stamp(new_id_text(), campaign.id, visitor_id)
        _, location = self.location(campaign, params, click_id)
        ip, country, device, is_bot, user_agent = visitor_of(
            hit, self._agents, self._countries, self._proxy_hops)
        campaign_id = campaign.id
        line = click_line(click_id, campaign_id, visitor_id, params, ip, country, device,
                          user_agent, clean_header(hit.referer, MAX_REFERER) if hit.referer else "",
                          is_bot, location, "0" if is_bot else campaign.click_cost)

        def buffered(unique: Any) -> None:
            try:
                if isinstance(unique, RedisError):
                    click = self._click_spooled(click_id, campaign_id, visitor_id, is_bot,
                                                line, location, unique)
                else:
                    metrics.TALLY.inc(self._click_outcomes[
                        "bot" if is_bot else ("accepted" if unique else "duplicate")])
                    click = Click(click_id, visitor_id, location, recorded=True)
            except Exception:  # noqa: BLE001 - the visitor is answered whatever failed here
                log.exception("click %s: recording failed", click_id)
                click = Click(click_id, visitor_id, location, recorded=False)
            done(click)

        self._buffer.add_click(click_id, campaign_id, visitor_id, is_bot, new_visitor, line,
                               buffered)

    def _click_spooled(self, click_id: str, campaign_id: int, visitor_id: str, is_bot: bool,
                       line: str, location: str, exc: RedisError) -> Click:
        # The visitor still gets their redirect: our outage must not break their journey,
        # nor lose the click: it waits in the local spool until Redis is back.
        metrics.BACKEND_ERRORS.labels("redis").inc()
        self._warn_redis_down(exc)
        try:
            self._spool.append_click(click_id, campaign_id, visitor_id, is_bot, line)
        except OSError as disk:
            metrics.dropped("click", DropReason.BUFFER_UNAVAILABLE)
            log.error("click %s lost: Redis and the spool both failed: %r", click_id, disk)
            return Click(click_id, visitor_id, location, recorded=False)
        metrics.TALLY.inc(self._click_outcomes["bot" if is_bot else "accepted"])
        return Click(click_id, visitor_id, location, recorded=True)

    def impression(self, hit: Hit, campaign: Campaign, params: dict[str, str],
                   done: Callable[[], None]) -> None:
        """Record an impression; `done` is called once the buffer (or the spool) took it, or
        it was lost (counted)."""
        ip, country, device, is_bot, user_agent = visitor_of(
            hit, self._agents, self._countries, self._proxy_hops)
        impression_id, campaign_id, visitor_id = new_id_text(), campaign.id, self.visitor_id(hit)
        line = impression_line(impression_id, campaign_id, visitor_id, params, ip, country,
                               device, user_agent, is_bot,
                               "0" if is_bot else campaign.impression_cost)

        def buffered(result: Any) -> None:
            try:
                if isinstance(result, RedisError):
                    self._impression_spooled(impression_id, campaign_id, visitor_id, line, result)
                metrics.TALLY.inc(self._impression_outcomes["bot" if is_bot else "accepted"])
            except OSError as disk:
                metrics.dropped("impression", DropReason.BUFFER_UNAVAILABLE)
                log.error("impression lost: Redis and the spool both failed: %r", disk)
            except Exception:  # noqa: BLE001 - counted; the pixel is answered all the same
                metrics.dropped("impression", DropReason.INTERNAL_ERROR)
                log.exception("impression not recorded")
            done()

        self._buffer.add(impression_id, campaign_id, visitor_id, line, buffered)

    def _impression_spooled(self, impression_id: str, campaign_id: int, visitor_id: str,
                            line: str, exc: RedisError) -> None:
        metrics.BACKEND_ERRORS.labels("redis").inc()
        self._warn_redis_down(exc)
        self._spool.append_impression(impression_id, campaign_id, visitor_id, line)
