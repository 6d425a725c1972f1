"""Which Redis the service talks to: one server (`redis://`, `rediss://`, `unix://`) or a
Redis Cluster (`redis+cluster://host:port[,host:port…]`, `rediss+cluster://` for TLS).

Everything else sees one client type, `Client`: the commands the service sends are the same
on both (every multi-key command and script keeps its keys in one slot, see ingest/buffer.Keys).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ResponseError

from .settings import SettingsError

Client = aioredis.Redis | RedisCluster
Command = tuple[Any, ...]

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
# Shards of the event stream on a Cluster when TRACKER_REDIS_SHARDS is unset: a few per
# master of a 3-to-5-master cluster, so that streams spread over every master and a writer
# always finds work; one server needs only one stream.
CLUSTER_SHARDS = 16


def is_cluster(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def shards_for(url: str, configured: int) -> int:
    """How many event streams: the setting, else one for a server, CLUSTER_SHARDS for a
    Cluster."""
    if configured:
        return configured
    return CLUSTER_SHARDS if is_cluster(url) else 1


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, bool]:
    """(startup nodes, username, password, tls) of a redis+cluster URL."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise SettingsError(f"not a Redis Cluster URL: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise SettingsError(f"REDIS_URL: each Cluster node must be host:port, got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    if parts.path not in ("", "/", "/0"):
        raise SettingsError("REDIS_URL: a Redis Cluster has only database 0")
    return (nodes, unquote(username) or None, unquote(password) or None,
            CLUSTER_SCHEMES[parts.scheme])


def connect(url: str, *, max_connections: int, timeout: float) -> Client:
    """A client for `url`. A server's pool blocks when full (at a burst, requests wait a
    moment for a connection instead of failing); a Redis that hangs instead of failing must
    not hang redirects, so reads time out too."""
    if not is_cluster(url):
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout,
            socket_connect_timeout=timeout, socket_timeout=timeout, health_check_interval=30)
        return aioredis.Redis(connection_pool=pool)
    nodes, username, password, tls = cluster_nodes(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        username=username, password=password, ssl=tls, max_connections=max_connections,
        socket_connect_timeout=timeout, socket_timeout=timeout)


async def ready(client: Client) -> None:
    """A Cluster client knows the slots' owners (commands learn them on first use, a pubsub
    does not)."""
    if isinstance(client, RedisCluster):
        await client.initialize()


async def send(client: Client, commands: list[Command]) -> list[Any]:
    """Send commands and read their replies in order, as Redis gave them (redis-py's reply
    callbacks are skipped on one server); an error reply stands in its place.

    On one server: on one pooled connection, packed by hiredis in C (redis-py's own pipeline
    packs in Python, and turns each stream entry into Python objects one by one: that cost
    more than the rest of a click, and a third of the batch writer's step). On a Cluster:
    redis-py's cluster pipeline, which sends each node its commands and follows the cluster
    as slots move (its replies pass through redis-py's callbacks)."""
    if isinstance(client, RedisCluster):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(b"".join(map(hiredis.pack_command, commands)))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except BaseException:
        # A half-read connection must not go back to the pool as it is.
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
    return replies
