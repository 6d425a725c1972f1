"""Attribution models: exact credits on small paths, and what holds for every path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from tracker.attribution import MODELS, Touch, UnknownModel, check_model, credit

CONVERTED = datetime(2024, 3, 30, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


def path(n: int, step: timedelta = WEEK) -> list[Touch]:
    """n touches a `step` apart, the last one at the conversion."""
    return [Touch(click_id=f"click-{i}", ts=CONVERTED - (n - 1 - i) * step, campaign_id=i)
            for i in range(n)]


def d(*texts: str) -> list[Decimal]:
    return [Decimal(t) for t in texts]


# Time decay's touches are whole half lives (7 days) apart, so each weighs twice the one
# before it: 1:2 → 1/3, 2/3; 1:2:4 → 1/7, 2/7, 4/7; 1:2:4:8:16 → n/31.
EXPECTED = {
    "last_click": {1: d("1"), 2: d("0", "1"), 3: d("0", "0", "1"), 5: d("0", "0", "0", "0", "1")},
    "first_click": {1: d("1"), 2: d("1", "0"), 3: d("1", "0", "0"), 5: d("1", "0", "0", "0", "0")},
    "linear": {1: d("1"), 2: d("0.5", "0.5"), 3: d("0.333333", "0.333333", "0.333334"),
               5: d("0.2", "0.2", "0.2", "0.2", "0.2")},
    "time_decay": {1: d("1"), 2: d("0.333333", "0.666667"),
                   3: d("0.142857", "0.285714", "0.571429"),
                   5: d("0.032258", "0.064516", "0.129032", "0.258064", "0.51613")},
    "position_based": {1: d("1"), 2: d("0.5", "0.5"), 3: d("0.4", "0.2", "0.4"),
                       5: d("0.4", "0.066666", "0.066666", "0.066666", "0.400002")},
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_exact_credits(model: str, n: int) -> None:
    shares = credit(model, path(n), CONVERTED)
    assert shares == EXPECTED[model][n]
    assert sum(shares) == 1


def test_every_model_has_expected_credits() -> None:
    assert set(EXPECTED) == set(MODELS) == {"last_click", "first_click", "linear", "time_decay",
                                            "position_based"}


def test_time_decay_weighs_by_the_time_before_the_conversion() -> None:
    # One day apart with a one-day half life: the newer touch counts twice the older one.
    shares = credit("time_decay", path(2, timedelta(days=1)), CONVERTED,
                    half_life=timedelta(days=1))
    assert shares == d("0.333333", "0.666667")
    # Half a half life apart: weights 1 and √2, so 1/(1+√2) and √2/(1+√2).
    shares = credit("time_decay", path(2, timedelta(hours=84)), CONVERTED)
    assert shares == d("0.414213", "0.585787")


def test_time_decay_survives_touches_many_half_lives_old() -> None:
    # Measured against 2^(-age/half_life) from the conversion, every weight here would
    # underflow to zero; the newest touch must still get (almost) everything.
    old = [Touch("a", CONVERTED - timedelta(days=3650), 1),
           Touch("b", CONVERTED - timedelta(days=3000), 1)]
    assert credit("time_decay", old, CONVERTED, half_life=timedelta(microseconds=1)) == d("0", "1")


def test_position_based_ends_share_is_a_parameter() -> None:
    shares = credit("position_based", path(4), CONVERTED, ends_share=Decimal("0.3"))
    assert shares == d("0.3", "0.2", "0.2", "0.3")
    # Two touches share equally whatever the ends' share.
    shares = credit("position_based", path(2), CONVERTED, ends_share=Decimal("0.3"))
    assert shares == d("0.5", "0.5")


def test_credits_follow_the_input_order_while_models_read_touches_by_time() -> None:
    first, middle, last = path(3)
    assert credit("first_click", [last, first, middle], CONVERTED) == d("0", "1", "0")
    assert credit("last_click", [last, first, middle], CONVERTED) == d("1", "0", "0")
    assert credit("position_based", [middle, last, first], CONVERTED) == d("0.2", "0.4", "0.4")


def test_bot_clicks_earn_nothing_and_are_not_counted_as_touches() -> None:
    first, middle, last = path(3)
    bot = Touch("bot", middle.ts, 9, is_bot=True)
    assert credit("linear", [first, bot, last], CONVERTED) == d("0.5", "0", "0.5")
    # Not a middle touch: two real touches split 50/50.
    assert credit("position_based", [first, bot, last], CONVERTED) == d("0.5", "0", "0.5")
    # The last real click converts, not a bot after it.
    late_bot = Touch("late-bot", CONVERTED, 9, is_bot=True)
    assert credit("last_click", [first, middle, late_bot], CONVERTED) == d("0", "1", "0")


def test_nothing_to_credit_is_refused() -> None:
    with pytest.raises(ValueError, match="no touch"):
        credit("linear", [], CONVERTED)
    with pytest.raises(ValueError, match="no touch"):
        credit("linear", [Touch("bot", CONVERTED, 1, is_bot=True)], CONVERTED)


def test_an_unknown_model_names_the_models() -> None:
    with pytest.raises(UnknownModel) as raised:
        credit("u_shaped", path(2), CONVERTED)
    assert isinstance(raised.value, ValueError)
    for model in MODELS:
        assert model in str(raised.value)
    with pytest.raises(UnknownModel):
        check_model("")
    assert check_model("linear") == "linear"


def test_parameters_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="half_life"):
        credit("time_decay", path(2), CONVERTED, half_life=timedelta(0))
    for share in ("0.51", "-0.1"):
        with pytest.raises(ValueError, match="ends_share"):
            credit("position_based", path(3), CONVERTED, ends_share=Decimal(share))


# Any path: up to 12 clicks over 60 days (ties in time included), some of them bots but not
# all, converted at any time from the first click to 30 days after the last.
START = datetime(2024, 1, 1, tzinfo=UTC)


@st.composite
def paths(draw: st.DrawFn) -> tuple[list[Touch], datetime]:
    offsets = draw(st.lists(st.integers(0, 60 * 86_400_000), min_size=1, max_size=12))
    bots = draw(st.lists(st.booleans(), min_size=len(offsets), max_size=len(offsets)))
    real = draw(st.integers(0, len(offsets) - 1))
    bots[real] = False
    touches = [Touch(click_id=f"{i:02d}", ts=START + timedelta(milliseconds=ms), campaign_id=i,
                     is_bot=bot) for i, (ms, bot) in enumerate(zip(offsets, bots))]
    after = draw(st.integers(0, 30 * 86_400_000))
    return touches, START + timedelta(milliseconds=max(offsets) + after)


MODEL = st.sampled_from(MODELS)
HALF_LIFE = st.integers(1, 30 * 86_400).map(lambda s: timedelta(seconds=s))
ENDS = st.decimals(min_value=0, max_value=Decimal("0.5"), places=3)


@settings(max_examples=300, deadline=None)
@given(paths(), MODEL, HALF_LIFE, ENDS)
def test_credits_are_shares_of_one(drawn: tuple[list[Touch], datetime], model: str,
                                   half_life: timedelta, ends: Decimal) -> None:
    touches, converted = drawn
    shares = credit(model, touches, converted, half_life=half_life, ends_share=ends)
    assert len(shares) == len(touches)
    assert sum(shares) == Decimal(1)
    for touch, share in zip(touches, shares):
        assert share >= 0
        assert share == share.quantize(Decimal("0.000001"))  # six places at most
        if touch.is_bot:
            assert share == 0


@settings(max_examples=200, deadline=None)
@given(paths())
def test_last_click_gives_everything_to_the_last_real_click(
        drawn: tuple[list[Touch], datetime]) -> None:
    touches, converted = drawn
    last = max((t for t in touches if not t.is_bot), key=lambda t: (t.ts, t.click_id))
    shares = credit("last_click", touches, converted)
    assert {t.click_id: s for t, s in zip(touches, shares) if s} == {last.click_id: Decimal(1)}


@settings(max_examples=300, deadline=None)
@given(paths(), MODEL, st.data())
def test_the_order_touches_come_in_does_not_matter(drawn: tuple[list[Touch], datetime],
                                                   model: str, data: st.DataObject) -> None:
    touches, converted = drawn
    shuffled = data.draw(st.permutations(touches))
    by_click = dict(zip((t.click_id for t in touches), credit(model, touches, converted)))
    again = dict(zip((t.click_id for t in shuffled), credit(model, shuffled, converted)))
    assert again == by_click
