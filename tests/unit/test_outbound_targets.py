"""The SSRF guard: which addresses and URLs an outbound postback may go to."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from tracker.outbound.targets import GuardedResolver, RefusedTarget, check_url, refusal

REFUSED = {
    "0.0.0.0": "unspecified",
    "0.1.2.3": "private",             # "this network"
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "10.0.0.5": "private",
    "172.16.3.4": "private",
    "192.168.1.1": "private",
    "100.64.0.1": "shared (carrier-grade NAT)",
    "100.127.255.254": "shared (carrier-grade NAT)",
    "169.254.169.254": "link-local",  # cloud instance metadata
    "224.0.0.251": "multicast",
    "240.0.0.1": "private",           # reserved, and listed as private by ipaddress
    "255.255.255.255": "private",
    "192.0.2.7": "private",           # documentation
    "198.18.0.1": "private",          # benchmarking
    "::": "unspecified",
    "::1": "loopback",
    "fe80::1": "link-local",
    "fe80::1%2": "link-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "fec0::1": "private",             # site-local, deprecated but still routed inward
    "ff02::1": "multicast",
    "::ffff:10.0.0.5": "private (IPv4 10.0.0.5 inside)",
    "::ffff:127.0.0.1": "loopback (IPv4 127.0.0.1 inside)",
    "::ffff:169.254.169.254": "link-local (IPv4 169.254.169.254 inside)",
    "64:ff9b::a00:5": "private (IPv4 10.0.0.5 inside)",       # NAT64
    "2002:a00:5::1": "private (IPv4 10.0.0.5 inside)",        # 6to4
    "2002:7f00:1::1": "loopback (IPv4 127.0.0.1 inside)",
    "::127.0.0.1": "reserved",        # IPv4-compatible, deprecated
    "2001:db8::1": "private",         # documentation
}

ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.1",
           "2606:4700:4700::1111", "2a00:1450:4001::200e", "::ffff:8.8.8.8", "64:ff9b::808:808",
           "2002:808:808::1"]


@pytest.mark.parametrize("address, why", REFUSED.items())
def test_inward_addresses_are_refused(address: str, why: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("url, complaint", [
    ("http://10.0.0.5/pb?x=1",
     "target address 10.0.0.5 is private; set TRACKER_POSTBACK_ALLOW_PRIVATE=true to allow"),
    ("http://127.0.0.1:8080/", "target address 127.0.0.1 is loopback"),
    ("https://[::1]:8443/", "target address ::1 is loopback"),
    ("http://[::ffff:10.0.0.5]/", "is private (IPv4 10.0.0.5 inside)"),
    ("http://169.254.169.254/latest/meta-data/", "is link-local"),
    ("http://[fe80::1%25eth0]/", "is link-local"),
    # Legacy forms the C library reads as 127.0.0.1: not interpreted, refused.
    ("http://127.1/", "target address 127.1 is not a canonical IP address"),
    ("http://2130706433/", "not a canonical IP address"),
    ("http://127.0.0.1./", "not a canonical IP address"),
    ("ftp://example.com/pb", "only http and https targets are called, not ftp"),
    ("file:///etc/passwd", "only http and https targets are called, not file"),
    ("gopher://example.com:70/", "not gopher"),
    ("//example.com/pb", "only http and https"),
    ("http:///pb", "the URL has no host"),
    ("http://exa mple.com:99999/", ""),
])
def test_urls_that_are_never_requested(url: str, complaint: str) -> None:
    problem = check_url(url, allow_private=False)
    assert problem is not None and complaint in problem


@pytest.mark.parametrize("url", ["http://8.8.8.8/pb", "https://network.example/pb?c=a%2Bb",
                                 "http://localhost:9/", "https://[2606:4700::1111]/"])
def test_host_names_and_public_literals_pass_the_first_check(url: str) -> None:
    # Names are checked when they are resolved, by the connector's resolver.
    assert check_url(url, allow_private=False) is None


def test_allowing_private_targets_still_requires_http() -> None:
    assert check_url("http://10.0.0.5/", allow_private=True) is None
    assert check_url("http://127.0.0.1:9/", allow_private=True) is None
    assert check_url("ftp://10.0.0.5/", allow_private=True) is not None


async def test_a_name_that_resolves_inward_is_refused_at_connection_time() -> None:
    resolver = GuardedResolver(allow_private=False)
    with pytest.raises(RefusedTarget) as refused:
        await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    message = str(refused.value)
    assert message.startswith("target localhost resolves to ")
    assert "which is loopback; set TRACKER_POSTBACK_ALLOW_PRIVATE=true to allow" in message


async def test_a_name_that_resolves_inward_is_allowed_when_private_targets_are() -> None:
    resolver = GuardedResolver(allow_private=True)
    hosts = await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    assert {h["host"] for h in hosts} <= {"127.0.0.1", "::1"} and hosts
    assert all(h["port"] == 80 and h["hostname"] == "localhost" for h in hosts)


async def test_an_unknown_name_is_an_ordinary_lookup_error() -> None:
    resolver = GuardedResolver(allow_private=False)
    with pytest.raises(OSError) as failed:
        await resolver.resolve("no-such-host.invalid", 80, socket.AF_UNSPEC)
    assert not isinstance(failed.value, RefusedTarget)
