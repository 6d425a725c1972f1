"""Random sequences of postbacks for a few clicks, through the service: what is stored, each
answer, and the report's figures equal what a small model of the rules predicts. The model
is written from the contract, not from tracker/conversion/rules.py."""

from __future__ import annotations

import itertools
from decimal import Decimal

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker.ids import uuid_to_id

from ..conftest import Running, flush
from .test_postback import new_click, postback, report

ALLOWED = {("pending", "approved"), ("pending", "declined"), ("approved", "reversed")}


def predict(model: dict[tuple[int, str, str], tuple[str, Decimal]], key: tuple[int, str, str],
            status: str, amount: str | None) -> str:
    """The answer the contract gives, applying it to `model` (identity → status, amount)."""
    current = model.get(key)
    if current is None:
        if status == "reversed":
            return "409"
        status = "declined" if status == "rejected" else status
        model[key] = (status, Decimal(amount or "0"))
        return "accepted"
    old_status, old_amount = current
    if status == "rejected":
        status = "reversed" if old_status in ("approved", "reversed") else "declined"
    new_amount = Decimal(amount) if amount is not None else old_amount
    if status == old_status and new_amount == old_amount:
        return "duplicate"
    if status != old_status and (old_status, status) not in ALLOWED:
        return "409"
    if status == old_status and old_status in ("declined", "reversed"):
        return "409"
    model[key] = (status, new_amount)
    return "updated"


postbacks = st.lists(st.tuples(
    st.integers(0, 1),                                   # which click
    st.sampled_from(["lead", "sale"]),                   # event
    st.sampled_from(["", "A"]),                          # txid
    st.sampled_from(["approved", "pending", "declined", "reversed", "rejected"]),
    st.sampled_from([None, "1", "2.5", "0.000001"]),      # amount
), min_size=2, max_size=16)
campaigns = itertools.count()


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=postbacks)
async def test_random_postback_sequences_match_the_model(
        quiet_service: Running, pg: asyncpg.Connection,
        sequence: list[tuple[int, str, str, str, str | None]]) -> None:
    s = quiet_service
    slug = f"model{next(campaigns)}"
    await s.create_campaign(slug=slug)
    clicks = [await new_click(s, slug) for _ in range(3)]
    model: dict[tuple[int, str, str], tuple[str, Decimal]] = {}
    ids: dict[tuple[int, str, str], str] = {}
    for which, event, txid, status, amount in sequence:
        query = f"click_id={clicks[which]}&event={event}&status={status}"
        query += f"&txid={txid}" if txid else ""
        query += f"&amount={amount}" if amount is not None else ""
        expected = predict(model, (which, event, txid), status, amount)
        code, body = await postback(s, query)
        got = body["status"] if code == 200 else str(code)
        assert got == expected, (query, body)
        if code == 200:
            ids.setdefault((which, event, txid), body["conversion_id"])
    await flush(s)

    rows = await pg.fetch("SELECT c.id, c.status, c.amount FROM conversions c "
                          "JOIN campaigns k ON k.id = c.campaign_id WHERE k.slug = $1", slug)
    stored = {uuid_to_id(r["id"]): (r["status"], r["amount"]) for r in rows}
    assert stored == {ids[key]: value for key, value in model.items()}
    totals = (await report(s, f"campaign={slug}"))["totals"]
    approved = [a for st_, a in model.values() if st_ == "approved"]
    pending = [a for st_, a in model.values() if st_ == "pending"]
    assert totals["conversions"] == len(approved)
    assert Decimal(totals["revenue"]) == sum(approved, Decimal(0))
    assert totals["pending_conversions"] == len(pending)
    assert Decimal(totals["pending_revenue"]) == sum(pending, Decimal(0))
    # The rollups reconcile with a raw recount of the stored conversion rows.
    recount = await pg.fetchrow(
        "SELECT count(*) FILTER (WHERE c.status = 'approved') AS conversions,"
        " coalesce(sum(revenue) FILTER (WHERE c.status = 'approved'), 0) AS revenue,"
        " count(*) FILTER (WHERE c.status = 'pending') AS pending,"
        " coalesce(sum(revenue) FILTER (WHERE c.status = 'pending'), 0) AS pending_revenue"
        " FROM conversions c JOIN campaigns k ON k.id = c.campaign_id WHERE k.slug = $1", slug)
    assert (totals["conversions"], Decimal(totals["revenue"]), totals["pending_conversions"],
            Decimal(totals["pending_revenue"])) == (recount["conversions"], recount["revenue"],
                                                    recount["pending"], recount["pending_revenue"])
    # And by click time, the same figures (every click is from today).
    by_click = (await report(s, f"campaign={slug}&date_basis=click"))["totals"]
    assert (by_click["conversions"], by_click["revenue"]) == (totals["conversions"], totals["revenue"])
