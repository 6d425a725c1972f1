"""The conversion endpoints: `GET|POST /postback` (server to server), Binom's `/click.php`,
and the `/conversion.gif` pixel. They read the request's parameters, hand them to the
recorder, and answer: JSON (or the text Keitaro's `return=` asks for) for postbacks, and
always the GIF for the pixel, whatever went wrong."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from .. import metrics
from ..conversion import params as conversion_params
from ..conversion.params import ConversionInput
from ..conversion.record import Recorded
from ..conversion.fx import AmountTooLarge, CurrencyUnsupported, FxUnavailable
from ..conversion.rules import InvalidTransition
from ..errors import ApiError, bad_request, error_response
from ..ingest.track import LAST_CLICK_COOKIE
from ..ingest.visitor import Hit, client_ip
from ..keys import CONVERSIONS, SETTINGS
from .common import read_body
from ..metrics import DropReason
from .tracking import NO_STORE, PIXEL, Answer, error_answer, response_of

MAX_BODY = 64 * 1024
FORM = "application/x-www-form-urlencoded"

REASONS: dict[str, DropReason] = {
    "unknown_click": DropReason.UNKNOWN_CLICK,
    "invalid_transition": DropReason.INVALID_TRANSITION,
    "unauthorized": DropReason.UNAUTHORIZED,
    "currency_unsupported": DropReason.CURRENCY_UNSUPPORTED,
    "not_ready": DropReason.BUFFER_UNAVAILABLE,
}


def _reject(exc: ApiError) -> None:
    reason = REASONS.get(exc.code, DropReason.INVALID_PARAMS if exc.status < 500
                         else DropReason.INTERNAL_ERROR)
    metrics.dropped("conversion", reason)


async def _body_pairs(request: web.Request) -> list[tuple[str, str]]:
    if not request.body_exists:
        return []
    raw = await read_body(request, MAX_BODY)
    if not raw.strip():
        return []
    kind = request.content_type
    if kind == FORM:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("invalid_encoding", "the form body is not valid UTF-8") from None
        return parse_qsl(text, keep_blank_values=True, errors="strict")
    if kind == "application/json":
        return _json_pairs(raw)
    raise bad_request("unsupported_content_type",
                      f"a postback body must be {FORM} or application/json, not {kind or 'untyped'}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _json_pairs(raw: bytes) -> list[tuple[str, str]]:
    try:
        # Numbers as Decimal, never float: `"amount": 12.345678` arrives to the last digit.
        body = json.loads(raw.decode("utf-8"), parse_float=Decimal,
                          parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise bad_request("invalid_encoding", "the JSON body is not valid UTF-8") from None
    except ValueError as exc:
        raise bad_request("invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("invalid_json", "the JSON body must be an object")
    pairs = []
    for name, value in body.items():
        if value is None:
            continue
        if isinstance(value, bool) or isinstance(value, (dict, list)):
            field = conversion_params.NAME_OF.get(name, name)
            raise bad_request("invalid_type", f"{name} must be a string or a number", field)
        pairs.append((name, str(value)))
    return pairs


def address_of(app: web.Application, peer: str, forwarded_for: str) -> str:
    hit = Hit(method="", slug="", query={}, peer=peer, forwarded_for=forwarded_for)
    return client_ip(hit, app[SETTINGS].proxy_hops)


async def _record(app: web.Application, pairs: list[tuple[str, str]], source: str,
                  address: str, cookie_click_id: str = "") -> tuple[ConversionInput, Recorded]:
    """Read, decide and record; the contract's errors raised as ApiError."""
    ask = conversion_params.read(pairs, cookie_click_id)
    try:
        recorded = await app[CONVERSIONS].record(ask, source, address)
    except InvalidTransition as exc:
        raise ApiError(409, "invalid_transition", str(exc), "status") from None
    except CurrencyUnsupported as exc:
        raise ApiError(422, "currency_unsupported", f"no exchange rate for {exc.currency} into "
                       "the campaign's currency: set one with PUT /api/fx-rates", "currency") from None
    except AmountTooLarge as exc:
        raise ApiError(422, "amount_too_large", str(exc), "amount") from None
    except (RedisError, OSError, FxUnavailable, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        metrics.BACKEND_ERRORS.labels("redis" if isinstance(exc, RedisError) else "postgres").inc()
        raise ApiError(503, "not_ready", "the conversion could not be recorded now; "
                       "send it again shortly") from None
    metrics.EVENTS.labels("conversion", recorded.outcome).inc()
    return ask, recorded


# -- answers, for either server ----------------------------------------------------------------


async def answer_postback(app: web.Application, method: str, pairs: list[tuple[str, str]],
                          address: str, *, binom: bool = False) -> Answer:
    if method == "HEAD":
        # A link checker's probe must not record a conversion.
        return error_answer(ApiError(405, "method_not_allowed", "send GET or POST"))
    if binom and not any(name == "cnv_id" for name, _ in pairs):
        return error_answer(ApiError(404, "not_found", "only Binom's conversion postback "
                                     "(cnv_id=…) is answered here"))
    try:
        ask, recorded = await _record(app, pairs, "postback", address)
    except ApiError as exc:
        _reject(exc)
        return error_answer(exc)
    if ask.return_text is not None:
        return Answer(200, [("Cache-Control", NO_STORE)], ask.return_text.encode(),
                      "text/plain")
    return Answer(200, [("Cache-Control", NO_STORE)],
                  orjson.dumps({"status": recorded.outcome,
                                "conversion_id": recorded.conversion_id}),
                  "application/json")


async def answer_pixel(app: web.Application, method: str, pairs: list[tuple[str, str]],
                       address: str, last_click: str) -> Answer:
    """Always the GIF: a broken pixel must never break the shop's page."""
    if method == "HEAD":
        return PIXEL
    try:
        await _record(app, pairs, "pixel", address, last_click)
    except ApiError as exc:
        _reject(exc)
    except Exception:  # noqa: BLE001 - counted and logged; the GIF still goes out
        metrics.dropped("conversion", DropReason.INTERNAL_ERROR)
        app.logger.exception("conversion pixel not recorded")
    return PIXEL


# -- aiohttp routes (POST bodies, and connections the fast path handed over) -------------------


def _request_address(request: web.Request) -> str:
    return address_of(request.app, request.remote or "",
                      ",".join(request.headers.getall("X-Forwarded-For", ())))


async def _postback(request: web.Request, binom: bool) -> web.StreamResponse:
    try:
        pairs = list(request.query.items()) + await _body_pairs(request)
    except ApiError as exc:
        _reject(exc)
        return error_response(exc)
    return response_of(await answer_postback(request.app, request.method, pairs,
                                             _request_address(request), binom=binom))


async def postback(request: web.Request) -> web.StreamResponse:
    return await _postback(request, binom=False)


async def binom(request: web.Request) -> web.StreamResponse:
    """Binom's postback address, `/click.php?cnv_id=…`: only its conversion form is ours."""
    return await _postback(request, binom=True)


async def pixel(request: web.Request) -> web.StreamResponse:
    return response_of(await answer_pixel(
        request.app, request.method, list(request.query.items()), _request_address(request),
        request.cookies.get(LAST_CLICK_COOKIE, "")))
