"""The DNS server stops for a few seconds: routing and delivery defer, then everything goes out."""

from __future__ import annotations

import pytest

from tests.integration.cluster.conftest import MESSAGES, drive
from tests.integration.cluster.ledger import plan, program_bounces, settle_and_audit
from tests.support.cluster import Cluster

# Each scenario is ~20 s of load plus settling; the first one also starts the cluster.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_dns_outage_defers_and_then_delivers(healthy_cluster: Cluster) -> None:
    cluster = healthy_cluster
    subs = plan("dns", MESSAGES, sorted(cluster.domains))
    program_bounces(cluster, subs)
    results = await drive(
        cluster,
        subs,
        [
            (4.0, "DNS server stops", cluster.dns.stop),
            (10.0, "DNS server is back", cluster.dns.start),
        ],
    )
    books = await settle_and_audit(cluster, results, max_duplicates=0)
    deferred = {
        r
        for e in books.events
        if e.kind == "deferred"
        for r in e.recipients
        if r.startswith(("dns-", "bounce-dns-"))
    }
    books.counts["recipients deferred at least once"] = len(deferred)
    print(books.summary("DNS server down, then back"))
    assert not books.problems, books.summary("problems") + "\n" + cluster.logs()
    assert deferred, "the outage must have been felt: some mail was deferred for DNS"
