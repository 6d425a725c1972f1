"""Drop-in postback formats: what networks set up for Voluum, Keitaro and Binom send, built
from those trackers' public postback documentation, answered as if we were them."""

from __future__ import annotations

from typing import Any

import asyncpg

from ..conftest import Running, flush
from .test_postback import new_click, postback


async def stored(pg: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await pg.fetch("SELECT event, txid, status, raw_status, amount::text, currency "
                          "FROM conversions ORDER BY created_at, txid")
    return [dict(r) for r in rows]


async def test_voluum_cid_payout_txid_et(quiet_service: Running, pg: asyncpg.Connection) -> None:
    # Voluum: /postback?cid=REPLACE&payout=OPTIONAL&txid=OPTIONAL&et=OPTIONAL
    s = quiet_service
    await s.create_campaign(slug="voluum")
    click = await new_click(s, "voluum")
    status, body = await postback(s, f"cid={click}&payout=12.5&txid=ORDER-1&et=purchase")
    assert status == 200 and body["status"] == "accepted", body
    await flush(s)
    assert await stored(pg) == [{"event": "purchase", "txid": "ORDER-1", "status": "approved",
                                 "raw_status": "", "amount": "12.500000", "currency": "USD"}]


async def test_keitaro_statuses_maps_and_return(quiet_service: Running, pg: asyncpg.Connection) -> None:
    # Keitaro: /postback?subid={subid}&status={status}&payout={payout}&tid={tid}&currency=usd
    s = quiet_service
    await s.create_campaign(slug="keitaro")
    click = await new_click(s, "keitaro")
    status, body = await postback(s, f"subid={click}&status=lead&payout=3&tid=A&currency=usd")
    assert (status, body["status"]) == (200, "accepted")
    # `sale` approves the lead; `return=OK` answers that text, not JSON.
    status, text = await postback(s, f"subid={click}&status=sale&payout=3&tid=A&return=OK")
    assert (status, text) == (200, "OK")
    # `rejected` on an approved conversion reverses it...
    status, body = await postback(s, f"subid={click}&status=rejected&tid=A")
    assert (status, body["status"]) == (200, "updated")
    # ...and on a new one declines it.
    status, body = await postback(s, f"subid={click}&status=rejected&tid=B&revenue=1")
    assert (status, body["status"]) == (200, "accepted")
    # `rebill` is a further approved conversion under its own tid (and needs one).
    status, body = await postback(s, f"subid={click}&status=rebill&tid=C&payout=3")
    assert (status, body["status"]) == (200, "accepted")
    status, body = await postback(s, f"subid={click}&status=rebill&payout=3")
    assert status == 400 and body["error"]["field"] == "txid"
    # The network's own words, mapped per request; the original word is kept.
    status, body = await postback(
        s, f"subid={click}&status=Confirmed&tid=D&payout=2&sale_status=confirmed,paid")
    assert (status, body["status"]) == (200, "accepted")
    d_id = body["conversion_id"]
    status, body = await postback(s, f"subid={click}&status=hold&tid=E&payout=2&lead_status=hold")
    assert (status, body["status"]) == (200, "accepted")
    status, body = await postback(
        s, f"subid={click}&status=chargeback&tid=D&rejected_status=chargeback,cancelled")
    assert (status, body["status"]) == (200, "updated")
    await flush(s)
    rows = {r["txid"]: r for r in await stored(pg)}
    assert {t: (r["status"], r["raw_status"]) for t, r in rows.items()} == {
        "A": ("reversed", "rejected"), "B": ("declined", "rejected"), "C": ("approved", "rebill"),
        "D": ("reversed", "chargeback"), "E": ("pending", "hold")}
    assert rows["A"]["currency"] == "USD"
    # Rejected again: it already is (a duplicate, not a refused transition).
    status, body = await postback(s, f"subid={click}&status=rejected&tid=D")
    assert (status, body["status"]) == (200, "duplicate")
    status, body = await s.api("GET", f"/api/conversions/{d_id}")
    assert [h["raw_status"] for h in body["history"]] == ["Confirmed", "chargeback"]


async def test_binom_click_php(quiet_service: Running, pg: asyncpg.Connection) -> None:
    # Binom: /click.php?cnv_id={clickid}&payout={payout}&cnv_status={status}&cnv_currency=…
    s = quiet_service
    await s.create_campaign(slug="binom", currency="EUR")
    click = await new_click(s, "binom")
    async with s.http.get(s.url(f"/click.php?cnv_id={click}&payout=4.2&cnv_status=pending"
                                f"&cnv_currency=EUR")) as r:
        assert r.status == 200 and (await r.json())["status"] == "accepted"
    async with s.http.get(s.url(f"/click.php?cnv_id={click}&payout=4.2&cnv_status=approved"
                                f"&cnv_currency=eur")) as r:
        assert r.status == 200 and (await r.json())["status"] == "updated"
    async with s.http.get(s.url("/click.php?key=abc")) as r:
        assert r.status == 404
    await flush(s)
    assert await stored(pg) == [{"event": "conversion", "txid": "", "status": "approved",
                                 "raw_status": "approved", "amount": "4.200000",
                                 "currency": "EUR"}]


async def test_every_alias_of_the_contract(quiet_service: Running, pg: asyncpg.Connection) -> None:
    s = quiet_service
    await s.create_campaign(slug="alias")
    names = {"click_id": ["click_id", "cid", "clickid", "subid"],
             "event": ["event", "goal", "type"],
             "amount": ["amount", "payout", "sum", "revenue"],
             "txid": ["txid", "transaction_id", "order_id", "tid"]}
    for i in range(4):
        click = await new_click(s, "alias")
        query = (f"{names['click_id'][i]}={click}&{names['event'][i % 3]}=goal{i}"
                 f"&{names['amount'][i]}={i + 1}.5&{names['txid'][i]}=T{i}&status=pending"
                 f"&currency=USD&customer_id=cust{i}")
        status, body = await postback(s, query)
        assert (status, body["status"]) == (200, "accepted"), (query, body)
    await flush(s)
    rows = await pg.fetch("SELECT event, txid, amount::text, status, customer_id FROM conversions "
                          "ORDER BY txid")
    assert [tuple(r) for r in rows] == [
        (f"goal{i}", f"T{i}", f"{i + 1}.500000", "pending", f"cust{i}") for i in range(4)]


async def test_post_form_and_json_bodies(quiet_service: Running) -> None:
    s = quiet_service
    await s.create_campaign(slug="bodies")
    a, b = await new_click(s, "bodies"), await new_click(s, "bodies")
    status, body = await postback(s, method="POST", data={"cid": a, "payout": "1.25"})
    assert (status, body["status"]) == (200, "accepted"), body
    status, body = await postback(s, method="POST", json={"click_id": b, "amount": 12.345678,
                                                          "event": "sale"})
    assert (status, body["status"]) == (200, "accepted"), body
    status, view = await s.api("GET", f"/api/conversions/{body['conversion_id']}")
    assert view["amount"] == "12.345678"
