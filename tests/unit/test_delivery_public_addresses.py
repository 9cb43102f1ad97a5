"""delivery.public_mx_only: which addresses delivery may connect to. `ipaddress.is_global` alone
is not the rule: on Python 3.11 it calls multicast, IPv4-compatible, site-local, 6to4 and NAT64
addresses global whatever they lead to, so those are handled explicitly and tested here."""

from __future__ import annotations

import pytest

from services.delivery.public_addresses import why_not_public

PUBLIC = [
    "8.8.8.8",
    "193.0.14.129",
    "2606:4700:4700::1111",
    "2a00:1450:4001:82a::201a",
    "::ffff:8.8.8.8",  # IPv4-mapped: reaches 8.8.8.8 over an IPv6 socket
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "64:ff9b::808:808",  # NAT64 (well-known prefix) of 8.8.8.8
]

NOT_PUBLIC = [
    ("127.0.0.1", "loopback"),
    ("127.1.2.3", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("100.64.0.1", "shared (100.64.0.0/10)"),  # RFC 6598: carrier-grade NAT, also some clusters' pod network
    ("100.127.255.254", "shared (100.64.0.0/10)"),
    ("0.0.0.0", "unspecified"),  # connect() to it reaches this host
    ("0.1.2.3", "not globally routable"),  # "this network"
    ("224.0.0.1", "multicast"),  # is_global says True
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "not globally routable"),
    ("240.0.0.1", "not globally routable"),
    ("192.0.2.1", "not globally routable"),  # documentation
    ("198.18.0.1", "not globally routable"),  # benchmarking
    ("192.0.0.1", "not globally routable"),  # IETF protocol assignments (DS-Lite)
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),  # global-scope multicast: is_global says True
    ("fec0::1", "not globally routable"),  # deprecated site-local: is_global says True
    ("::127.0.0.1", "not globally routable"),  # IPv4-compatible (deprecated): is_global says True
    ("::8.8.8.8", "not globally routable"),
    ("100::1", "not globally routable"),  # discard-only
    ("2001:db8::1", "not globally routable"),  # documentation
    ("2001::1", "not globally routable"),  # Teredo
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1: loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped 10.0.0.1: private"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254: link-local"),
    ("::ffff:100.64.0.1", "IPv4-mapped 100.64.0.1: shared (100.64.0.0/10)"),
    ("2002:7f00:1::1", "6to4 127.0.0.1: loopback"),  # is_global says True
    ("2002:a00:1::1", "6to4 10.0.0.1: private"),
    ("2002:a9fe:a9fe::1", "6to4 169.254.169.254: link-local"),
    ("64:ff9b::7f00:1", "NAT64 127.0.0.1: loopback"),  # is_global says True
    ("64:ff9b::a9fe:a9fe", "NAT64 169.254.169.254: link-local"),
    ("64:ff9b:1::a00:1", "local-use NAT64 prefix"),  # RFC 8215: what it maps to is the network's choice
    ("not-an-address", "not an IP address"),
]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert why_not_public(address) is None


@pytest.mark.parametrize(("address", "reason"), NOT_PUBLIC)
def test_non_public_addresses_are_refused_with_the_reason(address: str, reason: str) -> None:
    assert why_not_public(address) == reason
