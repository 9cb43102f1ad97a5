"""Autoscaled Deployments leave their size to the autoscaler.

A Deployment that names `spec.replicas` while an HPA (or KEDA's, for a ScaledObject) sizes it is
set back to that number by every `kubectl apply -k`: the recipes in docs/operations.md (add an
IP, rotate a DKIM key, upgrade) would each cut a busy ingress from, say, eight pods to two,
draining six of them, until the autoscaler grows it again. Kubernetes' HPA documentation says
to drop the field from the manifest for exactly this reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.k8s_manifests import KUSTOMIZATIONS, autoscaled_minimums, one, render

PARAMS = pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)


@PARAMS
def test_autoscaled_deployments_do_not_pin_their_replicas(kustomization: Path) -> None:
    manifests = render(kustomization)
    minimums = autoscaled_minimums(manifests)
    assert len(minimums) >= 4
    for name in minimums:
        deployment = one(manifests, "Deployment", name)
        assert "replicas" not in deployment["spec"], (
            f"{name}: `kubectl apply` would reset it to {deployment['spec']['replicas']} replicas"
        )


@PARAMS
def test_every_autoscaled_service_keeps_two_replicas(kustomization: Path) -> None:
    for name, minimum in autoscaled_minimums(render(kustomization)).items():
        assert minimum >= 2, f"{name}: one pod (or none) is one eviction away from an outage"
