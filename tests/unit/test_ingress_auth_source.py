"""What failed AUTHs are counted under: an IPv6 client's /64, never its single address."""

from __future__ import annotations

import pytest

from services.core.topology import limit_subject
from services.ingress.limits import auth_source, ip_token


@pytest.mark.parametrize(
    ("ip", "source"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2::1", "2001:db8:1:2::"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"),
        ("2001:db8:1:3::1", "2001:db8:1:3::"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # an IPv4 client, not the /64 of every such client
        ("fe80::1%eth0", "fe80::"),  # a zone is no part of the network
        ("", ""),  # a PROXY header that named no address
    ],
)
def test_auth_failures_are_counted_per_ipv4_address_and_ipv6_64(ip: str, source: str) -> None:
    assert auth_source(ip) == source
    limit_subject("authfail-ip", ip_token(auth_source(ip)), 1)  # a valid subject token
