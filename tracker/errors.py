"""Error codes and the one place that renders them as the contract's JSON error."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


class ApiError(Exception):
    """A request we refuse, with its HTTP status, a stable code, and the field at fault."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def bad_request(code: str, message: str, field: str | None = None) -> ApiError:
    return ApiError(400, code, message, field)


def object_with(body: object, fields: frozenset[str]) -> dict[str, Any]:
    """`body` as a JSON object of known fields; an unknown one is refused by name."""
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "the body must be a JSON object")
    unknown = set(body) - fields
    if unknown:
        name = sorted(unknown)[0]
        raise bad_request("unknown_field", f"unknown field {name!r}", name)
    return body


def not_found(message: str = "no such thing", code: str = "not_found") -> ApiError:
    return ApiError(404, code, message)


def error_body(status: int, code: str, message: str, field: str | None = None) -> bytes:
    error: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return orjson.dumps({"error": error})


def error_response(error: ApiError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_body(error.status, error.code, error.message, error.field),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


# Codes for the statuses aiohttp raises itself (unknown route, wrong method, body too big).
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    431: "headers_too_large",
    503: "not_ready",
}
