"""The NATS node that leads the work streams is SIGKILLed mid-run and restarted later.

Each stream and each consumer is a Raft group of its own, its leader wherever an election put it:
the node leading the delivery stream need not be the one whose acks the ingress's 250s wait for
(the submit stream), nor the one holding the consumers' state. So before the load, the leaders
of the mail's streams (submit, deliver, bounce, events) and of their consumers are gathered on
one node, and that node is killed.

With R3 streams the two surviving nodes elect new leaders and keep every acknowledged message.
Publishes in flight during the election may time out: the ingress asks again under the same msg
id until the new leader answers (`ingress.queue_timeout`), so a message stored before its ack
was lost gets its 250. The audit checks that nothing the ingress refused was delivered anyway:
with only `nats.publish_timeout` (5 s) for that, an election on a loaded CI machine outlasted
it, and 4 of 3,000 messages were answered 451 and delivered.
"""

from __future__ import annotations

import pytest

from services.core.topology import (
    BOUNCE_STREAM,
    DELIVER_STREAM,
    EVENTS_STREAM,
    SUBMIT_STREAM,
    consumer_bindings,
)
from tests.integration.cluster.conftest import MESSAGES, drive
from tests.integration.cluster.ledger import plan, program_bounces, settle_and_audit
from tests.support.cluster import Cluster

# Each scenario is ~20 s of load plus settling; the first one also starts the cluster.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_killing_the_stream_leader_loses_nothing(healthy_cluster: Cluster) -> None:
    cluster = healthy_cluster
    subs = plan("lead", MESSAGES, sorted(cluster.domains))
    program_bounces(cluster, subs)
    assert cluster.config is not None
    streams = (SUBMIT_STREAM, DELIVER_STREAM, BOUNCE_STREAM, EVENTS_STREAM)
    consumers = [(b.stream, b.durable) for b in consumer_bindings(cluster.config) if b.stream in streams]
    groups = [(s, "") for s in streams] + consumers
    before = {f"{s} {c}".strip(): await cluster.nats.leader_of(s, c) for s, c in groups}
    node = before[SUBMIT_STREAM]
    print(f"  leaders as elected: {before}; gathering them on n{node}")
    await cluster.nats.lead_from(node, streams, consumers)
    led_at_kill: dict[str, int] = {}

    async def kill_leader() -> None:
        # Where each leader is the moment the node dies: the test insists it led them all.
        for stream, consumer in groups:
            led_at_kill[f"{stream} {consumer}".strip()] = await cluster.nats.leader_of(stream, consumer)
        print(f"  leaders: {led_at_kill}; killing n{node}")
        cluster.nats.kill(node)

    async def report_new_leader() -> None:
        print(f"  new leaders: { {s: await cluster.nats.leader_of(s) for s in streams} }")

    results = await drive(
        cluster,
        subs,
        [
            (5.0, f"SIGKILL n{node}, leading the mail's streams and their consumers", kill_leader),
            (9.0, "who leads now", report_new_leader),
            (14.0, "restart the killed node", lambda: cluster.nats.restart(node)),
        ],
    )
    assert set(led_at_kill.values()) == {node}, f"n{node} did not lead them all: {led_at_kill}"
    # Acks lost with the node mean redeliveries; each consumer's in-flight work is the bound.
    window = 2 * cluster.config.delivery.concurrency
    books = await settle_and_audit(cluster, results, max_duplicates=window)
    print(books.summary("NATS stream leader killed"))
    assert not books.problems, books.summary("problems") + "\n" + cluster.logs()
    assert books.counts.get("accepted (250)", 0) >= len(subs) * 0.5, books.counts
