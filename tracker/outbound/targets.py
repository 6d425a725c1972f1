"""Where an outbound postback may go: the SSRF guard.

A postback URL is written by whoever edits a campaign, and the request is made from inside our
network: unguarded, `postback_url=http://169.254.169.254/...` would read the cloud's instance
metadata, and `http://10.0.0.5:6379/` would talk to our own Redis. So only http(s) targets on
public addresses are called, unless TRACKER_POSTBACK_ALLOW_PRIVATE is on (a network reached
over a VPN, tests).

The address is checked twice:
- before the request, for a URL whose host is an IP literal: aiohttp connects to a literal
  without asking the resolver, so nothing else would see it;
- at connection time, for a host name, by GuardedResolver: the addresses a name resolves to
  are filtered when aiohttp connects, not looked up once beforehand, so a name that resolves
  to a public address when checked and to 127.0.0.1 a moment later (DNS rebinding) connects
  to nothing private either.
Redirects are never followed (the deliverer asks for none), so a public target cannot bounce
the request inward.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_HINT = "set TRACKER_POSTBACK_ALLOW_PRIVATE=true to allow"
SCHEMES = ("http", "https")

# 100.64.0.0/10 (carrier-grade NAT) is neither private nor global to Python's ipaddress.
SHARED = ipaddress.IPv4Network("100.64.0.0/10")
# NAT64's well-known prefix: the IPv4 address in its last 32 bits is where the packet goes.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

# getaddrinfo in threads of our own, never the loop's executor: under uvloop that is libuv's
# pool of 4 threads, which Redis and PostgreSQL reconnects resolve their hosts on too, and a
# receiver's slow DNS (seconds per lookup) must not hold them. Daemon threads, so that a
# lookup stuck in the C library never holds the process at exit; at most this many at once
# (a lookup over the limit fails like a DNS error, and the try is retried).
MAX_LOOKUP_THREADS = 8
NUMERIC_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class RefusedTarget(OSError):
    """A target the guard refuses: a permanent failure, never retried. An OSError, so that
    aiohttp passes it through from the resolver (as ClientConnectorError.os_error)."""


def refusal(address: Address) -> str | None:
    """Why `address` is not a public one (a few words), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            why = refusal(embedded)
            return f"{why} (IPv4 {embedded} inside)" if why else None
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in SHARED:
        return "shared (carrier-grade NAT)"
    if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:  # documentation, benchmarking, and whatever else is not routed
        return "not globally routable"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to (mapped, NAT64, 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def refused_message(address: str, why: str, host: str | None = None) -> str:
    via = f"target {host} resolves to {address}, which" if host else f"target address {address}"
    return f"{via} is {why}; {ALLOW_HINT}"


def check_url(url: str, allow_private: bool) -> str | None:
    """What is wrong with calling `url`, for a person, or None. Checks the scheme and an IP
    literal host; a host name is checked when it is resolved (GuardedResolver)."""
    try:
        parsed = URL(url)
        host = parsed.raw_host
    except (ValueError, TypeError) as exc:
        return f"not a valid URL: {exc}"
    if parsed.scheme not in SCHEMES:
        return f"only http and https targets are called, not {parsed.scheme or 'a URL without a scheme'}"
    if not host:
        return "the URL has no host"
    if allow_private:
        return None
    literal = _literal(host)
    if literal is None:
        return None
    if isinstance(literal, str):
        return literal
    why = refusal(literal)
    return refused_message(host, why) if why else None


def _literal(host: str) -> Address | str | None:
    """The address of an IP-literal host, a complaint about a literal we will not interpret,
    or None for a host name."""
    try:
        return ipaddress.ip_address(host.replace("%25", "%"))  # zone ids arrive URL-encoded
    except ValueError:
        pass
    # What aiohttp takes for a literal without asking the resolver. The C library would read
    # legacy forms (`127.1`, `2130706433`) as an address: refuse them rather than interpret.
    if ":" in host or host.replace(".", "").isdigit():
        return f"target address {host} is not a canonical IP address"
    return None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for outbound postbacks: getaddrinfo in a thread of its own, and,
    unless private targets are allowed, only public addresses handed to the connector. A
    name with no public address at all is refused (RefusedTarget)."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._threads = 0
        self._lock = threading.Lock()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        infos = await self._getaddrinfo(host, port, family)
        results: list[ResolveResult] = []
        refused: list[tuple[str, str]] = []
        for info_family, _, proto, _, sockaddr in infos:
            address = str(sockaddr[0])
            if info_family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
                address = f"{address}%{sockaddr[3]}"  # link-local: keep the interface
            elif info_family not in (socket.AF_INET, socket.AF_INET6):
                continue
            why = None if self._allow_private else refusal(ipaddress.ip_address(address))
            if why is not None:
                refused.append((address, why))
                continue
            results.append(ResolveResult(hostname=host, host=address, port=int(sockaddr[1]),
                                         family=info_family, proto=proto, flags=NUMERIC_FLAGS))
        if not results:
            if refused:
                raise RefusedTarget(refused_message(*refused[0], host=host))
            raise OSError(f"{host} has no address")
        return results

    async def close(self) -> None:
        pass

    async def _getaddrinfo(self, host: str, port: int,
                           family: socket.AddressFamily) -> list[Any]:
        with self._lock:
            if self._threads >= MAX_LOOKUP_THREADS:
                raise OSError(f"too many DNS lookups in progress; {host} not resolved")
            self._threads += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()

        def settle(result: list[Any] | None, error: BaseException | None) -> None:
            if future.done():  # the try timed out and went away meanwhile
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result or [])

        def lookup() -> None:
            result: list[Any] | None = None
            error: BaseException | None = None
            try:
                result = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                            flags=socket.AI_ADDRCONFIG)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                error = exc
            finally:
                with self._lock:
                    self._threads -= 1
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop is closed: nobody waits for the answer any more
                pass

        threading.Thread(target=lookup, name="postback-dns", daemon=True).start()
        return await future
