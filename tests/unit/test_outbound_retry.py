"""When an outbound postback is tried again, and what an answer means."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from tracker.outbound.retry import (BACKOFF_CAP_SECONDS, Outcome, backoff_seconds, next_try,
                                    outcome_of_status)


def test_backoff_doubles_per_try_within_its_jitter() -> None:
    rng = random.Random(1)
    for tries in range(1, 12):
        expected = 0.1 * 2 ** (tries - 1)
        delays = [backoff_seconds(tries, 100, rng) for _ in range(200)]
        assert min(delays) >= expected * 0.8 - 1e-9
        assert max(delays) <= expected * 1.2 + 1e-9
        # Jittered: deliveries that failed together do not come back together.
        assert max(delays) - min(delays) > expected * 0.2
        # Growing: even the shortest wait after this try beats the longest after the one before.
        if tries > 1:
            assert min(delays) > max(backoff_seconds(tries - 1, 100, rng) for _ in range(200))


def test_backoff_never_exceeds_an_hour_however_many_tries_failed() -> None:
    rng = random.Random(2)
    for tries in (20, 40, 41, 1000, 10**9):
        delays = [backoff_seconds(tries, 30_000, rng) for _ in range(100)]
        assert max(delays) <= BACKOFF_CAP_SECONDS
        assert min(delays) >= BACKOFF_CAP_SECONDS * 0.8 - 1e-9


def test_the_first_retry_waits_the_configured_backoff() -> None:
    delays = [backoff_seconds(1, 30_000) for _ in range(200)]
    assert 24.0 <= min(delays) and max(delays) <= 36.0


@pytest.mark.parametrize("status, outcome", [
    (200, Outcome.DELIVERED), (204, Outcome.DELIVERED), (302, Outcome.DELIVERED),
    (399, Outcome.DELIVERED),
    (408, Outcome.RETRY), (425, Outcome.RETRY), (429, Outcome.RETRY), (500, Outcome.RETRY),
    (502, Outcome.RETRY), (503, Outcome.RETRY), (599, Outcome.RETRY),
    (400, Outcome.FAILED), (401, Outcome.FAILED), (403, Outcome.FAILED), (404, Outcome.FAILED),
    (410, Outcome.FAILED), (422, Outcome.FAILED), (101, Outcome.FAILED),
])
def test_what_an_answer_means(status: int, outcome: Outcome) -> None:
    assert outcome_of_status(status) is outcome


def test_retries_end_at_the_deadline() -> None:
    created = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    day = timedelta(hours=24)
    early = next_try(1, created + timedelta(minutes=1), created, 30_000, day)
    assert early is not None and early > created + timedelta(minutes=1)
    # Close to the deadline, the last try is made at the deadline itself...
    late = next_try(12, created + day - timedelta(seconds=5), created, 30_000, day)
    assert late == created + day
    # ...and once it has passed, no more.
    assert next_try(13, created + day, created, 30_000, day) is None
    assert next_try(2, created + day + timedelta(hours=1), created, 100, day) is None
