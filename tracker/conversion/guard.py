"""Whether a postback may change a campaign's conversions: its token and its signature, as
the campaign asks (tracker/conversion/security.py holds the rules)."""

from __future__ import annotations

import time

from ..campaigns import Campaign
from ..redis_client import Client
from .params import ConversionInput
from .security import (SIG, Unauthorized, check_token, forget_signature, remember_signature,
                       replay_key, replay_ttl, verify_signature)


class PostbackGuard:
    def __init__(self, redis: Client, prefix: str, tolerance: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._tolerance = tolerance

    async def __call__(self, campaign: Campaign, ask: ConversionInput) -> None:
        """Raise Unauthorized (401) unless the postback carries what the campaign requires."""
        check_token(campaign.postback_token, ask.token)
        if not campaign.postback_secrets:
            return
        signature = verify_signature(list(ask.pairs), list(campaign.postback_secrets),
                                     time.time(), self._tolerance)
        # Checked last, after every other refusal: a signature is spent only by a postback
        # that could otherwise pass. A RedisError goes up (503): without the guard a replayed
        # older status could not be told from a first sending.
        if not await remember_signature(self._redis, replay_key(self._prefix, signature),
                                        replay_ttl(self._tolerance)):
            raise Unauthorized("this signed postback was already received (a replay)", "sig")

    async def forget(self, ask: ConversionInput) -> None:
        """The postback was refused or failed after its signature was spent (a 409, Redis
        failing): the network sends the same signed URL again, and that must not be 401."""
        signature = next((value for name, value in ask.pairs if name == SIG), None)
        if signature:
            await forget_signature(self._redis, replay_key(self._prefix, signature))
