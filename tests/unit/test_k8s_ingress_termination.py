"""How an ingress pod leaves: out of the load balancer first, then its SMTP sessions drained.

With `externalTrafficPolicy: Local` the cloud load balancer sends to a node for as long as its
health check of that node (kube-proxy's healthCheckNodePort) has not failed enough times in a
row; kube-proxy keeps forwarding to the terminating pod meanwhile. Once SIGTERM closes the
listeners, every connection the load balancer still sends there is refused. So the preStop
pause must outlast the health check's detection time, and the grace period must hold the pause
plus the ingress's own drain (services/ingress/service.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ingress import service as ingress_service
from tests.unit.k8s_manifests import KUSTOMIZATIONS, Manifest, one, render
from tests.unit.test_k8s_wiring import effective_config

# Detection time of the slowest default the shipped Service meets: an AWS NLB health-checks
# every 10 s and takes a target out after 3 failures (GKE's L4 check for Local: 3 s x 2).
LOAD_BALANCER_DETECTION = 30


def _pre_stop_pause(container: Manifest) -> int:
    handler = container["lifecycle"]["preStop"]
    if "sleep" in handler:
        return int(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def _ingress(kustomization: Path) -> tuple[Manifest, Manifest]:
    deployment = one(render(kustomization), "Deployment", "relais-ingress")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_ingress_leaves_the_load_balancer_before_it_stops_listening(kustomization: Path) -> None:
    _, container = _ingress(kustomization)
    assert _pre_stop_pause(container) >= LOAD_BALANCER_DETECTION


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_ingress_grace_period_holds_the_pause_and_the_drain(kustomization: Path, tmp_path: Path) -> None:
    deployment, container = _ingress(kustomization)
    config = effective_config(render(kustomization), deployment, tmp_path)
    # Sessions in DATA finish, then hand-offs still running (a client that left after its dot,
    # or was cut) get their broker round trips, at the deployment's own nats.publish_timeout:
    # the figure `relais up` waits for the ingress too.
    needed = _pre_stop_pause(container) + ingress_service.stop_seconds(config)
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed
