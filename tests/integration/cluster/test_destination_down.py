"""A destination's MX goes away for a while and comes back: its mail is deferred, retried, delivered."""

from __future__ import annotations

import pytest

from tests.integration.cluster.conftest import MESSAGES, drive
from tests.integration.cluster.ledger import plan, program_bounces, settle_and_audit
from tests.support.cluster import Cluster

# Each scenario is ~20 s of load plus settling; the first one also starts the cluster.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_destination_outage_defers_and_then_delivers(healthy_cluster: Cluster) -> None:
    cluster = healthy_cluster
    subs = plan("sink", MESSAGES, sorted(cluster.domains))
    program_bounces(cluster, subs)
    sink = cluster.sinks["beta.test"]
    results = await drive(
        cluster,
        subs,
        [
            (4.0, "beta.test MX stops (connections refused)", sink.stop),
            (12.0, "beta.test MX is back", sink.start),
        ],
    )
    books = await settle_and_audit(cluster, results, max_duplicates=0)
    deferred = {r for e in books.events if e.kind == "deferred" for r in e.recipients if "sink-" in r}
    books.counts["recipients deferred at least once"] = len(deferred)
    print(books.summary("destination down, then back"))
    assert not books.problems, books.summary("problems") + "\n" + cluster.logs()
    assert deferred, "the outage must have been felt: some beta.test mail was deferred"
    assert all(r.endswith("@beta.test") for r in deferred), sorted(deferred)[:5]
