"""Every manifest in deploy/k8s is valid Kubernetes, offline.

Built-in kinds are checked against the Kubernetes OpenAPI schemas bundled by
kubernetes-validate, in strict mode (an unknown or misplaced field fails, as `kubectl apply
--validate=strict` would). KEDA's ScaledObject is a custom resource with no bundled schema, so
it is checked against the fields KEDA documents for keda.sh/v1alpha1, with its HPA `behavior`
block checked against the real autoscaling/v2 schema.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.k8s_manifests import (
    KUSTOMIZATIONS,
    Manifest,
    by_kind,
    load_yaml_file,
    render,
    secret_templates,
    workloads,
)

# The oldest Kubernetes release still commonly run, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STR = {"type": "string"}

# keda.sh/v1alpha1 ScaledObject, as documented by KEDA (concepts/scaling-deployments).
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": _STR,
                        "kind": _STR,
                        "name": _STR,
                        "envSourceContainerName": _STR,
                    },
                },
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT32, "replicas": _INT32, "behavior": _STR},
                    "additionalProperties": False,
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": _STR, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            # KEDA reads trigger metadata as strings only: a bare number fails.
                            "metadata": {"type": "object", "additionalProperties": _STR},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": _STR, "kind": _STR},
                            },
                        },
                    },
                },
            },
        },
    },
}

# The nats-jetstream scaler's metadata (KEDA scalers/nats-jetstream).
NATS_JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold"}
NATS_JETSTREAM_ALLOWED = NATS_JETSTREAM_REQUIRED | {
    "account",
    "accountID",
    "activationLagThreshold",
    "useHttps",
}


def _sources() -> list[tuple[str, Manifest]]:
    """(where, manifest) for every rendered kustomization and every Secret template."""
    out = [(f"{k.relative_to(k.parents[2])}", m) for k in KUSTOMIZATIONS for m in render(k)]
    out += [("secrets", m) for m in secret_templates()]
    return out


def _builtin(manifests: list[tuple[str, Manifest]]) -> list[tuple[str, Manifest]]:
    return [(w, m) for w, m in manifests if (m["apiVersion"], m["kind"]) not in CUSTOM_KINDS]


def _id(item: tuple[str, Manifest]) -> str:
    where, m = item
    return f"{where}:{m['kind']}/{m['metadata']['name']}"


ALL = _sources()


def test_every_kustomization_renders_something() -> None:
    for kustomization in KUSTOMIZATIONS:
        kinds = {m["kind"] for m in render(kustomization)}
        assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "ScaledObject"} <= kinds, kustomization


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", _builtin(ALL), ids=_id)
def test_builtin_kinds_match_the_kubernetes_schema(item: tuple[str, Manifest], version: str) -> None:
    _, manifest = item
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{_id(item)} at {'/'.join(map(str, exc.path))}: {exc.message}")


def test_the_validator_rejects_what_it_should() -> None:
    """The strict check is live: a misspelt field and a wrong type are both refused."""
    deployment = next(m for _, m in ALL if m["kind"] == "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_only_known_custom_resources() -> None:
    """A custom kind without a check here would slip through unvalidated."""
    unknown = {
        (m["apiVersion"], m["kind"])
        for _, m in ALL
        if "/" in m["apiVersion"]
        and (m["apiVersion"], m["kind"]) not in CUSTOM_KINDS
        and not _bundled(m["apiVersion"], m["kind"])
    }
    assert not unknown


def _bundled(api_version: str, kind: str) -> bool:
    try:
        kubernetes_validate.validate(
            {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}},
            KUBERNETES_VERSIONS[-1],
        )
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        return True
    return True


SCALED_OBJECTS = [(w, m) for w, m in ALL if m["kind"] == "ScaledObject"]


@pytest.mark.parametrize("item", SCALED_OBJECTS, ids=_id)
def test_scaled_objects_match_keda_schema(item: tuple[str, Manifest]) -> None:
    _, so = item
    jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
    spec = so["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    for trigger in spec["triggers"]:
        if trigger["type"] != "nats-jetstream":
            continue
        keys = set(trigger["metadata"])
        assert NATS_JETSTREAM_REQUIRED <= keys, NATS_JETSTREAM_REQUIRED - keys
        assert keys <= NATS_JETSTREAM_ALLOWED, keys - NATS_JETSTREAM_ALLOWED
        assert "account" in keys or "accountID" in keys
        assert int(trigger["metadata"]["lagThreshold"]) > 0
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        # KEDA passes `behavior` through to the HPA it creates: check it as one.
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "check"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": 2,
                "behavior": behavior,
            },
        }
        kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)


def test_keda_schema_rejects_a_numeric_threshold() -> None:
    _, so = SCALED_OBJECTS[0]
    bad = copy.deepcopy(so)
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 100
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_scalers_target_existing_workloads_and_never_twice(kustomization: Path) -> None:
    manifests = render(kustomization)
    names = {m["metadata"]["name"] for m in workloads(manifests)}
    targets = [so["spec"]["scaleTargetRef"]["name"] for so in by_kind(manifests, "ScaledObject")]
    targets += [
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in by_kind(manifests, "HorizontalPodAutoscaler")
    ]
    assert set(targets) <= names
    # KEDA creates an HPA of its own; a second autoscaler on the same Deployment would fight it.
    assert len(targets) == len(set(targets))


def test_secret_templates_are_not_installed_by_any_kustomization() -> None:
    for kustomization in KUSTOMIZATIONS:
        assert not by_kind(render(kustomization), "Secret"), "placeholder credentials must not be applied"


def test_otel_collector_config_wires_otlp_to_the_trace_backend() -> None:
    config = yaml.safe_load((KUSTOMIZATIONS[0] / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    for section in ("receivers", "processors", "exporters"):
        for name in pipeline[section]:
            assert name in config[section], f"{section} {name} is used but not defined"
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert set(config["service"]["extensions"]) <= set(config["extensions"])


def test_yaml_files_parse() -> None:
    for path in sorted(KUSTOMIZATIONS[0].parent.parent.rglob("*.yaml")):
        assert load_yaml_file(path) is not None, path
