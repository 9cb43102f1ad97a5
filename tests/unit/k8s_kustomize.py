"""A small kustomize, enough for deploy/k8s, for machines without kubectl.

It understands exactly the fields the Relais kustomizations use: `namespace`, `labels` (pairs,
without selectors), `resources` (files and directories), `configMapGenerator` (files,
`behavior: replace`, content-hash suffix and the references to it), `images`, and `patches`
with inline JSON 6902 operations targeted by kind, name or label selector. Anything else is an
error, not silently ignored. When kubectl is present, test_k8s_render checks that both
renderers produce the same manifests.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

_KNOWN = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images", "patches"}
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
}


class KustomizeError(ValueError):
    """A kustomization uses something this subset does not implement."""


def build(directory: Path) -> list[Manifest]:
    manifests, _ = _build(Path(directory))
    return manifests


def _build(directory: Path) -> tuple[list[Manifest], dict[str, dict[str, str]]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - _KNOWN
    if unknown:
        raise KustomizeError(f"{directory}: unsupported fields {sorted(unknown)}")
    manifests: list[Manifest] = []
    generated: dict[str, dict[str, str]] = {}  # ConfigMap name -> data
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            sub, sub_generated = _build(path)
            manifests += sub
            generated.update(sub_generated)
        else:
            manifests += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        behavior = generator.get("behavior", "create")
        if behavior not in ("create", "replace") or set(generator) - {"name", "files", "behavior"}:
            raise KustomizeError(f"{directory}: unsupported configMapGenerator {generator}")
        name = generator["name"]
        if (behavior == "replace") != (name in generated):
            raise KustomizeError(f"{directory}: configMapGenerator {name}: {behavior} does not fit")
        generated[name] = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
    for patch in spec.get("patches", []):
        _patch(manifests, patch)
    for image in spec.get("images", []):
        _set_image(manifests, image)
    if "namespace" in spec:
        for manifest in manifests:
            if manifest["kind"] not in _CLUSTER_SCOPED:
                manifest["metadata"]["namespace"] = spec["namespace"]
    for label in spec.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise KustomizeError(f"{directory}: labels into selectors or templates are not implemented")
        for manifest in manifests:
            manifest["metadata"].setdefault("labels", {}).update(label["pairs"])
    return manifests, generated


def finish(directory: Path) -> list[Manifest]:
    """The full render: generated ConfigMaps (hashed names) with the references rewritten."""
    spec = yaml.safe_load((Path(directory) / "kustomization.yaml").read_text()) or {}
    manifests, generated = _build(Path(directory))
    names = {}
    for name, data in generated.items():
        config_map: Manifest = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name},
            "data": data,
        }
        names[name] = f"{name}-{_hash(config_map)}"
        config_map["metadata"]["name"] = names[name]
        if "namespace" in spec:
            config_map["metadata"]["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            config_map["metadata"].setdefault("labels", {}).update(label["pairs"])
        manifests.append(config_map)
    for manifest in manifests:
        _rename_config_maps(manifest, names)
    return manifests


def _hash(config_map: Manifest) -> str:
    digest = hashlib.sha256(json.dumps(config_map, sort_keys=True).encode()).hexdigest()
    return "".join("bcdfghkmt2456789"[int(c, 16)] for c in digest[:10])


def _rename_config_maps(node: Any, names: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key in ("configMap", "configMapKeyRef", "configMapRef"):
            ref = node.get(key)
            if isinstance(ref, dict) and ref.get("name") in names:
                ref["name"] = names[ref["name"]]
        for value in node.values():
            _rename_config_maps(value, names)
    elif isinstance(node, list):
        for value in node:
            _rename_config_maps(value, names)


def _set_image(manifests: list[Manifest], image: dict[str, str]) -> None:
    for manifest in manifests:
        pod = manifest.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def _selected(manifest: Manifest, target: dict[str, str]) -> bool:
    if set(target) - {"kind", "name", "labelSelector"}:
        raise KustomizeError(f"unsupported patch target {target}")
    if "kind" in target and manifest["kind"] != target["kind"]:
        return False
    if "name" in target and manifest["metadata"]["name"] != target["name"]:
        return False
    if "labelSelector" in target:
        match = re.fullmatch(r"\s*([\w./-]+)\s+in\s+\(([^)]*)\)\s*", target["labelSelector"])
        if not match:
            raise KustomizeError(f"unsupported label selector {target['labelSelector']!r}")
        values = {v.strip() for v in match.group(2).split(",")}
        return manifest["metadata"].get("labels", {}).get(match.group(1)) in values
    return True


def _patch(manifests: list[Manifest], patch: dict[str, Any]) -> None:
    if set(patch) - {"target", "patch"}:
        raise KustomizeError(f"unsupported patch {patch}")
    operations = yaml.safe_load(patch["patch"])
    targets = [m for m in manifests if _selected(m, patch["target"])]
    if not targets:
        raise KustomizeError(f"patch target {patch['target']} matches nothing")
    for manifest in targets:
        for operation in operations:
            _apply(manifest, operation)


def _apply(document: Manifest, operation: dict[str, Any]) -> None:
    op, path = operation["op"], operation["path"]
    if op not in ("add", "replace"):
        raise KustomizeError(f"unsupported JSON patch op {op!r}")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    parent: Any = document
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last, value = tokens[-1], copy.deepcopy(operation["value"])
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif op == "add":
            parent.insert(int(last), value)
        else:
            parent[int(last)] = value
    else:
        if op == "replace" and last not in parent:
            raise KustomizeError(f"replace of missing {path}")
        parent[last] = value
