"""Pieces every operator API handler uses: the token check and the JSON body."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web

from ..errors import ApiError, bad_request
from ..keys import SETTINGS

MAX_BODY = 256 * 1024


def require_token(request: web.Request) -> None:
    expected = request.app[SETTINGS].api_token
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <TRACKER_API_TOKEN>")
    if not expected or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "the bearer token is not valid")


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole body, refused with 413 past `limit` (before reading it, when it says so)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes")
    raw = await request.read()
    if len(raw) > limit:
        raise ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes")
    return raw


async def read_json(request: web.Request) -> Any:
    raw = await read_body(request)
    if not raw.strip():
        raise bad_request("invalid_json", "the body must be a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request("invalid_json", f"the body is not valid JSON: {exc.msg}") from None


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})
