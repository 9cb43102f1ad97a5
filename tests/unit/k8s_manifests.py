"""Offline access to the Kubernetes manifests in deploy/k8s, for the test_k8s_* files.

Kustomizations are rendered by `kubectl kustomize` (kustomize is built into kubectl; the
machine image ships the `kubectl` Debian package), so the tests see exactly what
`kubectl apply -k` would send; without kubectl, by the small renderer in k8s_kustomize.py,
which test_k8s_render keeps equal to kubectl's output. Nothing here talks to a cluster.
"""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUSTOMIZATIONS = [BASE, *OVERLAYS]
SECRET_TEMPLATES = K8S / "secrets"
DOCKERFILE = ROOT / "Dockerfile"

Manifest = dict[str, Any]


def kubectl_available() -> bool:
    return shutil.which("kubectl") is not None


def kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl is needed to render the kustomizations (Debian package `kubectl`)")
    return found


@functools.cache
def render_text(kustomization: Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize failed for {kustomization}:\n{result.stderr}")
    return result.stdout


def render(kustomization: Path) -> list[Manifest]:
    """kubectl's render; where kubectl is missing, the subset in tests/unit/k8s_kustomize.py."""
    if not kubectl_available():
        from tests.unit.k8s_kustomize import finish

        return finish(kustomization)
    return [doc for doc in yaml.safe_load_all(render_text(kustomization)) if doc]


def load_yaml_file(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def secret_templates() -> list[Manifest]:
    return [doc for path in sorted(SECRET_TEMPLATES.glob("*.yaml")) for doc in load_yaml_file(path)]


def secret_value(template: Manifest, key: str) -> str:
    """A key's value in a Secret template, from stringData or (base64) data."""
    if key in template.get("stringData", {}):
        return str(template["stringData"][key])
    return base64.b64decode(template["data"][key]).decode()


def secret_files(workload: Manifest, container: Manifest) -> dict[str, tuple[str, str]]:
    """Path in the container -> (Secret, key) of each file its mounted Secret volumes hold: the
    volume's `items`, or every key of the Secret's template when it projects them all."""
    volumes = {
        v["name"]: v["secret"]
        for v in workload["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in v
    }
    templates = {t["metadata"]["name"]: t for t in secret_templates()}
    files: dict[str, tuple[str, str]] = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"])
        if secret is None:
            continue
        assert "subPath" not in mount, "a subPath mount of a Secret never sees its rotation"
        template = templates.get(secret["secretName"], {})
        keys = [*template.get("stringData", {}), *template.get("data", {})]
        items = secret.get("items") or [{"key": key, "path": key} for key in keys]
        for item in items:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def service_link_env(manifests: list[Manifest], workload: Manifest) -> dict[str, str]:
    """The variables the kubelet adds to every container of the workload's pods for each Service
    of its namespace that has a cluster IP (kubelet's envvars.FromServices), unless the pod sets
    `enableServiceLinks: false`: named after the Service, upper-cased, dashes to underscores, so
    the Service `relais-smtp` gives RELAIS_SMTP_SERVICE_HOST, RELAIS_SMTP_PORT, ... Cluster IPs
    are assigned at creation; an example address stands for them."""
    if workload["spec"]["template"]["spec"].get("enableServiceLinks", True) is False:
        return {}
    namespace = workload["metadata"].get("namespace")
    env: dict[str, str] = {}
    for number, service in enumerate(by_kind(manifests, "Service")):
        if service["metadata"].get("namespace") != namespace or service["spec"].get("clusterIP") == "None":
            continue
        name = service["metadata"]["name"].upper().replace("-", "_")
        address = f"10.96.0.{10 + number}"
        ports = service["spec"]["ports"]
        env[f"{name}_SERVICE_HOST"] = address
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{name}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{address}:{ports[0]['port']}"
        for port in ports:
            protocol = port.get("protocol", "TCP")
            if port.get("name"):
                env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            link = f"{name}_PORT_{port['port']}_{protocol.upper()}"
            env[link] = f"{protocol.lower()}://{address}:{port['port']}"
            env[f"{link}_PROTO"] = protocol.lower()
            env[f"{link}_PORT"] = str(port["port"])
            env[f"{link}_ADDR"] = address
    return env


def by_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in manifests if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def relais_workloads(manifests: list[Manifest]) -> list[Manifest]:
    """The Deployments running the relais image (label app.kubernetes.io/name=relais)."""
    return [
        m
        for m in workloads(manifests)
        if m["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "relais"
    ]


def autoscaled_minimums(manifests: list[Manifest]) -> dict[str, int]:
    """Deployment name -> the fewest replicas its HPA or KEDA ScaledObject keeps."""
    minimums = {
        hpa["spec"]["scaleTargetRef"]["name"]: hpa["spec"].get("minReplicas", 1)
        for hpa in by_kind(manifests, "HorizontalPodAutoscaler")
    }
    for scaled in by_kind(manifests, "ScaledObject"):
        minimums[scaled["spec"]["scaleTargetRef"]["name"]] = scaled["spec"].get("minReplicaCount", 0)
    return minimums


def fewest_replicas(manifests: list[Manifest], workload: Manifest) -> int:
    """What a workload runs at least: its autoscaler's minimum, or its own `replicas`."""
    name = workload["metadata"]["name"]
    return autoscaled_minimums(manifests).get(name, workload["spec"].get("replicas", 1))


def containers(workload: Manifest) -> list[Manifest]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def plain_env(container: Manifest) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def config_map_data(manifests: list[Manifest], prefix: str) -> dict[str, str]:
    """The data of the ConfigMap generated as `prefix` (kustomize appends a content hash)."""
    maps = [m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].startswith(prefix + "-")]
    assert len(maps) == 1, f"expected one generated ConfigMap {prefix}-<hash>, found {len(maps)}"
    return maps[0]["data"]


def relais_toml(manifests: list[Manifest]) -> dict[str, Any]:
    return tomllib.loads(config_map_data(manifests, "relais-config")["relais.toml"])


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def container_port(container: Manifest, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    for port in container.get("ports", []):
        if port.get("name") == name_or_number:
            return int(port["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {name_or_number!r}")


# The keys of the relais-nats Secret that the NATS servers read (nats-passwords.sh).
NATS_PASSWORD_KEYS = tuple(
    f"{user}-password" for user in ("ingress", "router", "delivery", "bounce", "admin", "sys", "route")
)


def lay_out_nats_pod(
    manifests: list[Manifest], root: Path, passwords: dict[str, str], *, route_hosts: str | None = None
) -> Path:
    """A NATS pod's files, laid out under `root` as its containers see them under /etc: the
    nats-config ConfigMap, the relais-nats Secret (`passwords`, key -> value), and what the
    `passwords` init container writes from them, by running its command with its environment
    (its /etc paths under `root`; `route_hosts` in place of ROUTE_HOSTS, for servers on
    loopback). Returns the path of nats.conf."""
    pod = one(manifests, "StatefulSet", "nats")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    def here(path: str) -> str:
        assert path.startswith("/etc/"), f"{path}: the NATS pod's files are laid out under /etc only"
        return str(root) + path

    for mount in init["volumeMounts"]:
        directory = Path(here(mount["mountPath"]))
        directory.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            prefix = volume["configMap"]["name"].rsplit("-", 1)[0]  # without kustomize's hash
            for name, text in config_map_data(manifests, prefix).items():
                (directory / name).write_text(text)
        elif "secret" in volume:
            for item in volume["secret"]["items"]:
                if item["key"] in passwords:
                    (directory / item["path"]).write_text(passwords[item["key"]])
    env = plain_env(init)
    if route_hosts is not None:
        env["ROUTE_HOSTS"] = route_hosts
    env = {name: here(value) if value.startswith("/etc/") else value for name, value in env.items()}
    command = [here(arg) if arg.startswith("/etc/") else arg for arg in init["command"]]
    ran = subprocess.run(
        command + init.get("args", []),
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, f"the passwords init container failed: {ran.stderr}"
    (server,) = pod["containers"]
    config = next(m for m in server["volumeMounts"] if m["name"] == "config")
    return Path(here(config["mountPath"])) / "nats.conf"
