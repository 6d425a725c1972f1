"""The one middleware: count and time every request, and turn every failure into the
contract's JSON error (never a stack trace, never a 500 for bad input)."""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from . import metrics
from .errors import HTTP_CODES, ApiError, error_body, error_response
from .handlers.common import require_token
from .keys import SETTINGS
from .routes import ADMIN_PATHS
from .storage.db import UNREACHABLE

log = logging.getLogger(__name__)

OPERATOR_API = "/api/"
MAX_URL = 8192
MAX_HEADER = 8192
# aiohttp's connection handlers: no access log (metrics count requests), and a parser that
# accepts long lines so that `observe` answers 414/431 instead of the parser's 400.
HANDLER_ARGS: dict[str, Any] = {"access_log": None, "max_line_size": 65536,
                                "max_field_size": 65536}


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        if len(request.raw_path) > MAX_URL:
            raise ApiError(414, "uri_too_long", f"the URL must be at most {MAX_URL} bytes")
        if any(len(name) > MAX_HEADER or len(value) > MAX_HEADER
               for name, value in request.raw_headers):
            raise ApiError(431, "headers_too_large", f"a header must be at most {MAX_HEADER} bytes")
        admin_port = request.app[SETTINGS].admin_port if request.app[SETTINGS].admin_listen else 0
        if admin_port and (request.path in ADMIN_PATHS) != (_local_port(request) == admin_port):
            # Metrics and health on the admin address only, and nothing else there.
            raise ApiError(404, "not_found", "no such resource here")
        if request.path.startswith(OPERATOR_API):
            # Before routing: without a valid token, every /api/ path answers 401, even one
            # that does not exist, so the API's shape is not probed for free.
            require_token(request)
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc)
    except UNREACHABLE:
        # A lookup or report while PostgreSQL is away: not our bug, and it will pass.
        response = error_response(ApiError(503, "not_ready", "PostgreSQL is unavailable; "
                                           "try again shortly"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = web.Response(
            status=exc.status,
            body=error_body(exc.status, HTTP_CODES.get(exc.status, "error"), exc.reason),
            content_type="application/json",
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.rel_url.path)
        response = web.Response(status=500, body=error_body(500, "internal", "internal error"),
                                content_type="application/json")
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    status = str(response.status)
    metrics.HTTP_REQUESTS.labels(label, request.method, status).inc()
    metrics.HTTP_LATENCY.labels(label, status).observe(time.perf_counter() - started)
    return response


def _local_port(request: web.Request) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if isinstance(sockname, tuple) else 0


class JsonErrors(web.RequestHandler):
    """aiohttp's connection handler, answering the contract's JSON error where aiohttp would
    answer text/plain: a request its parser refuses never reaches the app (nor `observe`), it
    goes straight to handle_error."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own: it logs, and raises when an answer has already begun.
        super().handle_error(request, status, exc, message)
        text = {400: "malformed HTTP request", 500: "internal error"}.get(status)
        response = web.Response(
            status=status, content_type="application/json",
            body=error_body(status, HTTP_CODES.get(status, "error"),
                            text or HTTPStatus(status).phrase))
        response.force_close()
        return response
