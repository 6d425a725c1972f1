"""The one money format: what is accepted, what is refused, and how it is written."""

from __future__ import annotations

from decimal import Decimal

import pytest

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
    assert money.per_unit(Decimal("1"), 3) == "0.333333333"
    assert money.per_unit(Decimal("1"), 0) is None
