"""docs/operations.md tells operators the truth about the manifests.

The "Add a pool" recipe is run as written and its result must pass the same checks as the
shipped delivery manifests; the Secret commands create the keys the manifests read; every
repository path the guide names exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate

from tests.unit import test_k8s_wiring as wiring
from tests.unit.k8s_manifests import BASE, ROOT, render, secret_templates

GUIDE = ROOT / "docs" / "operations.md"


def _section(title: str) -> str:
    text = GUIDE.read_text()
    start = text.index(f"\n{title}\n")
    # Headings are ## and ###; a single # starts a comment inside a shell block.
    following = re.search(r"\n#{2,3} ", text[start + len(title) + 2 :])
    return text[start : start + len(title) + 2 + (following.start() if following else len(text))]


def _shell_blocks(section: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def _add_pool_overlay(tmp_path: Path) -> Path:
    """Follow "Add a pool" for a pool named bulk, in a scratch copy of the layout."""
    work = tmp_path / "repo"
    (work / "deploy/k8s/base").mkdir(parents=True)
    shutil.copy(BASE / "delivery-default.yaml", work / "deploy/k8s/base/delivery-default.yaml")
    overlay = work / "deploy/k8s/overlays/mine"
    overlay.mkdir(parents=True)
    (recipe,) = [b for b in _shell_blocks(_section("### Add a pool")) if "sed" in b]
    subprocess.run(["bash", "-euc", recipe], cwd=work, check=True, timeout=30)
    (overlay / "relais.toml").write_text(
        (BASE / "relais.toml").read_text() + '\n[pools.bulk]\nsources = [{ address = "192.0.2.50" }]\n'
    )
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "namespace: relais\n"
        "labels:\n"
        "  - pairs:\n"
        "      app.kubernetes.io/part-of: relais\n"
        "    includeSelectors: false\n"
        "resources:\n"
        f"  - {os.path.relpath(BASE, overlay)}\n"
        "  - delivery-bulk.yaml\n"
        "configMapGenerator:\n"
        "  - name: relais-config\n"
        "    behavior: replace\n"
        "    files:\n"
        "      - relais.toml\n"
    )
    return overlay


def test_the_add_a_pool_recipe_yields_a_correct_delivery_deployment(tmp_path: Path) -> None:
    overlay = _add_pool_overlay(tmp_path)
    manifests = render(overlay)
    names = {m["metadata"]["name"] for m in manifests}
    assert {"relais-delivery-bulk", "relais-delivery-default"} <= names
    for manifest in manifests:
        if manifest["kind"] != "ScaledObject":
            kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    # The same checks the shipped overlays pass: one worker Deployment per pool with its own
    # host port and node label, KEDA on its consumer, and no drift from the base copy.
    wiring.test_every_pool_has_exactly_one_delivery_deployment(overlay, tmp_path)
    wiring.test_delivery_copies_per_pool_differ_only_in_pool_and_port(overlay)
    wiring.test_keda_watches_the_consumers_each_service_pulls_from(overlay, tmp_path)
    wiring.test_each_service_loads_its_effective_config(overlay, tmp_path)


def test_install_creates_the_nats_secret_keys_the_manifests_read() -> None:
    install = "\n".join(_shell_blocks(_section("### 2. Create the namespace and the Secrets")))
    (loop,) = re.findall(r"for key in ([a-z ]+); do", install)
    created = {f"{key}-password" for key in loop.split()}
    (template,) = [s for s in secret_templates() if s["metadata"]["name"] == "relais-nats"]
    assert created == set(template["stringData"])
    for name in ("relais-ingress-tls", "relais-dkim", "relais-verp"):
        assert f"secret tls {name}" in install or f"secret generic {name}" in install


def test_paths_named_in_the_guide_exist() -> None:
    paths = set(re.findall(r"`((?:deploy|tests|docs|services)/[\w./-]+)`", GUIDE.read_text()))
    assert paths
    for path in paths:
        if "/mine" in path:
            continue  # the operator's own overlay
        assert (ROOT / path).exists(), path


def test_the_guide_covers_what_operators_must_do() -> None:
    headings = set(re.findall(r"^#{2,3} (.+)$", GUIDE.read_text(), re.M))
    for needed in (
        "Install",
        "Scale each service",
        "Add an IP to a pool",
        "Add a pool",
        "Rotate DKIM keys",
        "Drain a delivery node without losing mail",
        "Upgrade",
        "hostNetwork delivery per pool (shipped)",
        "Egress gateways",
        "SOCKS proxy per address",
    ):
        assert needed in headings, needed
