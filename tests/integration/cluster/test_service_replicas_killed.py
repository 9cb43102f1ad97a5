"""A router replica and a delivery replica are SIGKILLed mid-run and restarted: nothing is lost."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.cluster.conftest import MESSAGES, drive
from tests.integration.cluster.ledger import plan, program_bounces, settle_and_audit
from tests.support.cluster import Cluster

# Each scenario is ~20 s of load plus settling; the first one also starts the cluster.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_killed_router_and_delivery_replicas_lose_nothing(healthy_cluster: Cluster) -> None:
    cluster = healthy_cluster
    subs = plan("kill", MESSAGES, sorted(cluster.domains))
    program_bounces(cluster, subs)
    results = await drive(
        cluster,
        subs,
        [
            (5.0, "SIGKILL router-0", lambda: cluster.kill("router", 0)),
            (7.0, "SIGKILL delivery-0", lambda: cluster.kill("delivery", 0)),
            (11.0, "restart router-0", lambda: cluster.restart("router", 0)),
            (12.0, "restart delivery-0", lambda: cluster.restart("delivery", 0)),
        ],
    )
    # A killed delivery replica may have finished SMTP transactions it never acked: those jobs
    # are delivered again by the other replica. The window is one replica's concurrency.
    window = cluster.config.delivery.concurrency
    books = await settle_and_audit(cluster, results, max_duplicates=window)
    print(books.summary("router and delivery replicas killed"))
    await asyncio.sleep(0)
    assert not books.problems, books.summary("problems") + "\n" + cluster.logs()
    assert books.counts.get("accepted (250)", 0) >= len(subs) * 0.9, books.counts
