"""The fallback renderer (k8s_kustomize.py) produces what kubectl kustomize produces.

Generated ConfigMap names carry a content hash whose exact algorithm is kustomize's own; the
comparison strips it, everything else must be identical.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.unit.k8s_kustomize import KustomizeError, finish
from tests.unit.k8s_manifests import KUSTOMIZATIONS, Manifest, kubectl_available, render

_HASHED = re.compile(r"\b(relais-config|nats-config|otel-collector-config)-[a-z0-9]{10}\b")


def _normalised(manifests: list[Manifest]) -> dict[tuple[str, str], str]:
    out = {}
    for manifest in manifests:
        text = _HASHED.sub(r"\1", yaml.safe_dump(manifest, sort_keys=True))
        name = _HASHED.sub(r"\1", manifest["metadata"]["name"])
        out[(manifest["kind"], name)] = text
    return out


@pytest.mark.skipif(not kubectl_available(), reason="nothing to compare against without kubectl")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_fallback_renders_what_kubectl_renders(kustomization: Path) -> None:
    ours = _normalised(finish(kustomization))
    theirs = _normalised(render(kustomization))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_generated_names_change_with_content(kustomization: Path) -> None:
    names = {m["metadata"]["name"] for m in finish(kustomization) if m["kind"] == "ConfigMap"}
    assert all(_HASHED.fullmatch(n) for n in names), names


def test_fallback_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("commonLabels:\n  a: b\n")
    with pytest.raises(KustomizeError):
        finish(tmp_path)
