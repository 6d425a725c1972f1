"""What a try's result means, and when to try again: pure functions, no I/O."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from enum import StrEnum

# However many tries failed, the next one comes within the hour: a receiver back after a
# long outage gets its postbacks the same hour, not a day later.
BACKOFF_CAP_SECONDS = 3600.0
JITTER = 0.2
# Statuses that say "later", not "no": a request timeout, too early, too many requests.
RETRY_STATUSES = frozenset({408, 425, 429})


class Outcome(StrEnum):
    """What one try came to: a closed set (the outcome label of
    tracker_outbound_postbacks_total, and the delivery's next state)."""

    DELIVERED = "delivered"
    RETRY = "retry"      # failed for now; tried again later
    FAILED = "failed"    # failed for good: refused by the receiver, or retried long enough
    REFUSED = "refused"  # never sent: the target is not one we call (targets.py)


def outcome_of_status(status: int) -> Outcome:
    """2xx and 3xx (redirects are not followed: the receiver answered) deliver; 408, 425,
    429 and 5xx are worth another try; any other answer will not change by asking again."""
    if 200 <= status < 400:
        return Outcome.DELIVERED
    if status in RETRY_STATUSES or 500 <= status < 600:
        return Outcome.RETRY
    return Outcome.FAILED


def backoff_seconds(tries: int, base_ms: int, rng: random.Random | None = None) -> float:
    """The wait after `tries` failed tries: base, doubled per try, ±20% (so that deliveries
    that failed together, when a receiver went down, do not all come back in the same
    second), never over an hour."""
    exponent = min(max(tries - 1, 0), 40)  # 2**40 × 1 ms is far past the cap already
    jitter = (rng.uniform if rng is not None else random.uniform)(1 - JITTER, 1 + JITTER)
    return min(base_ms / 1000 * 2.0 ** exponent * jitter, BACKOFF_CAP_SECONDS)


def next_try(tries: int, now: datetime, created_at: datetime, base_ms: int,
             retry_for: timedelta, rng: random.Random | None = None) -> datetime | None:
    """When to try again after `tries` failed tries, or None once the delivery has been
    retried for `retry_for` since it was created. The last try is made at that deadline."""
    deadline = created_at + retry_for
    if now >= deadline:
        return None
    return min(now + timedelta(seconds=backoff_seconds(tries, base_ms, rng)), deadline)
