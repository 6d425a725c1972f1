"""Malformed requests get the contract's JSON error with the right status and field: never
a 500, never a stack trace."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from yarl import URL

from ..conftest import AUTH, Running, eventually


async def error_of(service: Running, method: str, path: str, **kwargs: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    headers = dict(AUTH) | dict(kwargs.pop("headers", {}))  # type: ignore[call-overload]
    async with service.http.request(method, URL(service.url(path), encoded=True),
                                    headers=headers, allow_redirects=False, **kwargs) as r:  # type: ignore[arg-type]
        body = await r.json()
        assert r.headers["Content-Type"].startswith("application/json")
        assert "Traceback" not in str(body)
        return r.status, body["error"]


@pytest.mark.parametrize("data, ctype, field, code", [
    (b"not json", "application/json", None, "invalid_json"),
    (b"", "application/json", None, "invalid_json"),
    (b"[1, 2]", "application/json", None, "invalid_body"),
    (b'"string"', "application/json", None, "invalid_body"),
    (b'{"destination_url": 5}', "application/json", "destination_url", "invalid_type"),
    (b'{"destination_url": "https://s.example/", "extra": 1}', "application/json", "extra", "unknown_field"),
    (b'{"destination_url": "javascript:alert(1)"}', "application/json", "destination_url", "invalid_url"),
    (b'{"destination_url": "data:text/html,hi"}', "application/json", "destination_url", "invalid_url"),
    (b'{"destination_url": "/relative"}', "application/json", "destination_url", "invalid_url"),
    (b'{"destination_url": "https://s.example/", "slug": "a/b"}', "application/json", "slug", "invalid_slug"),
    (b'{"destination_url": "https://s.example/", "slug": ".."}', "application/json", "slug", "invalid_slug"),
    (b'{"destination_url": "https://s.example/", "slug": "a\\u0000b"}', "application/json", "slug", "invalid_slug"),
    (b'{"destination_url": "https://s.example/", "cost_value": 1}', "application/json", "cost_value", "invalid_decimal"),
    (b'{"destination_url": "https://s.example/", "name": ["x"]}', "application/json", "name", "invalid_type"),
    (b'\xff\xfe{', "application/json", None, "invalid_json"),
])
async def test_campaign_bodies(service: Running, data: bytes, ctype: str, field: str | None,
                               code: str) -> None:
    status, error = await error_of(service, "POST", "/api/campaigns", data=data,
                                   headers={"Content-Type": ctype})
    assert status == 400
    assert error["code"] == code and error.get("field") == field


async def test_too_large_body_is_413(service: Running) -> None:
    status, error = await error_of(service, "POST", "/api/campaigns", data=b"x" * 300_000)
    assert status == 413


@pytest.mark.parametrize("path, status", [
    ("/c/a%2Fb", 404), ("/c/..", 404), ("/c/a%00b", 404), ("/c/%2E%2E", 404),
    ("/c/" + "x" * 65, 404), ("/nowhere", 404), ("/c/", 404),
])
async def test_slugs_that_cannot_exist(service: Running, path: str, status: int) -> None:
    got, error = await error_of(service, "GET", path)
    assert got == status


async def test_tracking_parameters(service: Running) -> None:
    await service.create_campaign(slug="bad")
    status, error = await error_of(service, "GET", "/c/bad?sub1=" + "a" * 5000)
    assert (status, error["field"], error["code"]) == (400, "sub1", "value_too_long")
    status, error = await error_of(service, "GET", "/c/bad?pub=%FF%FEx")
    assert (status, error["field"], error["code"]) == (400, "pub", "invalid_encoding")
    status, error = await error_of(service, "GET", "/c/bad?sub2=a%00b")
    assert (status, error["field"]) == (400, "sub2")
    # Unknown parameters (networks append their own) are ignored, not refused.
    r = await service.click("bad", "xyz_from_network=" + "g" * 5000)
    assert r.status == 302
    # So is an ad platform's click id we cannot keep: the platform wrote it, not the operator,
    # and the visitor still gets the landing page (the click is kept without it).
    r = await service.click("bad", "gclid=" + "g" * 5000 + "&fbclid=ok")
    assert r.status == 302
    last_click = [c for c in r.headers.getall("Set-Cookie") if c.startswith("tlc=")]
    status, click = await service.api("GET", "/api/clicks/" + last_click[0][4:30])
    assert status == 200 and (click["gclid"], click["fbclid"]) == ("", "ok"), click


async def test_wrong_method_and_oversized_url(service: Running) -> None:
    status, error = await error_of(service, "PUT", "/api/campaigns")
    assert status == 405 and error["code"] == "method_not_allowed"
    status, error = await error_of(service, "GET", "/c/x?gclid=" + "g" * 9000)
    assert status == 414
    status, error = await error_of(service, "GET", "/c/x", headers={"X-Big": "b" * 9000})
    assert status == 431 and error["code"] == "headers_too_large"


async def raw_click(service: Running, request_line: bytes) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one request sent as raw bytes, which no client library would."""
    host, port = service.settings.host, service.settings.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(response.split(b" ", 2)[1]), head, body


async def test_raw_non_utf8_bytes_in_the_request_line(service: Running,
                                                      pg: asyncpg.Connection) -> None:
    """Networks send raw UTF-8 in click URLs: it is read as UTF-8. Raw bytes that are not
    UTF-8 are refused naming the parameter, as their %XX form is."""
    await service.create_campaign(slug="raw", destination_url="https://shop.example/?s={sub1}")
    status, head, body = await raw_click(service, b"GET /c/raw?sub1=\xff\xfe HTTP/1.1")
    assert status == 400, head
    assert b"Content-Type: application/json" in head
    error = json.loads(body)["error"]
    assert (error["code"], error["field"]) == ("invalid_encoding", "sub1")
    status, head, _ = await raw_click(service, b"GET /c/raw?sub1=caf\xc3\xa9 HTTP/1.1")
    assert status == 302, head
    assert b"\r\nLocation: https://shop.example/?s=caf%C3%A9\r\n" in head


    async def stored() -> str | None:
        sub1: str | None = await pg.fetchval("SELECT sub1 FROM clicks")
        return sub1

    assert await eventually(stored) == "café"
