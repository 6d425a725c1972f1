"""Postback tokens and HMAC signatures (tracker/conversion/security.py), no servers."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from tracker.conversion.security import (Unauthorized, canonical, check_token, replay_key,
                                         replay_ttl, sign, verify_signature)

NOW = 1_700_000_000
TOLERANCE = 300
OLD, NEW = "old-secret", "new-secret"
PARAMS = [("cid", "01JD7ZKQ8N3V5T2R6W9XAB4CDE"), ("payout", "12.50"), ("event", "sale"),
          ("txid", "A-17")]


def signed(params: list[tuple[str, str]], secret: str = NEW,
           ts: int = NOW) -> list[tuple[str, str]]:
    return params + [("ts", str(ts)), ("sig", sign(params, secret, ts))]


def refused(params: list[tuple[str, str]], secrets: list[str] | None = None,
            now: float = NOW) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        verify_signature(params, secrets or [OLD, NEW], now, TOLERANCE)
    assert info.value.status == 401 and info.value.code == "unauthorized"
    return info.value


# -- token ------------------------------------------------------------------------------------

def test_no_token_on_the_campaign_needs_none() -> None:
    check_token(None, None)
    check_token(None, "anything")
    check_token("", None)


def test_the_right_token_passes() -> None:
    check_token("s3cret-ü", "s3cret-ü")


def test_a_wrong_token_is_refused() -> None:
    for given in ["s3cret", "s3cret-x", "S3CRET-Ü", "", "ü"]:
        with pytest.raises(Unauthorized) as info:
            check_token("s3cret-ü", given)
        assert info.value.message == "the postback token is wrong"
        assert info.value.field == "token"


def test_a_missing_token_is_refused() -> None:
    with pytest.raises(Unauthorized) as info:
        check_token("s3cret", None)
    assert info.value.message == "the postback token is missing" and info.value.field == "token"


# -- signature --------------------------------------------------------------------------------

def test_the_canonical_string_is_the_documented_one() -> None:
    # Sorted once encoded: "%C3%A9" (é) comes before "a", as its bytes do.
    assert canonical([("b", "2"), ("a", "z"), ("a", "y x"), ("sig", "ff"), ("é", "ü/+")]) == \
        "%C3%A9=%C3%BC%2F%2B&a=y%20x&a=z&b=2"


def test_sign_is_hmac_sha256_of_the_canonical_string() -> None:
    expected = hmac.new(NEW.encode(), b"a=1&b=x%20y&ts=1700000000", hashlib.sha256).hexdigest()
    assert sign([("b", "x y"), ("a", "1")], NEW, NOW) == expected
    # A ts or sig already among the parameters is replaced, not signed twice.
    assert sign([("b", "x y"), ("ts", "5"), ("sig", "00"), ("a", "1")], NEW, NOW) == expected


def test_valid_with_either_secret() -> None:
    for secret in (OLD, NEW):
        params = signed(PARAMS, secret)
        assert verify_signature(params, [OLD, NEW], NOW, TOLERANCE) == params[-1][1]
        assert verify_signature(params, [secret], NOW, TOLERANCE) == params[-1][1]


def test_reordered_parameters_are_still_valid() -> None:
    params = signed(PARAMS)
    assert verify_signature(list(reversed(params)), [NEW], NOW, TOLERANCE) == params[-1][1]
    shuffled = [params[3], params[5], params[0], params[4], params[2], params[1]]
    assert verify_signature(shuffled, [NEW], NOW, TOLERANCE) == params[-1][1]


def test_a_tampered_parameter_is_refused() -> None:
    params = signed(PARAMS)
    for i, (name, value) in enumerate(params[:-1]):
        tampered = params.copy()
        tampered[i] = (name, value + "0")
        message = refused(tampered).message
        assert "expired" in message or message == "the signature does not match the parameters"
    assert refused(params + [("status", "reversed")]).message == \
        "the signature does not match the parameters"
    assert refused([p for p in params if p[0] != "payout"]).field == "sig"
    # A value moved to another name is another postback.
    moved = [("cid", "01JD7ZKQ8N3V5T2R6W9XAB4CDE"), ("payout", "sale"), ("event", "12.50"),
             ("txid", "A-17")]
    assert refused(moved + params[-2:]).field == "sig"


def test_a_wrong_secret_is_refused() -> None:
    error = refused(signed(PARAMS, "another-secret"))
    assert error.message == "the signature does not match the parameters" and error.field == "sig"
    error = refused(signed(PARAMS, OLD), secrets=[NEW])
    assert error.field == "sig"


def test_expired_both_ways() -> None:
    for ts in (NOW - TOLERANCE - 1, NOW + TOLERANCE + 1, 0, NOW + 10**9):
        error = refused(signed(PARAMS, ts=ts))
        assert error.field == "ts" and "expired" in error.message
    assert "old" in refused(signed(PARAMS, ts=NOW - 400)).message
    assert "in the future" in refused(signed(PARAMS, ts=NOW + 400)).message
    # The edges of the window are in it.
    for ts in (NOW - TOLERANCE, NOW + TOLERANCE):
        verify_signature(signed(PARAMS, ts=ts), [NEW], NOW, TOLERANCE)
    verify_signature(signed(PARAMS, ts=NOW), [NEW], NOW + 0.5, TOLERANCE)


def test_missing_ts_or_sig() -> None:
    params = signed(PARAMS)
    error = refused([p for p in params if p[0] != "sig"])
    assert error.field == "sig" and "sig is missing" in error.message
    assert refused([p for p in params if p[0] != "ts"]).field == "ts"
    assert refused(PARAMS + [("ts", str(NOW)), ("sig", "")]).field == "sig"
    assert refused(PARAMS + [("ts", ""), ("sig", params[-1][1])]).field == "ts"


def test_a_bad_ts_is_refused() -> None:
    sig = sign(PARAMS, NEW, NOW)
    for ts in ("-1", "1.7e9", "1700000000.0", " 1700000000", "abc", "1" * 40, "１７"):
        error = refused(PARAMS + [("ts", ts), ("sig", sig)])
        assert error.field == "ts", ts


def test_a_sig_that_is_not_lower_case_hex_is_refused() -> None:
    params = signed(PARAMS)
    good = params[-1][1]
    for bad in (good.upper(), good[:-1] + "g", good[:-2], good + "00", "z" * 64, good[:63] + "é"):
        error = refused(params[:-1] + [("sig", bad)])
        assert error.field == "sig", bad


def test_repeated_sig_or_ts_is_refused() -> None:
    params = signed(PARAMS)
    assert refused(params + [params[-1]]).field == "sig"
    assert refused(params + [("ts", str(NOW))]).field == "ts"


def test_values_with_spaces_and_unicode() -> None:
    params = [("cid", "01JD7ZKQ8N3V5T2R6W9XAB4CDE"), ("customer_id", "Ayşe Yılmaz & co"),
              ("sub", "a+b=c/d?e"), ("emoji", "🎉"), ("empty", "")]
    signed_params = signed(params)
    assert verify_signature(signed_params, [NEW], NOW, TOLERANCE) == signed_params[-1][1]
    # The same text, decoded differently by a careless sender, is another text.
    changed = signed_params.copy()
    changed[1] = ("customer_id", "Ayse Yilmaz & co")
    assert refused(changed).field == "sig"


def test_no_secrets_is_a_caller_mistake() -> None:
    with pytest.raises(ValueError):
        verify_signature(signed(PARAMS), [], NOW, TOLERANCE)


def test_replay_key_and_ttl() -> None:
    sig = sign(PARAMS, NEW, NOW)
    assert replay_key("tracker:", sig) == f"tracker:sig:{sig[:32]}"
    assert replay_key("a:", sig) != replay_key("b:", sig)
    assert replay_ttl(TOLERANCE) == 600
