import random
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from tracker.campaigns import Campaign, validate
from tracker.errors import ApiError


def refused(body: Any, partial: bool = False) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate(body, partial=partial)
    assert info.value.status == 400
    return info.value


def test_a_full_campaign_is_cleaned() -> None:
    clean = validate({
        "slug": "summer-sale", "name": "Summer", "destination_url": "https://s.example/?c={click_id}",
        "rotation": [{"url": "https://s.example/a", "weight": 70}, {"url": "https://s.example/b", "weight": 30}],
        "cost_model": "cpc", "cost_value": "0.25", "currency": "eur",
        "payouts": [{"event": "lead", "amount": "2.00"}, {"event": "sale", "percent": "10"}],
        "postback_url": "https://n.example/pb?click={ext_click_id}&payout={payout}", "status": "paused",
    }, partial=False)
    assert clean["cost_value"] == Decimal("0.25")
    assert clean["currency"] == "EUR"
    assert clean["payouts"] == [{"event": "lead", "amount": "2"}, {"event": "sale", "percent": "10"}]


@pytest.mark.parametrize("body, field", [
    ({"destination_url": "https://s.example/", "bogus": 1}, "bogus"),
    ({"destination_url": "javascript:alert(1)"}, "destination_url"),
    ({"destination_url": "data:text/html;base64,PHNjcmlwdD4="}, "destination_url"),
    ({"destination_url": "/lp"}, "destination_url"),
    ({"destination_url": 42}, "destination_url"),
    ({}, "destination_url"),
    ({"destination_url": "https://s.example/", "slug": "a/b"}, "slug"),
    ({"destination_url": "https://s.example/", "slug": ".."}, "slug"),
    ({"destination_url": "https://s.example/", "slug": "a\x00b"}, "slug"),
    ({"destination_url": "https://s.example/", "slug": "x" * 65}, "slug"),
    ({"destination_url": "https://s.example/", "cost_model": "cpx"}, "cost_model"),
    ({"destination_url": "https://s.example/", "cost_value": 0.25}, "cost_value"),
    ({"destination_url": "https://s.example/", "cost_value": "-1"}, "cost_value"),
    ({"destination_url": "https://s.example/", "cost_value": "1e3"}, "cost_value"),
    ({"destination_url": "https://s.example/", "currency": "XYZ"}, "currency"),
    ({"destination_url": "https://s.example/", "currency": "US"}, "currency"),
    ({"destination_url": "https://s.example/", "status": "running"}, "status"),
    ({"rotation": [{"url": "https://s.example/", "weight": 0}]}, "rotation[0].weight"),
    ({"rotation": [{"url": "https://s.example/", "weight": 1.5}]}, "rotation[0].weight"),
    ({"rotation": [{"url": "https://s.example/", "weight": True}]}, "rotation[0].weight"),
    ({"rotation": [{"url": "https://s.example/", "weight": -3}]}, "rotation[0].weight"),
    ({"rotation": [{"url": "mailto:x@y", "weight": 1}]}, "rotation[0].url"),
    ({"rotation": "https://s.example/"}, "rotation"),
    ({"destination_url": "https://s.example/", "payouts": [{"event": "lead"}]}, "payouts[0]"),
    ({"destination_url": "https://s.example/", "payouts": [{"event": "lead", "amount": 2}]},
     "payouts[0].amount"),
    ({"destination_url": "https://s.example/", "postback_url": "https://n.example/?x={destination}"},
     "postback_url"),
    ({"destination_url": "https://s.example/", "fallback_url": "https://s.example/{sub1}"},
     "fallback_url"),
])
def test_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    assert refused(body).field == field


def test_a_body_that_is_not_an_object_is_refused() -> None:
    assert refused(["destination_url"]).code == "invalid_body"


def test_rotation_follows_weights_over_ten_thousand_picks() -> None:
    row = {"id": 1, "slug": "s", "status": "active", "cost_model": "none", "cost_value": Decimal(0),
           "currency": "USD", "fallback_url": None, "destination_url": None,
           "rotation": [{"url": "https://s.example/a", "weight": 70},
                        {"url": "https://s.example/b", "weight": 20},
                        {"url": "https://s.example/c", "weight": 10}]}
    campaign = Campaign.from_row(row)
    rng = random.Random(20261123)
    n = 10_000
    seen = Counter(campaign.pick(rng)[0] for _ in range(n))
    expected = {"https://s.example/a": 0.7 * n, "https://s.example/b": 0.2 * n,
                "https://s.example/c": 0.1 * n}
    chi2 = sum((seen[u] - e) ** 2 / e for u, e in expected.items())
    # 2 degrees of freedom: P(chi2 > 13.82) = 0.001.
    assert chi2 < 13.82, (seen, chi2)
