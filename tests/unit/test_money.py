"""The one money format: what is accepted, what is refused, and how it is written."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker import money


@pytest.mark.parametrize("text", ["0", "0.25", "2", "999999999999.999999", "1.000000", "10"])
def test_input_amounts_accepted(text: str) -> None:
    assert money.parse(text) == Decimal(text)


@pytest.mark.parametrize("value", [
    "-1", "+1", "1e3", "1E3", "NaN", "nan", "Infinity", "inf", "1.2345678", "1000000000000",
    "01", "1.", ".5", " 1", "1 ", "", "1,5", 1, 1.5, None, True, "١",
])
def test_input_amounts_refused(value: object) -> None:
    with pytest.raises(money.MoneyError):
        money.parse(value)


def test_an_event_amount_may_carry_three_more_places() -> None:
    assert money.event_amount("0.001234567") == "0.001234567"
    assert money.event_amount("") == "0" and money.event_amount(None) == "0"
    for bad in ["0.0012345678", "-1", "1e-3", 5, "NaN"]:
        with pytest.raises(money.MoneyError):
            money.event_amount(bad)


def test_per_mille_is_exact_and_written_plainly() -> None:
    for text in ["1.2345", "999999999999.999999", "0.000001", "3"]:
        value = money.per_mille(Decimal(text))
        assert value * 1000 == Decimal(text)
        written = money.to_str(value)
        assert "E" not in written and "e" not in written
        money.event_amount(written)  # what a campaign makes, the writer takes
    assert money.to_str(Decimal("0.250000")) == "0.25"
    assert money.to_str(Decimal("2.000000")) == "2"
    assert money.to_str(Decimal("1E+11")) == "100000000000"
    assert money.to_str(Decimal("-0.000")) == "0"


def test_per_unit() -> None:
    assert money.nanos_per_unit(money.nanos("1.000000000"), 3) == "0.333333333"
    assert money.nanos_per_unit(money.nanos("2.000000000"), 3) == "0.666666667"
    assert money.nanos_per_unit(money.nanos("1.000000000"), 0) is None


# What a report's sums can be: sums of numeric(21, 9), as PostgreSQL writes numeric(38, 9).
amounts = st.one_of(
    st.decimals(min_value=-10**15, max_value=10**15, places=9, allow_nan=False,
                allow_infinity=False),
    st.sampled_from([Decimal("0"), Decimal("-0.000"), Decimal("1E+11"), Decimal("0.000000001"),
                     Decimal("0.000000005"), Decimal("0.000000015"), Decimal("-2.5")]))


@given(amounts, st.integers(min_value=-3, max_value=10**12))
def test_nano_figures_equal_decimal_ones(amount: Decimal, count: int) -> None:
    """The reports' integer money (fast) writes what Decimal writes, to the last digit, ties
    rounded to even alike."""
    text = format(amount.quantize(Decimal("1E-9")), "f")
    if text.startswith("-") and not amount:
        text = text[1:]  # PostgreSQL has no negative zero
    units = money.nanos(text)
    assert Decimal(units).scaleb(-9) == amount
    assert money.nanos_to_str(units) == money.to_str(amount)
    # Decimal's figure: the quotient (28 digits), quantized to 9 places, half to even.
    expected = None if not count else money.to_str(
        (amount / Decimal(count)).quantize(Decimal("1E-9"), rounding=ROUND_HALF_EVEN))
    assert money.nanos_per_unit(units, count) == expected


def test_nanos_refuses_text_of_another_scale() -> None:
    assert money.nanos("12.500000000") == 12_500_000_000
    assert money.nanos("-0.000000001") == -1
    with pytest.raises(ValueError):
        money.nanos("12.5")
