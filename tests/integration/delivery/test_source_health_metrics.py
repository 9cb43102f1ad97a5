"""Delivery's own series: the unhealthy gauge follows a source back, and push-back sites are capped."""

from __future__ import annotations

import pytest

from services.core import metrics
from services.core.bus import Bus
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.delivery import sources
from services.delivery.service import DeliveryService
from tests.integration.delivery.conftest import SOURCE_B, pools, submit_many
from tests.support.prom import scrape
from tests.support.relais import wait_for_events


def unhealthy(address: str) -> float:
    return scrape().get(("relais_source_unhealthy", frozenset({("source_ip", address)})), 0.0)


async def test_a_source_that_binds_again_leaves_the_unhealthy_gauge(
    nats_server: EmbeddedNats, topology_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url), pools=pools(SOURCE_B))
    worker = DeliveryService(config, topology_bus)
    assert worker.serving() == ["default"]
    worker.health.mark_unhealthy(SOURCE_B, "bind failed on connect")  # what an EADDRNOTAVAIL does
    assert unhealthy(SOURCE_B) == 1

    monkeypatch.setattr(sources, "RECHECK_SECONDS", 0.0)
    assert worker.serving() == ["default"], "the recheck finds it bindable again"
    assert SOURCE_B not in worker.health.unhealthy
    assert unhealthy(SOURCE_B) == 0
    marks = scrape()[("relais_source_unhealthy_marks_total", frozenset({("source_ip", SOURCE_B)}))]
    assert marks >= 1, "the times it was marked stay counted"


RULES = """
[[pushback]]
name = "cap-test-slow-down"
match = "slow down"
duration = "1m"
messages_per_minute = 600
"""
THROTTLE = "421 4.7.0 Too much mail from your IP, slow down"


async def test_pushback_sites_share_the_site_label_cap(
    make_stack, make_sink, shaping_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "SITES", metrics.BoundedLabel(cap=1))
    for host in ("127.0.0.2", "127.0.0.3"):
        sink = make_sink(host)
        sink.tempfail_data = 1
        sink.tempfail_reply = THROTTLE
    stack = await make_stack(delivery={"shaping_file": shaping_file(RULES)})
    await submit_many(stack, 1, "a@alpha.test")
    await submit_many(stack, 1, "b@beta.test")
    await wait_for_events(stack.config.nats.url, "deferred", 2)

    counts = {
        dict(labels)["site"]: v
        for (name, labels), v in scrape().items()
        if name == "relais_delivery_pushbacks_total" and dict(labels)["rule"] == "cap-test-slow-down"
    }
    assert sum(counts.values()) == 2, counts
    assert len(set(counts) - {"other"}) <= 1, f"past the cap, sites count as other: {counts}"
