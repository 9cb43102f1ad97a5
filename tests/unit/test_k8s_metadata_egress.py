"""Egress "to anywhere" on web ports must not include the cloud's metadata service.

Bounce POSTs webhooks over HTTP(S) and parses mail from the internet (asynchronous bounces, FBL
reports); delivery fetches MTA-STS policies over HTTPS. Their policies opened ports 80/443 to
every address, 169.254.169.254 included, where the node's cloud credentials are served over
plain HTTP on most clouds: one server-side request forgery or parser bug away from them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.unit.k8s_manifests import KUSTOMIZATIONS, Manifest, one, render

METADATA = [ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")]
WEB_EGRESS = ("bounce-egress-webhooks", "delivery-egress-smtp")
# DNS may still go to link-local resolvers (NodeLocal DNSCache listens on 169.254.20.10).
WEB_PORTS = {80, 443}


def _ports(rule: Manifest) -> set[int]:
    return {int(p["port"]) for p in rule.get("ports", [])}


def _reaches(rule: Manifest, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    peers = rule.get("to")
    if not peers:
        return True  # no `to`: every destination
    for peer in peers:
        block = peer.get("ipBlock")
        if block is None:
            continue  # pod or namespace selectors never select the metadata address
        network = ipaddress.ip_network(block["cidr"])
        if address.version != network.version or address not in network:
            continue
        if not any(address in ipaddress.ip_network(e) for e in block.get("except", [])):
            return True
    return False


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_web_egress_does_not_reach_the_metadata_service(kustomization: Path) -> None:
    manifests = render(kustomization)
    for name in WEB_EGRESS:
        policy = one(manifests, "NetworkPolicy", name)
        web_rules = [rule for rule in policy["spec"]["egress"] if _ports(rule) & WEB_PORTS]
        assert web_rules, name
        for rule in web_rules:
            for address in METADATA:
                assert not _reaches(rule, address), f"{name} lets pods reach {address} over HTTP(S)"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_web_egress_still_reaches_the_internet(kustomization: Path) -> None:
    manifests = render(kustomization)
    for name in WEB_EGRESS:
        policy = one(manifests, "NetworkPolicy", name)
        for public in (ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("2606:2800:220:1::1")):
            assert any(_reaches(rule, public) for rule in policy["spec"]["egress"]), (name, public)
