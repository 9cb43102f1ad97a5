"""The DNS resolver every service shares: configured servers (with port), timeouts, TTL cache.

Answers are classified once here into what they mean for mail: records, "definitely not"
(NXDOMAIN / no data), or "try later" (SERVFAIL, timeout) — never a bare dnspython exception.
"""

from __future__ import annotations

import ipaddress

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from services.core.config import DnsConfig, split_server


class DnsTemporaryError(Exception):
    """SERVFAIL, timeout or no reachable server: the answer may be different later."""


class NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


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
    resolver.cache = dns.resolver.LRUCache(max_size=100_000)
    return resolver


def to_ascii(domain: str) -> str:
    """IDNA (punycode) form of a possibly non-ASCII domain, without the trailing dot."""
    return dns.name.from_text(domain.rstrip(".")).to_text(omit_final_dot=True).lower()


async def query(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
    """Records of a type; [] when the name exists without such records; None for NXDOMAIN."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return None
    except dns.resolver.NoAnswer:
        return []
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
        raise DnsTemporaryError(f"{rdtype} {name}: {exc}") from exc
    except dns.exception.DNSException as exc:
        raise DnsTemporaryError(f"{rdtype} {name}: {exc}") from exc
    return list(answer)


async def addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """IPv4 then IPv6 addresses of a host; an IP literal is returned as is."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
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
