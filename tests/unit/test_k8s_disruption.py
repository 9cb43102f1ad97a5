"""Disruption budgets that never hold a node drain hostage to pods that serve nothing.

With the default `unhealthyPodEvictionPolicy` (IfHealthyBudget) a pod that is not ready may
only be evicted while the budget is met. When NATS is away every Relais pod is unready (its
/readyz checks the connection) or restarting, so no budget is met, and `kubectl drain` waits
for ever, on every node holding one of them: the nodes of NATS itself included, which may be
what needs the maintenance. The ingress, router and bounce hold nothing an eviction could
lose. Delivery keeps the default on purpose: a worker that is unready while NATS is away may
still have final dots in flight, whose outcomes it can store once NATS returns; evicting all of
them at once then would turn those into second deliveries.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.k8s_manifests import KUSTOMIZATIONS, by_kind, render

STATELESS = {"ingress", "router", "bounce"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_unready_stateless_pods_never_block_a_drain(kustomization: Path) -> None:
    seen = set()
    for budget in by_kind(render(kustomization), "PodDisruptionBudget"):
        labels = budget["spec"]["selector"]["matchLabels"]
        if labels.get("app.kubernetes.io/name") != "relais":
            continue
        component = labels["app.kubernetes.io/component"]
        policy = budget["spec"].get("unhealthyPodEvictionPolicy", "IfHealthyBudget")
        if component in STATELESS:
            assert policy == "AlwaysAllow", budget["metadata"]["name"]
            seen.add(component)
        else:
            assert policy == "IfHealthyBudget", budget["metadata"]["name"]
    assert seen == STATELESS
