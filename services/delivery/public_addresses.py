"""Which addresses delivery may connect to when `delivery.public_mx_only` is on.

A recipient domain is chosen by whoever sends: without this check its MX (or its MTA-STS policy
host) can name an address inside the operator's network, and Relais would connect there
(server-side request forgery on port 25 and 443). Only globally routable unicast addresses
pass.

`ipaddress.is_global` is the base, but not the whole rule: on Python 3.11 it calls multicast,
site-local (fec0::/10), IPv4-compatible (::a.b.c.d), 6to4 and NAT64 addresses global whatever
they lead to. An address that carries an IPv4 address the network will reach instead
(IPv4-mapped, 6to4, NAT64 well-known prefix) is judged by that IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

# Why an address may not be connected to, or None when it may (`why_not_public` or a test's).
AddressCheck = Callable[[str], str | None]

# RFC 6598 shared address space: carrier-grade NAT, and the pod or service network of some
# clusters. Neither private (RFC 1918) nor global to `ipaddress`.
_SHARED = ipaddress.ip_network("100.64.0.0/10")
# RFC 1918 and unique local addresses: the networks operators build inside.
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
# RFC 6052 well-known NAT64 prefix: the last 32 bits are the IPv4 address the gateway connects to.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 8215 local-use NAT64 prefix: where the IPv4 address sits is the network's choice, so what
# such an address reaches cannot be told from it.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# Every globally routable IPv6 unicast address is in here (RFC 4291); the rest is reserved,
# deprecated (site-local) or special.
_IPV6_UNICAST = ipaddress.ip_network("2000::/3")


def why_not_public(address: str) -> str | None:
    """None when `address` is a globally routable unicast address, else why it is not (for the
    attempt's notes: "loopback", "private", "IPv4-mapped 10.0.0.1: private", ...)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            how, ipv4 = embedded
            why = _why_not_public(ipv4)
            return None if why is None else f"{how} {ipv4}: {why}"
        if ip in _NAT64_LOCAL:
            return "local-use NAT64 prefix"
    return _why_not_public(ip)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address a connection to `ip` ends up at, with how it is embedded."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _why_not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    # Most specific first: these names are what an operator reading the notes looks for.
    if ip.is_unspecified:
        return "unspecified"  # connecting to 0.0.0.0 or :: reaches this host
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"  # 169.254.169.254: the cloud metadata service
    if ip.is_multicast:
        return "multicast"
    if ip in _SHARED:
        return "shared (100.64.0.0/10)"
    if _is_private_use(ip):
        return "private"
    if not ip.is_global or ip.is_reserved:
        return "not globally routable"
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _IPV6_UNICAST:
        return "not globally routable"
    return None


def _is_private_use(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in net for net in _RFC1918)
    return ip in _UNIQUE_LOCAL
