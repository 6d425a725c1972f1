"""PUT and GET /api/fx-rates through the running service."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from ..conftest import AUTH, Running


async def put(service: Running, body: Any) -> tuple[int, Any]:
    return await service.api("PUT", "/api/fx-rates", json=body)


async def test_put_stores_the_rates_of_a_day_and_answers_them(
        service: Running, pg: asyncpg.Connection) -> None:
    status, body = await put(service, {
        "date": "2024-05-01", "base": "USD",
        "rates": {"EUR": "0.92", "TRY": "34.1", "jpy": "151.123456789012"}})
    assert status == 200, body
    assert body == {"date": "2024-05-01", "base": "USD",
                    "rates": {"EUR": "0.92", "JPY": "151.123456789012", "TRY": "34.1"}}
    rows = await pg.fetch("SELECT day::text, base, quote, rate::text FROM fx_rates ORDER BY quote")
    assert [tuple(r) for r in rows] == [
        ("2024-05-01", "USD", "EUR", "0.920000000000"),
        ("2024-05-01", "USD", "JPY", "151.123456789012"),
        ("2024-05-01", "USD", "TRY", "34.100000000000")]


async def test_the_date_defaults_to_today_utc(service: Running) -> None:
    status, body = await put(service, {"base": "eur", "rates": {"USD": "1.08"}})
    assert status == 200 and body["base"] == "EUR"
    assert body["date"] == datetime.now(UTC).date().isoformat()
    status, got = await service.api("GET", "/api/fx-rates")
    assert status == 200 and got["date"] == body["date"]
    assert [(r["base"], r["quote"], r["rate"]) for r in got["rates"]] == [("EUR", "USD", "1.08")]


async def test_a_second_put_of_the_same_day_replaces_the_rate(service: Running) -> None:
    await put(service, {"date": "2024-05-01", "base": "USD", "rates": {"EUR": "0.92"}})
    status, body = await put(service, {"date": "2024-05-01", "base": "USD",
                                       "rates": {"EUR": "0.9300"}})
    assert status == 200 and body["rates"] == {"EUR": "0.93"}
    status, got = await service.api("GET", "/api/fx-rates?date=2024-05-01")
    assert [(r["quote"], r["rate"]) for r in got["rates"]] == [("EUR", "0.93")]


async def test_get_answers_the_rates_in_force_on_a_day(service: Running) -> None:
    await put(service, {"date": "2024-05-01", "base": "USD",
                        "rates": {"EUR": "0.92", "TRY": "34.1"}})
    await put(service, {"date": "2024-05-03", "base": "USD", "rates": {"EUR": "0.95"}})
    await put(service, {"date": "2024-05-02", "base": "GBP", "rates": {"EUR": "1.17"}})

    async def on(query: str) -> list[tuple[str, str, str, str]]:
        status, body = await service.api("GET", f"/api/fx-rates?{query}")
        assert status == 200, body
        assert set(body) == {"date", "rates"}
        for r in body["rates"]:
            assert r["updated_at"].endswith("Z")
        return [(r["base"], r["quote"], r["rate"], r["date"]) for r in body["rates"]]

    assert await on("date=2024-04-30") == []
    assert await on("date=2024-05-01") == [("USD", "EUR", "0.92", "2024-05-01"),
                                           ("USD", "TRY", "34.1", "2024-05-01")]
    assert await on("date=2024-05-02") == [("GBP", "EUR", "1.17", "2024-05-02"),
                                           ("USD", "EUR", "0.92", "2024-05-01"),
                                           ("USD", "TRY", "34.1", "2024-05-01")]
    assert await on("date=2025-01-01&base=usd") == [("USD", "EUR", "0.95", "2024-05-03"),
                                                   ("USD", "TRY", "34.1", "2024-05-01")]
    assert await on("date=2025-01-01&base=JPY") == []


async def test_bad_bodies_name_the_field(service: Running, pg: asyncpg.Connection) -> None:
    good = {"date": "2024-05-01", "base": "USD", "rates": {"EUR": "0.92"}}
    cases: list[tuple[Any, str, str | None]] = [
        ([good], "invalid_body", None),
        ("0.92", "invalid_body", None),
        (good | {"day": "2024-05-01"}, "unknown_field", "day"),
        (good | {"date": "2024-5-1"}, "invalid_date", "date"),
        (good | {"date": "2024-02-30"}, "invalid_date", "date"),
        (good | {"date": "20240501"}, "invalid_date", "date"),
        (good | {"date": 20240501}, "invalid_date", "date"),
        ({"rates": {"EUR": "0.92"}}, "required", "base"),
        (good | {"base": "XYZ"}, "invalid_currency", "base"),
        (good | {"base": "US"}, "invalid_currency", "base"),
        (good | {"base": 840}, "invalid_currency", "base"),
        ({"base": "USD"}, "invalid_rates", "rates"),
        (good | {"rates": {}}, "invalid_rates", "rates"),
        (good | {"rates": [["EUR", "0.92"]]}, "invalid_rates", "rates"),
        (good | {"rates": {"EUR": "0.92", "XXY": "1"}}, "invalid_currency", "rates.XXY"),
        (good | {"rates": {"EURO": "0.92"}}, "invalid_currency", "rates.EURO"),
        (good | {"rates": {"usd": "1"}}, "invalid_currency", "rates.usd"),
        (good | {"rates": {"EUR": "0.92", "eur": "0.93"}}, "repeated_currency", "rates.eur"),
        # JSON numbers are refused: they would be read as binary floats.
        (good | {"rates": {"EUR": 0.92}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": 1}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "0"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "0.000000000000"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "-0.92"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "9.2e-1"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "0.9200000000001"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "1234567890123"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "NaN"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": " 0.92"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": "00.92"}}, "invalid_rate", "rates.EUR"),
        (good | {"rates": {"EUR": None}}, "invalid_rate", "rates.EUR"),
    ]
    for body, code, field in cases:
        status, answer = await put(service, body)
        assert status == 400, (body, answer)
        assert answer["error"]["code"] == code, (body, answer)
        assert answer["error"].get("field") == field, (body, answer)
        assert answer["error"]["message"]
    status, answer = await service.api("PUT", "/api/fx-rates", data=b"{not json",
                                       headers=AUTH | {"Content-Type": "application/json"})
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    # Nothing of a refused body was stored, not even its valid rates.
    assert await pg.fetchval("SELECT count(*) FROM fx_rates") == 0
    # The edges that are allowed.
    status, body = await put(service, good | {"rates": {"EUR": "0.000000000001",
                                                        "TRY": "999999999999.999999999999"}})
    assert status == 200 and body["rates"] == {"EUR": "0.000000000001",
                                               "TRY": "999999999999.999999999999"}


async def test_bad_queries_name_the_parameter(service: Running) -> None:
    for query, code, field in [("date=yesterday", "invalid_date", "date"),
                               ("date=2024-13-01", "invalid_date", "date"),
                               ("base=EURO", "invalid_currency", "base")]:
        status, body = await service.api("GET", f"/api/fx-rates?{query}")
        assert status == 400 and body["error"]["code"] == code and body["error"]["field"] == field


async def test_the_token_is_required(service: Running, pg: asyncpg.Connection) -> None:
    body = {"date": "2024-05-01", "base": "USD", "rates": {"EUR": "0.92"}}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}]:
        for method in ("PUT", "GET"):
            status, answer = await service.api(method, "/api/fx-rates", json=body,
                                               headers=headers)
            assert status == 401, (method, headers)
            assert answer["error"]["code"] == "unauthorized"
    assert await pg.fetchval("SELECT count(*) FROM fx_rates") == 0
