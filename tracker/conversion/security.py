"""Who may report a conversion: the postback token, HMAC signatures, and the replay guard.

A campaign may hold a postback token (a shared secret the network sends as `token`), and up
to two HMAC-SHA256 secrets (two, so that a secret can be rotated without refusing postbacks
signed with the old one meanwhile). A signed postback carries `ts` (Unix seconds) and `sig`,
the lower-case hex HMAC-SHA256 of its canonical string under one of the secrets:

    every parameter except `sig` (`ts` included, and `token` when sent), each name and value
    percent-encoded as `urllib.parse.quote(x, safe="-_.~")` (UTF-8, RFC 3986 unreserved
    characters kept), the encoded (name, value) pairs sorted by name then value, joined as
    `name=value` with `&`.

Sorting the *encoded* pairs (as OAuth 1.0 and AWS SigV4 do) makes the order plain bytes,
whatever the language the network signs in. The order the parameters arrive in does not
matter; repeated names are all signed.

Everything here but the replay guard is pure: no I/O, the clock passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from urllib.parse import quote

from ..errors import ApiError
from ..redis_client import Client

SIG = "sig"
TS = "ts"
TOKEN = "token"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
# Unix seconds as digits only: no sign, no fraction, no exponent; 12 digits reach year 33658.
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_SAFE = "-_.~"
# Half a SHA-256 in the replay key: 128 bits make a collision between two genuine postbacks
# impossible in practice, and the key costs half the Redis memory.
_REPLAY_KEY_HEX = 32


class Unauthorized(ApiError):
    """A postback we refuse to record: 401, and a message that tells the network why."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(401, "unauthorized", message, field)


def check_token(expected: str | None, given: str | None) -> None:
    """Nothing to check when the campaign has no token; else `given` must equal it."""
    if not expected:
        return
    if given is None:
        raise Unauthorized("the postback token is missing", TOKEN)
    # Bytes, so that a non-ASCII guess is compared in constant time too (hmac refuses str).
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("the postback token is wrong", TOKEN)


def canonical(params: Iterable[tuple[str, str]]) -> str:
    """The string a signature covers: see the module's docstring."""
    encoded = sorted((quote(name, safe=_SAFE), quote(value, safe=_SAFE))
                     for name, value in params if name != SIG)
    return "&".join(f"{name}={value}" for name, value in encoded)


def _digest(text: str, secret: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign(params: Iterable[tuple[str, str]], secret: str, ts: int) -> str:
    """The `sig` of a postback with these parameters sent at `ts`; any `ts` or `sig` among
    `params` is replaced. Append `ts=<ts>&sig=<result>` to the query to send it."""
    pairs = [(name, value) for name, value in params if name not in (SIG, TS)]
    pairs.append((TS, str(ts)))
    return _digest(canonical(pairs), secret)


def _only(params: list[tuple[str, str]], name: str) -> str | None:
    values = [value for key, value in params if key == name]
    if len(values) > 1:
        raise Unauthorized(f"{name} is given more than once", name)
    return values[0] if values and values[0] != "" else None


def verify_signature(params: list[tuple[str, str]], secrets: list[str], now: float,
                     tolerance: int) -> str:
    """The signature of a postback signed with any of `secrets` within `tolerance` seconds of
    `now` (either way: a network's clock may be ahead of ours); Unauthorized otherwise.
    What is returned is what the replay guard remembers."""
    if not secrets:
        raise ValueError("verify_signature needs the campaign's secrets; none were given")
    sig = _only(params, SIG)
    if sig is None:
        raise Unauthorized("the postback must be signed: sig is missing", SIG)
    ts = _only(params, TS)
    if ts is None:
        raise Unauthorized("a signed postback needs ts, the Unix time it was signed at", TS)
    if not _UNIX_SECONDS.fullmatch(ts):
        raise Unauthorized("ts must be the Unix time in whole seconds", TS)
    skew = now - int(ts)
    if abs(skew) > tolerance:
        when = "old" if skew > 0 else "in the future"
        raise Unauthorized(
            f"the signature expired: ts is {abs(int(skew))} s {when}, more than the "
            f"{tolerance} s allowed (check the sender's clock)", TS)
    if not _HEX_SHA256.fullmatch(sig):
        raise Unauthorized("sig must be 64 lower-case hex digits (HMAC-SHA256)", SIG)
    text = canonical(params)
    matched = False
    for secret in secrets:
        # Every secret is tried, so the time taken does not say which one matched.
        matched |= hmac.compare_digest(_digest(text, secret).encode(), sig.encode())
    if not matched:
        raise Unauthorized("the signature does not match the parameters", SIG)
    return sig


def replay_ttl(tolerance: int) -> int:
    """How long a signature is remembered: it is accepted from ts - tolerance to
    ts + tolerance, so a replay can come up to 2 × tolerance after its first sending."""
    return 2 * tolerance


def replay_key(prefix: str, signature: str) -> str:
    return f"{prefix}sig:{signature[:_REPLAY_KEY_HEX]}"


async def remember_signature(redis: Client, key: str, ttl: int) -> bool:
    """True the first time a signature is seen; False for a replay (the caller answers 401).

    One SET NX EX: the check and the mark are one step, so two concurrent sendings of one
    postback cannot both be first. Redis unreachable: the RedisError goes to the caller.
    Without the guard a replay cannot be told from a first sending, and a replayed older
    status (pending after approved) would change a conversion: answer 503, so that the
    network tries again later, rather than record it.
    """
    return bool(await redis.set(key, b"1", nx=True, ex=ttl))


async def forget_signature(redis: Client, key: str) -> None:
    """Undo remember_signature when the postback could not be recorded after all (its
    append failed): the network sends the same signed URL again, and that retry must pass."""
    await redis.delete(key)
