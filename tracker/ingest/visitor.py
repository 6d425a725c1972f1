"""What a request tells about its visitor: address (masked), country, device, bot or not.

Shlink's rule: visitor data is truncated and flagged in one place, here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from crawlerdetect import CrawlerDetect
from user_agents import parse as parse_ua

MAX_UA = 512
MAX_REFERER = 1024
_CONTROL = dict.fromkeys(list(range(0x20)) + [0x7F])


def clean_header(value: str, limit: int) -> str:
    """Header text safe to store: control characters removed, length bounded."""
    value = value[:limit]
    # Control characters are never printable: the common case skips translate(), which
    # looks every character up in a dict.
    return value if value.isprintable() else value.translate(_CONTROL)


@lru_cache(maxsize=65536)
def mask_ip(address: str) -> str | None:
    """The network a visitor is in, never the visitor: IPv4 /24, IPv6 /48."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and one Hit is
# made per request. Nothing changes one after it is made.
@dataclass(slots=True)
class Hit:
    """What a tracking request carries, read once by whichever server took it (the fast path
    or aiohttp): everything the pipeline looks at, nothing else."""

    method: str
    slug: str
    query: Mapping[str, str]      # first value of each parameter
    peer: str                     # the connection's address
    user_agent: str = ""
    referer: str = ""
    visitor_cookie: str = ""
    forwarded_for: str = ""
    country_header: str = ""      # the value of the configured trusted country header


def client_ip(hit: Hit, proxy_hops: int) -> str:
    """The visitor's address: the peer, or the entry `proxy_hops` from the right of
    X-Forwarded-For when that many trusted proxies stand in front of us."""
    if proxy_hops > 0:
        hops = [h.strip() for h in hit.forwarded_for.split(",") if h.strip()]
        if len(hops) >= proxy_hops:
            return hops[-proxy_hops]
    return hit.peer


class UserAgents:
    """Bot/preview detection (CrawlerDetect's maintained list) and device type (ua-parser),
    cached per distinct user agent: parsing one costs up to a millisecond."""

    def __init__(self, cache_size: int = 16384) -> None:
        self._crawlers = CrawlerDetect()
        self.classify = lru_cache(maxsize=cache_size)(self._classify)
        # Keyed by the header as sent, cut to MAX_UA (so an entry stays bounded): cleaning it
        # costs more than the lookup, and a few user agents make most of the traffic. It
        # parses through _classify, not the classify cache: one cache's worth of memory.
        self._facts = lru_cache(maxsize=cache_size)(self._facts_of)

    def facts(self, header: str) -> tuple[str, bool, str]:
        """(the user agent as stored, is_bot, device) of a User-Agent header."""
        return self._facts(header[:MAX_UA])

    def _facts_of(self, header: str) -> tuple[str, bool, str]:
        user_agent = clean_header(header, MAX_UA)
        return (user_agent, *self._classify(user_agent))

    def _classify(self, user_agent: str) -> tuple[bool, str]:
        if not user_agent.strip():
            # No browser sends an empty User-Agent; scripts do.
            return True, "other"
        parsed = parse_ua(user_agent)
        is_bot = bool(self._crawlers.isCrawler(user_agent)) or parsed.is_bot
        if parsed.is_tablet:
            device = "tablet"
        elif parsed.is_mobile:
            device = "mobile"
        elif parsed.is_pc:
            device = "desktop"
        else:
            device = "other"
        return is_bot, device


class Countries:
    """Country of an address from a GeoIP2/GeoLite2 database, else from a trusted header."""

    def __init__(self, mmdb_path: str, header: str) -> None:
        self._reader: Any = None
        if mmdb_path:
            import maxminddb

            self._reader = maxminddb.open_database(mmdb_path)
        self.header = header
        # Whether any source of countries is set up (none: every country is "").
        self.configured = bool(mmdb_path or header)

    def lookup(self, hit: Hit, address: str) -> str:
        if self._reader is not None and address:
            try:
                record = self._reader.get(address)
            except ValueError:
                record = None
            if isinstance(record, dict):
                country = record.get("country") or record.get("registered_country") or {}
                code = country.get("iso_code") if isinstance(country, dict) else None
                if isinstance(code, str) and len(code) == 2:
                    return code.upper()
        if hit.country_header:
            code = hit.country_header.strip().upper()
            # Cloudflare's XX (unknown) and T1 (Tor) are not countries.
            if len(code) == 2 and code.isascii() and code.isalpha() and code != "XX":
                return code
        return ""

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# (masked address or None, country, device, is_bot, user agent as stored): a tuple, not an
# object: one is made per request.
Visitor = tuple[str | None, str, str, bool, str]


def visitor_of(hit: Hit, agents: UserAgents, countries: Countries, proxy_hops: int) -> Visitor:
    address = client_ip(hit, proxy_hops) if proxy_hops else hit.peer
    user_agent, is_bot, device = agents.facts(hit.user_agent)
    country = countries.lookup(hit, address) if countries.configured else ""
    return mask_ip(address) if address else None, country, device, is_bot, user_agent
