"""One object decides what a postback or conversion pixel records: it finds the click, reads
the conversion's state, applies the rules (rules.py) and writes the new state together with
the event for the batch writer, in one Redis step that only succeeds if nobody changed the
conversion since it was read.

Where the state comes from:
- Redis holds every conversion's state by click for `conversion_state_ttl` after its last
  change, in one hash per click. That is the fast answer to "seen before?".
- A state missing from Redis is trusted to be new only when Redis surely held it: the click
  is younger than the TTL, and younger than the moment from which Redis holds every state
  (the `conv-since` marker, set at start and again after Redis lost its data). Otherwise
  PostgreSQL is asked: its primary key on the conversion id (derived from the identity) is
  the authority, so a postback repeated after a Redis flush is still not counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

import asyncpg
import orjson
from redis.exceptions import RedisError

from .. import money
from ..campaign_cache import CampaignCache
from ..campaigns import Campaign
from ..errors import ApiError
from ..ids import decode_id, id_int
from ..ingest.buffer import EventBuffer
from ..redis_keys import Keys
from ..ingest.visitor import mask_ip
from ..macros import fill
from ..storage import lines
from ..storage import clicks as click_store
from ..storage import conversions as store
from . import rules
from .ids import conversion_id, state_field
from .params import ConversionInput

# Compare-and-set rounds before giving up (each lost round means another postback for the
# same conversion won: the next read sees its state, so two rounds settle nearly always).
MAX_ROUNDS = 8
CLICK_FIELDS = ("campaign_id", "visitor_id", "customer_id", "pub", "sub1", "sub2", "sub3",
                "sub4", "sub5", "country", "device", "ext_click_id", "utm_source",
                "utm_medium", "utm_campaign", "utm_term", "utm_content", "gclid", "gbraid",
                "wbraid", "fbclid", "ttclid", "msclkid")
DIMENSIONS = ("pub", "sub1", "sub2", "sub3", "sub4", "sub5", "country", "device")


class Rates(Protocol):
    async def convert(self, amount: Decimal, from_currency: str, to_currency: str,
                      day: date) -> Decimal: ...


class Authorize(Protocol):
    async def __call__(self, campaign: Campaign, ask: ConversionInput) -> None: ...

    async def forget(self, ask: ConversionInput) -> None: ...


@dataclass(frozen=True, slots=True)
class Recorded:
    outcome: str          # accepted, duplicate, updated
    conversion_id: str
    status: str


def unknown_click() -> ApiError:
    return ApiError(404, "unknown_click", "no click has this id", "click_id")


@functools.lru_cache(maxsize=16384)
def source_net(address: str) -> str | None:
    masked = mask_ip(address) if address else None
    if masked is None:
        return None
    return f"{masked}/{24 if ipaddress.ip_address(masked).version == 4 else 48}"


class ConversionRecorder:
    def __init__(self, buffer: EventBuffer, keys: Keys, pool: asyncpg.Pool,
                 campaigns: CampaignCache, rates: Rates, authorize: Authorize,
                 state_ttl: int) -> None:
        self._buffer = buffer
        self._keys = keys
        self._pool = pool
        self._click_reads = click_store.ClickReads(pool)
        self._campaigns = campaigns
        self._rates = rates
        self._authorize = authorize
        self._ttl = state_ttl

    async def mark_complete_from_now(self) -> None:
        """Redis holds every conversion state from now on (SET NX: an older mark stays)."""
        now = _now_ms()
        await asyncio.gather(*(self._buffer.call("SET", key, now, "NX")
                               for key in self._keys.all_conversions_since()))

    async def record(self, ask: ConversionInput, source: str, address: str) -> Recorded:
        if ask.click_id is None:
            raise ApiError(400, "required", "click_id is required", "click_id")
        try:
            click_value = id_int(ask.click_id)  # parsed once: its time, uuid and id follow
        except ValueError:
            raise ApiError(400, "invalid_click_id", "click_id is not a click id of ours",
                           "click_id") from None
        click_id = ask.click_id.upper()
        field = state_field(ask.event, ask.txid)
        states_key = self._keys.conversions(click_id)
        # Everything Redis may know, at once (the click's line takes a second round when its
        # entry is still in the stream).
        line, (version_raw, event_raw), since = await asyncio.gather(
            self._buffer.recent_line(click_id),
            self._buffer.call("HMGET", states_key, f"v:{field}", f"e:{field}"),
            self._buffer.call("GET", self._keys.conversions_since(click_id)))
        click = await self._click(click_value, line)
        campaign = await self._campaigns.by_id(int(click["campaign_id"]))
        if campaign is None:
            raise unknown_click()
        await self._authorize(campaign, ask)
        try:
            return await self._decide_and_write(ask, click_value, click_id, click, campaign,
                                                field, (version_raw, event_raw, since), source,
                                                address)
        except BaseException:
            if ask.signed:
                with contextlib.suppress(RedisError):
                    await self._authorize.forget(ask)
            raise

    async def _decide_and_write(self, ask: ConversionInput, click_value: int, click_id: str,
                                click: dict[str, Any], campaign: Campaign, field: str,
                                seen_in_redis: tuple[bytes | None, bytes | None, bytes | None],
                                source: str, address: str) -> Recorded:
        """The rules applied to the conversion's state, and the result written (compare and
        set: decided again if another postback changed it meanwhile)."""
        version_raw, event_raw, since = seen_in_redis
        states_key = self._keys.conversions(click_id)
        conv_id = conversion_id(click_id, click_value >> 80, ask.event, ask.txid)
        seen = int(version_raw or 0)
        current = _state_of(event_raw)
        if current is None and not self._surely_new(click_value >> 80, since):
            current = await self._stored_state(conv_id)
        for _ in range(MAX_ROUNDS):
            now_ms = _now_ms()
            decision = rules.decide(current, ask, campaign, now_ms)
            if decision.outcome == "duplicate":
                return Recorded("duplicate", conv_id, current.status if current else "")
            state = await self._priced(decision, campaign, current)
            event = self._event(conv_id, click_id, click, campaign, ask, state,
                                decision, source, address, now_ms)
            history = {k: event[k] for k in ("version", "ts_ms", "old_status", "status",
                                              "raw_status", "amount", "currency", "revenue",
                                              "source_net", "source")}
            done = await self._buffer.record_conversion(
                [self._keys.click_stream(click_id), states_key,
                 self._keys.conversions_since(click_id), self._keys.conversion(conv_id, click_id),
                 self._keys.backlog(self._keys.click_shard(click_id))],
                [field, seen, state.version, orjson.dumps(event), orjson.dumps(history),
                 self._ttl, now_ms, f"{click_id}\x1f{field}"])
            if done:
                return Recorded(decision.outcome, conv_id, state.status)
            # Another postback changed it first: decide again against what it wrote.
            version_raw, event_raw = await self._buffer.call(
                "HMGET", states_key, f"v:{field}", f"e:{field}")
            seen = int(version_raw or 0)
            current = _state_of(event_raw) or current
        raise ApiError(503, "busy", "this conversion is changing too often; try again")

    # -- reading ---------------------------------------------------------------------------

    async def _click(self, click_value: int, line: bytes | None) -> dict[str, Any]:
        if line is not None:
            return lines.click_event(line)
        ts = datetime.fromtimestamp((click_value >> 80) / 1000, UTC)
        row = await self._click_reads.get(UUID(int=click_value), ts)
        if row is None:
            raise unknown_click()
        return dict(row)

    def _surely_new(self, click_ms: int, since: bytes | None) -> bool:
        """Whether Redis would hold this click's conversion states if it had any."""
        if since is None:
            return False
        oldest = max(int(since), _now_ms() - self._ttl * 1000)
        return click_ms >= oldest

    async def _stored_state(self, conv_id: str) -> rules.State | None:
        row = await store.state(self._pool, decode_id(conv_id)[0])
        if row is None:
            return None
        return rules.State(
            version=row["version"], status=row["status"], raw_status=row["raw_status"],
            amount=row["amount"], currency=row["currency"].strip(), revenue=row["revenue"],
            cost=row["cost"], order_value=row["order_value"],
            created_ms=int(row["created_at"].timestamp() * 1000))

    # -- deciding --------------------------------------------------------------------------

    async def _priced(self, decision: rules.Decision, campaign: Campaign,
                      current: rules.State | None) -> rules.State:
        state = decision.state
        if not decision.amount_changed:
            revenue = state.revenue
        else:
            day = datetime.fromtimestamp(state.created_ms / 1000, UTC).date()
            revenue = await self._rates.convert(state.amount, state.currency, campaign.currency, day)
        return rules.priced(decision, campaign, revenue, current)

    def _event(self, conv_id: str, click_id: str, click: dict[str, Any], campaign: Campaign,
               ask: ConversionInput, state: rules.State, decision: rules.Decision,
               source: str, address: str, now_ms: int) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "conversion", "id": conv_id, "version": state.version,
            "click_id": click_id, "campaign_id": campaign.id, "campaign": campaign.slug,
            "revenue_currency": campaign.currency, "event": ask.event,
            "txid": ask.txid, "status": state.status, "old_status": decision.old_status,
            "raw_status": state.raw_status, "amount": money.to_str(state.amount),
            "currency": state.currency, "revenue": money.to_str(state.revenue),
            "cost": money.to_str(state.cost),
            "order_value": None if state.order_value is None else money.to_str(state.order_value),
            "customer_id": ask.customer_id or click.get("customer_id") or "",
            "visitor_id": click.get("visitor_id") or "",
            **{k: click.get(k) or "" for k in DIMENSIONS},
            "source": source, "created_ms": state.created_ms, "ts_ms": now_ms,
            "source_net": source_net(address), "outcome": decision.outcome,
        }
        event["postback"] = self._postback_url(campaign, click, event)
        return event

    @staticmethod
    def _postback_url(campaign: Campaign, click: dict[str, Any], event: dict[str, Any]) -> str:
        if campaign.postback_url is None:
            return ""
        if campaign.postback_on == "approved" and event["status"] != "approved":
            return ""
        values = {k: str(click.get(k) or "") for k in CLICK_FIELDS}
        values |= {"click_id": event["click_id"], "conversion_id": event["id"],
                   "campaign": campaign.slug, "payout": event["revenue"],
                   "event": event["event"], "txid": event["txid"], "status": event["status"],
                   "currency": campaign.currency, "customer_id": event["customer_id"]}
        return fill(campaign.postback_url, values)


def _state_of(raw: bytes | None) -> rules.State | None:
    """The state a conversion's latest event (as Redis keeps it) describes."""
    if raw is None:
        return None
    e = orjson.loads(raw)
    return rules.State(
        version=int(e["version"]), status=e["status"], raw_status=e["raw_status"],
        amount=Decimal(e["amount"]), currency=e["currency"], revenue=Decimal(e["revenue"]),
        cost=Decimal(e["cost"]),
        order_value=None if e["order_value"] is None else Decimal(e["order_value"]),
        created_ms=int(e["created_ms"]))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
