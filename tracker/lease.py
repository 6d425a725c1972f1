"""One instance at a time: a short lease in Redis.

Some figures belong to the whole deployment, not to one instance: the write backlog is the
length of the Redis stream every instance shares. Exported by each of N instances, they would
count N times in any sum across instances; so only the holder of the gauges lease exports them
(handlers/ops.py) and the others leave them out.

The lease is one plain key, taken with SET NX PX and renewed by its holder long before it
expires, in a script that touches that key only: the same on one Redis, on Redis Cluster (no
CROSSSLOT) and on Redis 6.2. The holder is the instance (host and data folder), not the
worker: every worker of a `tracker serve` renews the same lease, so whichever worker a scrape
reaches gives the same answer, and a worker restarting does not move the lease.

This process believes it holds the lease for `ttl` from the moment it *sent* its last
successful renewal, and Redis counts from the moment it ran it: the belief ends first. A
holder cut off from Redis stops exporting within `ttl`, and another instance can take over
just after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from pathlib import Path

from redis.exceptions import RedisError

from .redis_client import Client

log = logging.getLogger(__name__)

# A holder that stops (SIGKILL, network cut) leaves the figures unexported for at most TTL;
# renewing three times per TTL rides out two lost renewals.
TTL_SECONDS = 15.0
RENEW_SECONDS = 5.0

# KEYS: the lease; ARGV: holder, ttl in ms. 1 if the caller holds it now, else 0.
TAKE_OR_RENEW = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

# KEYS: the lease; ARGV: holder. Only the holder's own lease is deleted.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def instance_name(data_dir: Path) -> str:
    """The same for every worker of one `tracker serve`, different between instances: two
    services never share a data folder (serve.lock), and hosts have names of their own (a
    pod's, a container's)."""
    folder = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}:{folder}"


def gauges_key(prefix: str) -> str:
    return f"{prefix}lease:gauges"


class Lease:
    def __init__(self, redis: Client, key: str, holder: str, *,
                 ttl: float = TTL_SECONDS, renew_every: float = RENEW_SECONDS) -> None:
        self.key = key
        self.holder = holder
        self._ttl = ttl
        self._renew_every = renew_every
        self._take = redis.register_script(TAKE_OR_RENEW)
        self._release = redis.register_script(RELEASE)
        self._until = 0.0  # monotonic: held until then, unless renewed
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def held(self) -> bool:
        return time.monotonic() < self._until

    async def renew(self) -> bool:
        """Take the lease if nobody holds it, keep it if we do; whether we hold it now."""
        sent = time.monotonic()
        got = await self._take(keys=[self.key], args=[self.holder, int(self._ttl * 1000)])
        self._until = sent + self._ttl if got else 0.0
        return bool(got)

    async def release(self) -> None:
        """Leaving: another instance takes over at its next renewal, not a TTL later."""
        self._until = 0.0
        await self._release(keys=[self.key], args=[self.holder])

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="lease")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            # The flag ends the loop even when a library swallows the cancellation as its
            # call completes.
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Redis away: the lease expires by itself.
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.release(), 1.0)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.renew()
            except Exception as exc:  # noqa: BLE001 - the lease must outlive any one failure
                # Not counted in tracker_backend_errors_total: the writer's own calls already
                # count Redis being away, and `held` lapses by itself.
                log.debug("lease %s not renewed: %s", self.key, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._renew_every)
