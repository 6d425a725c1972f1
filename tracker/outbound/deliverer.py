"""The deliverer: calls the traffic sources' postback URLs for stored conversion changes, with
retries, in a background task of every worker.

Why an outbox table and not a job library (procrastinate and the like): a delivery must exist
exactly when the conversion's change does, so it has to be created in the very transaction
that records the change, by the batch writer's own COPY/INSERT connection. A row in
postback_deliveries is that, with no second connection and no commit to coordinate; it needs
no schema, migrations or worker process of a library's to own; and claiming it is one
statement with FOR UPDATE SKIP LOCKED, which works behind PgBouncer in transaction mode (no
LISTEN/NOTIFY, no advisory locks or other session state). Workers find due rows by polling
the partial index of pending ones, every POLL_SECONDS at most.

Each claimed row is leased: its next_try_at is pushed past the try's timeout, so no other
deliverer takes it meanwhile, and one that dies mid-try (SIGKILL) leaves it due again once the
lease is over. Delivery is therefore at least once: a receiver may see a postback twice when
a deliverer died after the receiver answered and before the answer was recorded (receivers
key postbacks on the click and transaction ids for this reason).

Outcomes (retry.py): 2xx/3xx delivered; 408, 425, 429, 5xx, timeouts and connection errors
retried with exponential backoff until postback_retry_hours after the delivery was made, then
failed; any other answer failed at once; a target the SSRF guard refuses (targets.py) failed
at once, never requested. Every try is kept (postback_tries) and counted by outcome.

A slow or dead receiver costs this task only: at most CONCURRENCY tries in flight, each within
postback_timeout_seconds, DNS in threads of its own, and the hot path never waits on any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version

import aiohttp
import asyncpg

from .. import metrics
from ..settings import Settings
from ..storage import deliveries
from ..storage.deliveries import Delivery
from . import targets
from .retry import Outcome, next_try, outcome_of_status

log = logging.getLogger(__name__)

# Idle, a worker looks for due rows this often (sooner for its own retries, at once while
# claims come back full).
POLL_SECONDS = 0.5
CONCURRENCY = 16
# A lease outlasts the try's timeout by this much: recording the answer (retried while
# PostgreSQL blips) must fit in it, or another deliverer tries again.
LEASE_MARGIN_SECONDS = 30.0
# Leaving: how long to wait for the tries cut short to be handed back.
RELEASE_SECONDS = 0.25
# PostgreSQL away: first pause and cap between retries.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
# An error message is kept for a person to read, not as a dump of a receiver's answer.
ERROR_CHARS = 500


def _user_agent() -> str:
    try:
        return f"tracker/{version('tracker')} (postback)"
    except PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "tracker (postback)"


USER_AGENT = _user_agent()
# Every outcome's series exists from the start, at 0: a closed set.
TRIES = {outcome: metrics.POSTBACKS.labels(outcome.value) for outcome in Outcome}


@dataclass(frozen=True)
class TryResult:
    at: datetime
    http_status: int | None
    latency_ms: float
    error: str | None
    refused: bool = False      # the guard refused the target: never requested
    permanent: bool = False    # no answer, and none will ever come (an unusable URL)


class Deliverer:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, *,
                 concurrency: int = CONCURRENCY, poll_seconds: float = POLL_SECONDS,
                 lease_seconds: float | None = None, retry_first: float = RETRY_FIRST,
                 rng: random.Random | None = None) -> None:
        self._pool = pool
        self._timeout = float(settings.postback_timeout_seconds)
        self._backoff_ms = settings.postback_backoff_ms
        self._retry_for = timedelta(hours=settings.postback_retry_hours)
        self._allow_private = settings.postback_allow_private
        self._concurrency = concurrency
        self._poll = poll_seconds
        self._lease = lease_seconds if lease_seconds is not None else (
            self._timeout + LEASE_MARGIN_SECONDS)
        self._retry_first = retry_first
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._tries: set[asyncio.Task[None]] = set()
        # Claimed and not yet recorded: delivery id → its tries when claimed.
        self._held: dict[int, int] = {}
        # When this worker's own retries due within a poll fall due (monotonic): it wakes up
        # for them.
        self._due: list[float] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_started: float | None = None
        self._warned: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="postback-deliverer")

    def nudge(self) -> None:
        """Deliveries were just made: look for due rows now rather than at the next poll."""
        self._wake.set()

    def stop_claiming(self) -> None:
        """Leaving begins: claim nothing more; the tries in flight go on for now."""
        if self._stop_started is None:
            self._stop_started = time.monotonic()
        self._stopping.set()
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Let the tries in flight finish until `grace` seconds after leaving began, cancel
        what is left, and hand those rows back, due now. Bounded: grace + RELEASE_SECONDS."""
        self.stop_claiming()
        task, self._task = self._task, None
        if task is None:
            return
        assert self._stop_started is not None
        await asyncio.wait([task], timeout=max(0.0, self._stop_started + grace - time.monotonic()))
        while not task.done():
            # A cancellation swallowed by a library as its call completes: insist.
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
        if not task.cancelled() and task.exception() is not None:
            log.error("postback deliverer failed: %r", task.exception())
        held, self._held = list(self._held.items()), {}
        if held:
            try:
                await asyncio.wait_for(deliveries.release(self._pool, held), RELEASE_SECONDS)
            except Exception as exc:  # noqa: BLE001 - their leases run out instead
                log.info("%d postbacks cut short are due again when their lease ends (%s)",
                         len(held), type(exc).__name__)

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=targets.GuardedResolver(self._allow_private), limit=self._concurrency)
        async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": USER_AGENT}, cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False) as http:
            try:
                await self._claim_loop(http)
                if self._tries:
                    await asyncio.wait(self._tries)  # until stop() says enough
            finally:
                for task in self._tries:
                    task.cancel()
                await asyncio.gather(*self._tries, return_exceptions=True)

    async def _claim_loop(self, http: aiohttp.ClientSession) -> None:
        retry = self._retry_first
        while not self._stopping.is_set():
            free = self._concurrency - len(self._tries)
            if free <= 0:
                await self._pause(self._poll)  # a try ending wakes us
                continue
            try:
                claimed = await deliveries.claim(self._pool, free, self._lease)
            except Exception as exc:  # noqa: BLE001 - PostgreSQL away: retry, never die
                self._postgres_failed(exc)
                await self._pause(retry)
                retry = min(retry * 2, RETRY_MAX)
                continue
            self._postgres_answers()
            retry = self._retry_first
            leased_until = time.monotonic() + self._lease
            for delivery in claimed:
                self._held[delivery.id] = delivery.tries
                task = asyncio.create_task(self._deliver(http, delivery, leased_until),
                                           name=f"postback-{delivery.id}")
                self._tries.add(task)
                task.add_done_callback(self._try_done)
            if len(claimed) < free:
                await self._pause(self._idle_wait())

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short by nudge(), stop, a try ending when every slot was taken, or a
        retry of ours falling due sooner."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _idle_wait(self) -> float:
        now = time.monotonic()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        soonest = self._due[0] - now if self._due else self._poll
        return max(0.001, min(self._poll, soonest))

    def _try_done(self, task: asyncio.Task[None]) -> None:
        full = len(self._tries) >= self._concurrency
        self._tries.discard(task)
        if full:
            self._wake.set()

    # -- one delivery ----------------------------------------------------------------------

    async def _deliver(self, http: aiohttp.ClientSession, delivery: Delivery,
                       leased_until: float) -> None:
        try:
            n = delivery.tries + 1
            result = await self._try(http, delivery)
            now = datetime.now(UTC)
            outcome, next_at = self._decide(result, n, now, delivery.created_at)
            TRIES[outcome].inc()
            if outcome is Outcome.DELIVERED:
                metrics.POSTBACK_LAG.observe(max(0.0, (now - delivery.created_at).total_seconds()))
            if await self._record(delivery, n, result, outcome, next_at, leased_until) and next_at:
                self._retry_at(next_at, now)
            self._held.pop(delivery.id, None)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one delivery's bug must not stop the others
            log.exception("postback delivery %d failed; it is due again when its lease ends",
                          delivery.id)

    async def _try(self, http: aiohttp.ClientSession, delivery: Delivery) -> TryResult:
        at = datetime.now(UTC)
        problem = targets.check_url(delivery.url, self._allow_private)
        if problem is not None:
            return TryResult(at, None, 0.0, _clip(problem), refused=True)
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        refused = permanent = False
        try:
            async with http.get(delivery.url, allow_redirects=False) as response:
                # The status is the answer; the body is not read (the connection closes).
                status = response.status
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            error = f"no answer within {self._timeout:g} s"
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, targets.RefusedTarget)
            error = str(exc.os_error) if refused else str(exc)
        except ValueError as exc:  # aiohttp.InvalidURL, an IDNA failure: asking again won't help
            error, permanent = f"invalid URL: {exc}", True
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        latency = (time.monotonic() - started) * 1000
        return TryResult(at, status, latency, _clip(error), refused, permanent)

    def _decide(self, result: TryResult, n: int, now: datetime,
                created_at: datetime) -> tuple[Outcome, datetime | None]:
        if result.refused:
            return Outcome.REFUSED, None
        if result.permanent:
            return Outcome.FAILED, None
        if result.http_status is not None:
            outcome = outcome_of_status(result.http_status)
            if outcome is not Outcome.RETRY:
                return outcome, None
        at = next_try(n, now, created_at, self._backoff_ms, self._retry_for, self._rng)
        return (Outcome.FAILED, None) if at is None else (Outcome.RETRY, at)

    async def _record(self, delivery: Delivery, n: int, result: TryResult, outcome: Outcome,
                      next_at: datetime | None, leased_until: float) -> bool:
        """Keep the try; through a PostgreSQL blip, retried while the lease lasts (after it,
        the row is due again and the try is made again)."""
        pause = self._retry_first
        while True:
            try:
                async with self._pool.acquire() as conn:
                    recorded = await deliveries.record_try(
                        conn, delivery.id, n, result.http_status, result.latency_ms,
                        result.error, outcome, next_at, at=result.at)
            except Exception as exc:  # noqa: BLE001
                self._postgres_failed(exc)
                if time.monotonic() + pause >= leased_until:
                    return False
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            self._postgres_answers()
            if not recorded:
                log.info("postback delivery %d: try %d answered after its lease ended; "
                         "not recorded", delivery.id, n)
            return bool(recorded)

    def _retry_at(self, when: datetime, now: datetime) -> None:
        delay = max(0.0, (when - now).total_seconds())
        if delay >= self._poll:
            return  # the polls find it, at most a poll late: only the near ones are kept
        due = time.monotonic() + delay
        if not self._due or due < self._due[0]:
            self._wake.set()  # sooner than the pause under way: recompute it
        heapq.heappush(self._due, due)

    # -- PostgreSQL away -------------------------------------------------------------------

    def _postgres_failed(self, exc: BaseException) -> None:
        metrics.BACKEND_ERRORS.labels("postgres").inc()
        # Once per kind of failure until PostgreSQL answers again: an outage is one line.
        cause = type(exc).__name__
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning("outbound postbacks: PostgreSQL error, will retry: %s: %s", cause, exc)

    def _postgres_answers(self) -> None:
        if self._warned:
            self._warned.clear()
            log.info("outbound postbacks: PostgreSQL answers again")


def _clip(error: str | None) -> str | None:
    if error is None:
        return None
    # PostgreSQL refuses NUL in text; a receiver's reason phrase could hold anything.
    return error.replace("\x00", "")[:ERROR_CHARS]
