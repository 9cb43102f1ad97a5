"""`nats.declare_topology`: every service declares the JetStream topology at start unless told
not to; on Kubernetes they are told not to, and the relais-topology pod applies it as `admin`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import ConfigError, load_config
from services.up import write_default_config
from tests.unit.k8s_manifests import KUSTOMIZATIONS, relais_workloads, render
from tests.unit.test_k8s_wiring import _main_container, effective_config


def test_services_declare_the_topology_unless_told_not_to(tmp_path: Path) -> None:
    assert load_config(None, env={}).nats.declare_topology is True
    path, _ = write_default_config(tmp_path, 2600)  # `relais up`
    assert load_config(str(path), env={}).nats.declare_topology is True


def test_the_file_and_the_environment_can_turn_it_off(tmp_path: Path) -> None:
    path = tmp_path / "relais.toml"
    path.write_text("[nats]\ndeclare_topology = false\n")
    assert load_config(path, env={}).nats.declare_topology is False
    assert load_config(None, env={"RELAIS_NATS__DECLARE_TOPOLOGY": "false"}).nats.declare_topology is False
    path.write_text('[nats]\ndeclare_topology = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"nats\.declare_topology"):
        load_config(path, env={})


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_on_kubernetes_only_the_topology_pod_declares_it_as_admin(
    kustomization: Path, tmp_path: Path
) -> None:
    manifests = render(kustomization)
    appliers = []
    for workload in relais_workloads(manifests):
        config = effective_config(manifests, workload, tmp_path)
        args = _main_container(workload)["args"]
        if args[:2] == ["topology", "apply"]:
            appliers.append(workload)
            # `relais topology apply` declares whatever the (shared) file says.
            assert config.nats.user == "admin"
        else:
            assert config.nats.declare_topology is False, workload["metadata"]["name"]
            assert config.nats.user != "admin"
    (applier,) = appliers
    assert applier["spec"]["replicas"] == 1
    assert applier["spec"]["strategy"]["type"] == "Recreate"
