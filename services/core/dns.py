"""The DNS resolver every service shares: configured servers (with port), timeouts, TTL cache.

Answers are classified once here into what they mean for mail: records, "definitely not"
(NXDOMAIN / no data), or "try later" (SERVFAIL, timeout) — never a bare dnspython exception.

The cache is dnspython's LRU cache with two operator caps: a record's TTL is honoured but never
beyond `cache_max_ttl` (a mistyped week-long TTL must not pin a dead MX), and negative answers
(NXDOMAIN, no data; TTL from the zone's SOA per RFC 2308) at most `negative_ttl`. Temporary
failures are never cached, so a SERVFAIL heals as soon as the authority does.
"""

from __future__ import annotations

import ipaddress
import time

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver

from services.core import metrics
from services.core.config import DnsConfig, split_server


class DnsTemporaryError(Exception):
    """SERVFAIL, timeout or no reachable server: the answer may be different later."""


class NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


class CappedCache(dns.resolver.LRUCache):
    """LRU answer cache whose entries expire at min(record TTL, cap); negative ones at a lower cap."""

    def __init__(self, max_size: int, max_ttl: float, negative_ttl: float) -> None:
        super().__init__(max_size)
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        # NXDOMAIN is stored under rdtype ANY; "no data" is an answer without an rrset.
        negative = value.rrset is None or key[1] == dns.rdatatype.ANY
        cap = self.negative_ttl if negative else self.max_ttl
        value.expiration = min(value.expiration, time.time() + cap)
        super().put(key, value)


def make_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    if config.servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in map(split_server, config.servers)
        ]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = config.timeout
    resolver.timeout = min(config.timeout, 2.0)
    resolver.cache = CappedCache(config.cache_size, config.cache_max_ttl, config.negative_ttl)
    metrics.DNS_CACHE.track(resolver.cache)  # hit rate on /metrics
    return resolver


def to_ascii(domain: str) -> str:
    """IDNA (punycode) form of a possibly non-ASCII domain, without the trailing dot.

    Raises ValueError for a name that cannot exist in the DNS (empty or over-long labels).
    """
    try:
        return dns.name.from_text(domain.rstrip(".")).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ValueError(f"not a valid domain name: {domain!r}") from exc


async def query(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
    """Records of a type; [] when the name exists without such records; None for NXDOMAIN."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoAnswer:
        return []
    except dns.exception.DNSException as exc:
        # NoNameservers (SERVFAIL/REFUSED everywhere), timeouts, malformed answers.
        raise DnsTemporaryError(f"{rdtype} {name}: {exc}") from exc
    return list(answer)


def ip_literal(host: str) -> str | None:
    """The address when `host` is an IP literal ("192.0.2.1", "[2001:db8::1]"), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """IPv4 then IPv6 addresses of a host (CNAMEs followed); an IP literal is returned as is."""
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    found: list[str] = []
    temporary: DnsTemporaryError | None = None
    for rdtype in ("A", "AAAA"):
        try:
            records = await query(resolver, host, rdtype)
        except DnsTemporaryError as exc:
            temporary = exc
            continue
        if records is None:
            break
        found.extend(r.to_text() for r in records)
    if not found and temporary is not None:
        raise temporary
    return found
