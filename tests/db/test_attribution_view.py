"""The attribution answer for one conversion: its touches with their credits, the click it is
attributed to always among them."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from tracker.attribution import UnknownModel
from tracker.attribution_view import attribution_view
from tracker.ids import decode_id, new_id
from tracker.settings import Settings

from .test_attribution_touches import CONVERTED, click

SETTINGS = Settings(attribution_lookback_days=30)


def conversion(click_id: Any, **fields: Any) -> dict[str, Any]:
    return {"id": uuid.UUID(int=42), "click_id": click_id, "visitor_id": "laptop",
            "customer_id": "cust-1", "created_at": CONVERTED, "campaign_id": 3, "pub": "copied",
            "sub1": "", "sub2": "", "sub3": "", "sub4": "", "sub5": ""} | fields


def credits(view: dict[str, Any]) -> dict[str, str]:
    return {t["click_id"]: t["credit"] for t in view["touches"]}


async def test_the_answer_lists_the_touches_oldest_first_with_their_credit(
        pg: asyncpg.Connection) -> None:
    phone = await click(pg, "phone", CONVERTED - timedelta(days=6), customer="cust-1",
                        campaign_id=5, pub="news", sub1="banner")
    laptop = await click(pg, "laptop", CONVERTED - timedelta(days=2), campaign_id=6)
    converting = await click(pg, "laptop", CONVERTED - timedelta(hours=1), campaign_id=7)

    view = await attribution_view(pg, SETTINGS, conversion(converting), "linear")

    assert view["conversion_id"] == str(uuid.UUID(int=42))
    assert (view["model"], view["lookback_days"]) == ("linear", 30)
    assert [t["click_id"] for t in view["touches"]] == [phone, laptop, converting]
    assert view["touches"][0] == {
        "click_id": phone, "time": (CONVERTED - timedelta(days=6)).isoformat()[:19] + "Z",
        "campaign_id": 5, "pub": "news", "sub1": "banner", "sub2": "", "sub3": "", "sub4": "",
        "sub5": "", "is_bot": False, "attributed": False, "credit": "0.333333"}
    assert [t["attributed"] for t in view["touches"]] == [False, False, True]
    assert credits(view) == {phone: "0.333333", laptop: "0.333333", converting: "0.333334"}
    assert sum(Decimal(c) for c in credits(view).values()) == 1


@pytest.mark.parametrize("model, expected", [
    ("last_click", ["0", "1"]), ("first_click", ["1", "0"]), ("linear", ["0.5", "0.5"]),
    ("position_based", ["0.5", "0.5"]),
])
async def test_each_model_answers(pg: asyncpg.Connection, model: str,
                                  expected: list[str]) -> None:
    first = await click(pg, "laptop", CONVERTED - timedelta(days=3))
    last = await click(pg, "laptop", CONVERTED - timedelta(days=1))
    view = await attribution_view(pg, SETTINGS, conversion(last), model)
    assert [t["credit"] for t in view["touches"]] == expected
    assert [t["click_id"] for t in view["touches"]] == [first, last]


async def test_the_attributed_click_counts_though_older_than_the_window(
        pg: asyncpg.Connection) -> None:
    old = await click(pg, "laptop", CONVERTED - timedelta(days=45), pub="old-ad")
    recent = await click(pg, "laptop", CONVERTED - timedelta(days=1))
    view = await attribution_view(pg, SETTINGS, conversion(old), "first_click")
    assert credits(view) == {old: "1", recent: "0"}
    assert view["touches"][0]["pub"] == "old-ad" and view["touches"][0]["attributed"]


async def test_the_attributed_click_counts_though_flagged_a_bot(pg: asyncpg.Connection) -> None:
    flagged = await click(pg, "laptop", CONVERTED - timedelta(days=1), bot=True)
    view = await attribution_view(pg, SETTINGS, conversion(flagged), "last_click")
    assert [(t["click_id"], t["is_bot"], t["credit"]) for t in view["touches"]] == [
        (flagged, True, "1")]


async def test_other_bot_clicks_are_not_touches(pg: asyncpg.Connection) -> None:
    await click(pg, "laptop", CONVERTED - timedelta(days=2), bot=True)
    converting = await click(pg, "laptop", CONVERTED - timedelta(days=1))
    view = await attribution_view(pg, SETTINGS, conversion(converting), "linear")
    assert credits(view) == {converting: "1"}


async def test_a_click_not_yet_in_postgresql_is_told_from_the_conversion(
        pg: asyncpg.Connection) -> None:
    # The conversion arrived before the batch writer stored its click.
    earlier = await click(pg, "laptop", CONVERTED - timedelta(days=1))
    pending = str(new_id(int((CONVERTED - timedelta(seconds=1)).timestamp() * 1000)))
    view = await attribution_view(pg, SETTINGS, conversion(pending), "last_click")
    assert credits(view) == {earlier: "0", pending: "1"}
    last = view["touches"][-1]
    assert (last["campaign_id"], last["pub"], last["attributed"]) == (3, "copied", True)


async def test_the_click_id_may_be_a_uuid(pg: asyncpg.Connection) -> None:
    converting = await click(pg, "laptop", CONVERTED - timedelta(days=1))
    as_uuid, _ = decode_id(converting)
    for given in (as_uuid, str(as_uuid), converting.lower()):
        view = await attribution_view(pg, SETTINGS, conversion(given), "linear")
        assert credits(view) == {converting: "1"}, given


async def test_the_window_is_the_settings(pg: asyncpg.Connection) -> None:
    week_old = await click(pg, "laptop", CONVERTED - timedelta(days=8))
    converting = await click(pg, "laptop", CONVERTED - timedelta(days=1))
    view = await attribution_view(pg, Settings(attribution_lookback_days=7),
                                  conversion(converting), "linear")
    assert view["lookback_days"] == 7
    assert week_old not in credits(view)


async def test_an_unknown_model_is_refused_before_any_query() -> None:
    class NoDatabase:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"queried the database ({name}) for a refused model")

    with pytest.raises(UnknownModel, match="position_based"):
        await attribution_view(NoDatabase(), SETTINGS, conversion("x"), "w_shaped")
