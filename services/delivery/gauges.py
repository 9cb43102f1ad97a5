"""Delivery's own Prometheus series, read from the live workers of this process when scraped.

Workers keep plain counters (`SourceHealth.unhealthy_total`, `DeliveryService.postponed`,
`DeliveryService.pushbacks`, `DeliveryService.possible_duplicates`, `ConnectionPool.opened`);
this collector only reads them, so the service code stays free of metric calls and tests can
build as many workers as they like.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.core.metrics import REGISTRY


class DeliveryCollector(Collector):
    def __init__(self) -> None:
        # Weak: a stopped worker (tests build many) must not be kept alive by its metrics.
        self._workers: weakref.WeakSet[Any] = weakref.WeakSet()

    def track(self, worker: Any) -> None:
        self._workers.add(worker)

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        workers = list(self._workers)
        unhealthy = GaugeMetricFamily(
            "relais_source_unhealthy",
            "Source addresses this host cannot bind (skipped)",
            labels=["source_ip"],
        )
        marks = CounterMetricFamily(
            "relais_source_unhealthy_marks", "Times a source was found unbindable", labels=["source_ip"]
        )
        postponed = CounterMetricFamily(
            "relais_delivery_postponed",
            "Jobs re-scheduled without an attempt (paused, shaping, connection limit, stopping)",
            labels=["reason"],
        )
        pushbacks = CounterMetricFamily(
            "relais_delivery_pushbacks",
            "Provider push-backs that started a back-off",
            labels=["site", "rule"],
        )
        duplicates = CounterMetricFamily(
            "relais_delivery_possible_duplicates",
            "Messages deferred after their final dot got no reply that could be read (connection "
            "lost, timeout, no SMTP reply): the MX may have taken them, so their retry may deliver "
            "them twice (RFC 1047)",
            labels=["pool", "site"],
        )
        opened = CounterMetricFamily("relais_delivery_connections_opened", "SMTP connections opened")
        sources: dict[str, int] = {}
        reasons: dict[str, int] = {}
        rules: dict[tuple[str, str], int] = {}
        maybe_twice: dict[tuple[str, str], int] = {}
        down: set[str] = set()
        for worker in workers:
            # The gauge is what is skipped now (a source that binds again leaves it); the marks
            # count every time one was found unbindable.
            down |= worker.health.unhealthy
            for address, count in worker.health.unhealthy_total.items():
                sources[address] = sources.get(address, 0) + count
            for reason, count in worker.postponed.items():
                reasons[reason] = reasons.get(reason, 0) + count
            for key, count in worker.pushbacks.items():
                rules[key] = rules.get(key, 0) + count
            for key, count in worker.possible_duplicates.items():
                maybe_twice[key] = maybe_twice.get(key, 0) + count
        for address in sorted(down):
            unhealthy.add_metric([address or "any"], 1)
        for address, count in sorted(sources.items()):
            marks.add_metric([address or "any"], count)
        for reason, count in sorted(reasons.items()):
            postponed.add_metric([reason], count)
        for (site, rule), count in sorted(rules.items()):
            pushbacks.add_metric([site, rule], count)
        for (pool, site), count in sorted(maybe_twice.items()):
            duplicates.add_metric([pool, site], count)
        opened.add_metric([], sum(w.connections.opened for w in workers))
        yield from (unhealthy, marks, postponed, pushbacks, duplicates, opened)


DELIVERY = DeliveryCollector()
REGISTRY.register(DELIVERY)
