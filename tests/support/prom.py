"""Prometheus samples as tests read them: from exposition text, or this process's registry."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from services.core import metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """(name, labels) -> value of every sample in Prometheus exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape() -> Samples:
    """The samples of this process's registry, as /metrics would serve them."""
    return samples(metrics.exposition().decode())


def value(data: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in data.items() if n == name and want <= lbl)
