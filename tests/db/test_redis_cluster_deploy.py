"""deploy/redis/ as compose.scale.yaml runs it, on real redis-server 7 processes (Debian's
`redis-server`): every node starts from cluster.conf, create-cluster.sh makes them one
cluster (and does nothing the second time, as on a restart of the stack), and a cluster
client reaches every node by the name the nodes announce."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from ..conftest import free_port

REDIS = Path(__file__).resolve().parents[2] / "deploy" / "redis"
NODES = 3


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("TRACKER_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is missing and TRACKER_REQUIRE_TOOLS=1: apt-get install redis-server")
        pytest.skip(f"{name} is missing: apt-get install redis-server")
    return path


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[int]]:
    """Three nodes from deploy/redis/cluster.conf on this host's ports, announcing the name
    'localhost' as compose's nodes announce theirs."""
    server = tool("redis-server")
    tool("redis-cli")
    version = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
    major = int(re.search(r"v=(\d+)", version).group(1))  # type: ignore[union-attr]
    if major < 7:
        pytest.skip(f"cluster.conf needs Redis 7 (cluster-preferred-endpoint-type): {version}")
    ports, processes = [], []
    try:
        for i in range(NODES):
            port, bus = free_port(), free_port()
            folder = tmp_path / str(i)
            folder.mkdir()
            processes.append(subprocess.Popen(
                [server, str(REDIS / "cluster.conf"), "--cluster-announce-hostname", "localhost",
                 "--port", str(port), "--cluster-port", str(bus), "--bind", "127.0.0.1",
                 "--dir", str(folder), "--save", ""],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        for port in ports:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client.close()
        yield ports
    finally:
        for process in processes:
            process.kill()
            process.wait()


def create(ports: list[int]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(REDIS / "create-cluster.sh"),
                           *(f"127.0.0.1:{port}" for port in ports)],
                          capture_output=True, text=True, timeout=60)


def cluster_info(port: int) -> dict[str, str]:
    client = redis.Redis(port=port, decode_responses=True)
    try:
        text = client.execute_command("CLUSTER", "INFO")
    finally:
        client.close()
    info: dict[str, str] = {}
    for line in str(text).splitlines():
        key, _, value = line.partition(":")
        info[key] = value.strip()
    return info


def test_the_nodes_become_one_cluster_once(nodes: list[int]) -> None:
    first = create(nodes)
    assert first.returncode == 0, first.stdout + first.stderr
    deadline = time.monotonic() + 20
    while cluster_info(nodes[0]).get("cluster_state") != "ok" and time.monotonic() < deadline:
        time.sleep(0.1)
    for port in nodes:
        info = cluster_info(port)
        assert info["cluster_state"] == "ok" and info["cluster_slots_assigned"] == "16384"
        assert info["cluster_known_nodes"] == str(NODES)
    client = redis.Redis(port=nodes[0], decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        # Clients are sent to the nodes' names, not to addresses that change with containers.
        slots = client.execute_command("CLUSTER", "SLOTS")
        assert {slot[2][0] for slot in slots} == {"localhost"}, slots
    finally:
        client.close()

    # A cluster client, from one node, finds the others and writes keys to every one.
    cluster = RedisCluster(host="127.0.0.1", port=nodes[0])
    try:
        for i in range(60):
            cluster.set(f"k{i}", i)
        assert sorted(node.port for node in cluster.get_primaries()) == sorted(nodes)
        assert all(cluster.dbsize(target_nodes=node) > 0 for node in cluster.get_primaries())
    finally:
        cluster.close()

    again = create(nodes)
    assert again.returncode == 0 and "already a cluster" in again.stdout, again.stdout + again.stderr
