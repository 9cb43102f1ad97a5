"""The NATS node that leads the work streams is SIGKILLed mid-run and restarted later.

With R3 streams the two surviving nodes elect new leaders and keep every acknowledged message.
Publishes in flight during the election may time out: the ingress asks again under the same msg
id until the new leader answers (`ingress.queue_timeout`), so a message stored before its ack
was lost gets its 250. The audit checks that nothing the ingress refused was delivered anyway:
with only `nats.publish_timeout` (5 s) for that, an election on a loaded CI machine outlasted
it, and 4 of 3,000 messages were answered 451 and delivered.
"""

from __future__ import annotations

import pytest

from services.core.topology import DELIVER_STREAM, SUBMIT_STREAM
from tests.integration.cluster.conftest import MESSAGES, drive
from tests.integration.cluster.ledger import plan, program_bounces, settle_and_audit
from tests.support.cluster import Cluster

# Each scenario is ~20 s of load plus settling; the first one also starts the cluster.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_killing_the_stream_leader_loses_nothing(healthy_cluster: Cluster) -> None:
    cluster = healthy_cluster
    subs = plan("lead", MESSAGES, sorted(cluster.domains))
    program_bounces(cluster, subs)
    victim: dict[str, int] = {}

    async def kill_leader() -> None:
        victim["node"] = await cluster.nats.leader_of(DELIVER_STREAM)
        submit_leader = await cluster.nats.leader_of(SUBMIT_STREAM)
        print(f"  leader of {DELIVER_STREAM}: n{victim['node']}, of {SUBMIT_STREAM}: n{submit_leader}")
        cluster.nats.kill(victim["node"])

    async def report_new_leader() -> None:
        print(f"  new leader of {DELIVER_STREAM}: n{await cluster.nats.leader_of(DELIVER_STREAM)}")

    results = await drive(
        cluster,
        subs,
        [
            (5.0, "SIGKILL the node leading the delivery stream", kill_leader),
            (9.0, "who leads now", report_new_leader),
            (14.0, "restart the killed node", lambda: cluster.nats.restart(victim["node"])),
        ],
    )
    # Acks lost with the node mean redeliveries; each consumer's in-flight work is the bound.
    window = 2 * cluster.config.delivery.concurrency
    books = await settle_and_audit(cluster, results, max_duplicates=window)
    print(books.summary("NATS stream leader killed"))
    assert not books.problems, books.summary("problems") + "\n" + cluster.logs()
    assert books.counts.get("accepted (250)", 0) >= len(subs) * 0.5, books.counts
