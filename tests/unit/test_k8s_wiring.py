"""The manifests agree with the application: config keys, stream and consumer names, ports,
NATS users, pools and Secrets. Names come from their owners (services.core.config,
services.core.topology, services.cli) at test time, so a rename there fails here.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.cli import SERVICES
from services.core import topology
from services.core.config import Config, env_variable_names, load_config
from services.core.embedded import nats_server_binary
from services.core.runtime import CONSUMER_STOP_SECONDS
from services.delivery import draining
from tests.unit.k8s_manifests import (
    BASE,
    KUSTOMIZATIONS,
    NATS_PASSWORD_KEYS,
    Manifest,
    by_kind,
    config_map_data,
    container_port,
    containers,
    env_of,
    fewest_replicas,
    lay_out_nats_pod,
    one,
    plain_env,
    port_of,
    relais_workloads,
    render,
    secret_files,
    secret_templates,
    secret_value,
    service_link_env,
    walk,
    workloads,
)

PARAMS = pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
POD_IP = "10.20.30.40"


def _main_container(workload: Manifest) -> Manifest:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _namespace(manifests: list[Manifest]) -> str:
    (namespace,) = {m["metadata"].get("namespace") for m in manifests if m["kind"] != "Namespace"}
    return namespace


def effective_config(manifests: list[Manifest], workload: Manifest, tmp_path: Path) -> Config:
    """The Config this workload's process would load: the ConfigMap's file plus its env, the
    variables the kubelet adds for the namespace's Services included (the container's own win)."""
    path = tmp_path / f"{workload['metadata']['name']}.toml"
    path.write_text(config_map_data(manifests, "relais-config")["relais.toml"])
    environment = {**service_link_env(manifests, workload), **kubelet_env(_main_container(workload))}
    env = {name: value for name, value in environment.items() if name.startswith("RELAIS_")}
    env["RELAIS_CONFIG"] = str(path)
    env.update(_secret_files_here(workload, env, tmp_path))
    return load_config(None, env)


def _secret_files_here(workload: Manifest, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Each `_FILE` variable naming a file on a mounted Secret, pointed at a copy of that file
    written from the Secret's template: what the kubelet would put at the path in the pod."""
    files = secret_files(workload, _main_container(workload))
    templates = {t["metadata"]["name"]: t for t in secret_templates()}
    here: dict[str, str] = {}
    for name, value in env.items():
        if name in FILE_VARIANTS and value in files:
            secret, key = files[value]
            copy_path = tmp_path / workload["metadata"]["name"] / value.lstrip("/")
            copy_path.parent.mkdir(parents=True, exist_ok=True)
            copy_path.write_text(secret_value(templates[secret], key))
            here[name] = str(copy_path)
    return here


# The variables that read a setting from a file (RELAIS_NATS__PASSWORD_FILE), not the settings
# whose own name ends in _FILE (RELAIS_DELIVERY__SHAPING_FILE).
_KNOWN_ENV = set(env_variable_names())
FILE_VARIANTS = {n for n in _KNOWN_ENV if n.endswith("_FILE") and n.removesuffix("_FILE") in _KNOWN_ENV}
# The settings that are secrets, which no manifest may pass as an environment variable.
SECRET_SETTINGS = {"RELAIS_NATS__PASSWORD", "RELAIS_NATS__TOKEN", "RELAIS_BOUNCE__VERP_SECRETS"}

# What the kubelet would give a pod for each `valueFrom`: secrets as an opaque string, fields as
# an example of their kind.
_FIELD_EXAMPLES = {"status.podIP": POD_IP, "status.hostIP": POD_IP}


def kubelet_env(container: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it: in order, with `$(NAME)` replaced
    by a variable defined earlier in the list (a later or unknown one stays as written)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), entry["value"])
        elif "fieldRef" in entry.get("valueFrom", {}):
            value = _FIELD_EXAMPLES.get(entry["valueFrom"]["fieldRef"]["fieldPath"], "a-field-value")
        else:
            value = "a-secret-value-from-a-kubernetes-secret"
        env[entry["name"]] = value
    return env


# ---------------------------------------------------------------------------------------------
# Config and environment


def test_every_relais_env_var_in_any_manifest_is_understood_by_the_loader() -> None:
    known = set(env_variable_names())
    used: set[str] = set()
    for kustomization in KUSTOMIZATIONS:
        for workload in workloads(render(kustomization)):
            for container in containers(workload):
                used |= {name for name in env_of(container) if name.startswith("RELAIS_")}
    assert used, "the manifests set no RELAIS_* variable at all"
    assert used <= known, f"not config settings: {sorted(used - known)}"


@PARAMS
def test_each_service_loads_its_effective_config(kustomization: Path, tmp_path: Path) -> None:
    manifests = render(kustomization)
    for workload in relais_workloads(manifests):
        config = effective_config(manifests, workload, tmp_path)
        assert config.nats.user, "every service authenticates to NATS"
        assert config.telemetry.traces == "otlp"


@PARAMS
def test_service_link_variables_never_reach_the_config_loader(kustomization: Path) -> None:
    """The kubelet gives each pod a variable per Service of its namespace, named after it: the
    Service relais-smtp gives RELAIS_SMTP_SERVICE_HOST and more, which the loader refuses as
    unknown settings (a typo must never fall back to a default), so no service would start."""
    manifests = render(kustomization)
    for workload in relais_workloads(manifests):
        linked = copy.deepcopy(workload)
        linked["spec"]["template"]["spec"].pop("enableServiceLinks", None)
        assert any(name.startswith("RELAIS_") for name in service_link_env(manifests, linked))
        reaching = [name for name in service_link_env(manifests, workload) if name.startswith("RELAIS_")]
        assert not reaching, f"{workload['metadata']['name']}: {sorted(reaching)}"


@PARAMS
def test_config_file_comes_from_the_configmap_at_the_path_relais_reads(kustomization: Path) -> None:
    manifests = render(kustomization)
    for workload in relais_workloads(manifests):
        container = _main_container(workload)
        config_path = plain_env(container)["RELAIS_CONFIG"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert config_path in mounts, workload["metadata"]["name"]
        volume = next(
            v
            for v in workload["spec"]["template"]["spec"]["volumes"]
            if v["name"] == mounts[config_path]["name"]
        )
        assert volume["configMap"]["name"].startswith("relais-config-")


@PARAMS
def test_services_run_the_command_their_label_names(kustomization: Path) -> None:
    components = set()
    for workload in relais_workloads(render(kustomization)):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "topology":  # applies the topology for the services, as `admin`
            assert _main_container(workload)["args"] == ["topology", "apply", "--serve"]
            continue
        assert _main_container(workload)["args"] == [component]
        assert component in SERVICES
        components.add(component)
    assert components == set(SERVICES), "every service is deployed"


# ---------------------------------------------------------------------------------------------
# Health, metrics, tracing


@PARAMS
def test_probes_and_scrape_annotation_use_the_telemetry_listener(kustomization: Path, tmp_path: Path) -> None:
    manifests = render(kustomization)
    for workload in relais_workloads(manifests):
        config = effective_config(manifests, workload, tmp_path)
        port = port_of(config.telemetry.http_listen)
        container = _main_container(workload)
        assert container_port(container, container["livenessProbe"]["httpGet"]["port"]) == port
        assert container_port(container, container["readinessProbe"]["httpGet"]["port"]) == port
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations["prometheus.io/path"] == "/metrics"


@PARAMS
def test_traces_go_to_the_collector_service_over_otlp_http(kustomization: Path) -> None:
    manifests = render(kustomization)
    services = {s["metadata"]["name"]: s for s in by_kind(manifests, "Service")}
    for workload in relais_workloads(manifests):
        env = plain_env(_main_container(workload))
        match = re.fullmatch(
            r"http://([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        )
        assert match, env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        service = services[match.group(1)]
        assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}
        # services.core.telemetry exports http/protobuf unless told otherwise: port 4318.
        assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"
        assert int(match.group(2)) == 4318
        assert (
            env["OTEL_SERVICE_NAME"]
            == f"relais-{workload['metadata']['labels']['app.kubernetes.io/component']}"
        )


# ---------------------------------------------------------------------------------------------
# NATS


def _nats_conf() -> str:
    return (BASE / "nats.conf").read_text()


def _nats_accounts() -> dict[str, set[str]]:
    """account -> users, read from the accounts block of nats.conf."""
    block = _nats_conf().split("accounts {", 1)[1]
    accounts: dict[str, set[str]] = {}
    for name, body in re.findall(r"^\s{2}([A-Z_]+) \{(.*?)^\s{2}\}", block, re.S | re.M):
        accounts[name] = set(re.findall(r"\{user: ([a-z0-9_-]+),", body))
    return accounts


def _kube_env(container: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it ($(VAR) expanded; secrets dummy)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"]
            )
        else:
            env[entry["name"]] = f"dummy-{entry['name'].lower()}"
    return env


def test_nats_server_accepts_its_config_with_the_statefulset_environment(tmp_path: Path) -> None:
    """nats-server -t resolves every $VARIABLE in nats.conf, from the pod's env or from the
    passwords its init container wrote from the Secret (the template's values), or fails."""
    manifests = render(BASE)
    env = _kube_env(_main_container(one(manifests, "StatefulSet", "nats")))
    (template,) = [t for t in secret_templates() if t["metadata"]["name"] == "relais-nats"]
    passwords = {key: secret_value(template, key) for key in NATS_PASSWORD_KEYS}
    conf = lay_out_nats_pod(manifests, tmp_path, passwords)
    conf.write_text(conf.read_text().replace("/data/", f"{tmp_path}/"))
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "$(" not in "".join(env.values()), "an env reference the kubelet cannot expand"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("bounce-password", ""),
        ("bounce-password", "first line\nsecond line"),
        ("route-password", "not/for@a:url"),
    ],
)
def test_a_nats_password_the_server_cannot_take_stops_the_pod_naming_its_key(
    tmp_path: Path, key: str, value: str
) -> None:
    """Stopped at the init container, with the key in its message and never the value."""
    passwords = {k: f"{k}-value" for k in NATS_PASSWORD_KEYS}
    passwords[key] = value
    with pytest.raises(AssertionError) as stopped:
        lay_out_nats_pod(render(BASE), tmp_path, passwords)
    assert key in str(stopped.value)
    assert not value or value not in str(stopped.value)
    assert not list(tmp_path.glob("etc/nats-passwords/passwords.conf"))


@PARAMS
def test_nats_reads_its_passwords_from_a_read_only_file_in_memory(kustomization: Path) -> None:
    """The init container alone mounts the relais-nats Secret; what it writes from it (the
    file nats.conf includes) is on a memory-backed volume, which the server mounts read-only."""
    manifests = render(kustomization)
    pod = one(manifests, "StatefulSet", "nats")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {s for s, _ in secret_files(one(manifests, "StatefulSet", "nats"), init).values()} == {
        "relais-nats"
    }
    # (`data`, the PVC, is no pod volume but a claim template)
    assert not [m for m in server["volumeMounts"] if "secret" in volumes.get(m["name"], {})]
    conf = config_map_data(manifests, "nats-config")["nats.conf"]
    (included,) = re.findall(r'^include "([^"]+)"', conf, re.M)
    config_dir = next(m["mountPath"] for m in server["volumeMounts"] if m["name"] == "config")
    path = os.path.normpath(os.path.join(config_dir, included))
    assert path == plain_env(init)["PASSWORDS_FILE"]
    (mount,) = [m for m in server["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert not [e for e in server.get("env", []) if e["name"].endswith("PASSWORD") or "ROUTE" in e["name"]]


@PARAMS
def test_nats_cluster_matches_the_config(kustomization: Path, tmp_path: Path) -> None:
    manifests = render(kustomization)
    sts = one(manifests, "StatefulSet", "nats")
    replicas = sts["spec"]["replicas"]
    headless = one(manifests, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    for workload in relais_workloads(manifests):
        config = effective_config(manifests, workload, tmp_path)
        assert config.nats.replicas == replicas == 3
        urls = [u.strip() for u in config.nats.url.split(",")]
        assert urls == [f"nats://nats-{i}.{headless['metadata']['name']}:4222" for i in range(replicas)]
    # The routes' hosts, which the passwords init container writes into nats.conf's ROUTES.
    (init,) = sts["spec"]["template"]["spec"]["initContainers"]
    hosts = plain_env(init)["ROUTE_HOSTS"].split()
    assert hosts == [f"nats-{i}.{headless['metadata']['name']}:6222" for i in range(replicas)]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    mount = next(m for m in _main_container(sts)["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert "store_dir: " + mount["mountPath"] in _nats_conf(), "JetStream must store on the PVC"
    assert "http_port: 8222" in _nats_conf()
    # A restarted server counts as started only once its stream replicas have caught up, so a
    # rolling update never takes the next server down while this one is still behind.
    assert _main_container(sts)["startupProbe"]["httpGet"]["path"] == "/healthz"


@PARAMS
def test_each_service_has_its_own_nats_user_in_the_jetstream_account(
    kustomization: Path, tmp_path: Path
) -> None:
    manifests = render(kustomization)
    accounts = _nats_accounts()
    assert "jetstream: enabled" in _nats_conf().split("RELAIS {", 1)[1].split("}", 1)[0]
    users = set()
    for workload in relais_workloads(manifests):
        config = effective_config(manifests, workload, tmp_path)
        assert config.nats.user in accounts["RELAIS"]
        container = _main_container(workload)
        password_file = plain_env(container)["RELAIS_NATS__PASSWORD_FILE"]
        assert secret_files(workload, container)[password_file] == (
            "relais-nats",
            f"{config.nats.user}-password",
        )
        # Its own password only: the other services' keys of relais-nats are not in the pod.
        assert {k for s, k in secret_files(workload, container).values() if s == "relais-nats"} == {
            f"{config.nats.user}-password"
        }
        users.add(config.nats.user)
    # The services' users, and `admin` for the relais-topology pod: the only one that may
    # change streams, and the only pod with its password.
    assert users == {*SERVICES, "admin"}


# ---------------------------------------------------------------------------------------------
# Scaling on consumer lag: names from services.core.topology


def _nats_triggers(so: Manifest) -> list[dict[str, str]]:
    return [t["metadata"] for t in so["spec"]["triggers"] if t["type"] == "nats-jetstream"]


def _binding_key(binding: topology.ConsumerBinding) -> tuple[str, str]:
    return binding.stream, binding.durable


def _delivery_pool(workload: Manifest) -> str:
    return plain_env(_main_container(workload))["RELAIS_DELIVERY__POOLS"]


@PARAMS
def test_keda_watches_the_consumers_each_service_pulls_from(kustomization: Path, tmp_path: Path) -> None:
    manifests = render(kustomization)
    namespace = _namespace(manifests)
    # The headless Service: KEDA queries it, then each server by its pod name beneath it
    # (<pod>.nats-headless...), which only a headless Service resolves.
    monitor = one(manifests, "Service", "nats-headless")
    assert monitor["spec"]["clusterIP"] == "None"
    assert 8222 in {p["port"] for p in monitor["spec"]["ports"]}
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in by_kind(manifests, "ScaledObject")}
    expected: dict[str, set[tuple[str, str]]] = {}
    for workload in relais_workloads(manifests):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "router":
            bindings = [topology.submit_binding(), topology.router_binding(), topology.verdict_binding()]
        elif component == "bounce":
            bindings = [
                topology.bounce_binding(),
                topology.bounce_flush_binding(),
                topology.inbound_binding(),
            ]
        elif component == "delivery":
            config = effective_config(manifests, workload, tmp_path)
            bindings = [topology.delivery_binding(pool) for pool in config.served_pools()]
        else:
            continue
        expected[workload["metadata"]["name"]] = {_binding_key(b) for b in bindings}
    assert expected
    for name, keys in expected.items():
        triggers = _nats_triggers(scaled[name])
        assert {(t["stream"], t["consumer"]) for t in triggers} == keys, name
        for t in triggers:
            assert t["natsServerMonitoringEndpoint"] == f"nats-headless.{namespace}.svc.cluster.local:8222"
            assert t["account"] in _nats_accounts()


@PARAMS
def test_ingress_scales_on_cpu(kustomization: Path) -> None:
    manifests = render(kustomization)
    hpa = one(manifests, "HorizontalPodAutoscaler", "relais-ingress")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "relais-ingress"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2


# ---------------------------------------------------------------------------------------------
# Delivery: one Deployment per pool on the hosts that carry the pool's IPs


@PARAMS
def test_every_pool_has_exactly_one_delivery_deployment(kustomization: Path, tmp_path: Path) -> None:
    manifests = render(kustomization)
    deliveries = [w for w in relais_workloads(manifests) if _main_container(w)["args"] == ["delivery"]]
    pools = [_delivery_pool(w) for w in deliveries]
    config = effective_config(manifests, deliveries[0], tmp_path)
    assert sorted(pools) == sorted(config.pools), "a pool without workers never delivers"
    ports = []
    for workload in deliveries:
        pool = _delivery_pool(workload)
        spec = workload["spec"]["template"]["spec"]
        assert workload["metadata"]["name"] == f"relais-delivery-{pool}"
        assert spec["hostNetwork"] is True
        assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert spec["nodeSelector"] == {f"relais.dev/pool-{pool}": "true"}
        (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
        assert workload["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
        listen = effective_config(manifests, workload, tmp_path).telemetry.http_listen
        ports.append(port_of(listen))
        # The node also holds the pool's sending IPs: /metrics must not answer the internet there.
        assert listen.rsplit(":", 1)[0] == POD_IP, "delivery's HTTP must listen on the node's own address"
        # Long enough for an attempt in flight to finish before the kill (the manifest says why):
        # the figure `relais up` waits for delivery too.
        assert spec["terminationGracePeriodSeconds"] >= draining.stop_seconds(config)
    assert len(set(ports)) == len(ports), "pools sharing a node need distinct host ports"
    assert 9100 not in ports, "9100 on the host belongs to node-exporter"


@PARAMS
def test_router_and_bounce_grace_periods_hold_their_stop(kustomization: Path) -> None:
    manifests = render(kustomization)
    for name in ("relais-router", "relais-bounce"):
        spec = one(manifests, "Deployment", name)["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] >= CONSUMER_STOP_SECONDS, name


def _normalised_delivery(workload: Manifest, scaled: Manifest, pdb: Manifest) -> Any:
    pool = _delivery_pool(workload)
    port = str(port_of(plain_env(_main_container(workload))["RELAIS_TELEMETRY__HTTP_LISTEN"]))
    docs = copy.deepcopy([workload, scaled, pdb])
    docs[1]["spec"].pop("maxReplicaCount")
    text = repr(docs).replace(port, "PORT").replace(pool, "POOL")
    return text


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS[1:], ids=lambda p: p.name)
def test_delivery_copies_per_pool_differ_only_in_pool_and_port(kustomization: Path) -> None:
    manifests = render(kustomization)
    forms = set()
    for workload in relais_workloads(manifests):
        if _main_container(workload)["args"] != ["delivery"]:
            continue
        name = workload["metadata"]["name"]
        forms.add(
            _normalised_delivery(
                workload, one(manifests, "ScaledObject", name), one(manifests, "PodDisruptionBudget", name)
            )
        )
    assert len(forms) == 1, "a per-pool copy drifted from base/delivery-default.yaml"


# ---------------------------------------------------------------------------------------------
# Exposure and network policy

PUBLIC_PORT_MODES = {587: "submission", 465: "implicit-tls", 25: "inbound"}


@PARAMS
def test_only_the_smtp_service_is_reachable_from_outside(kustomization: Path, tmp_path: Path) -> None:
    manifests = render(kustomization)
    external = [
        s for s in by_kind(manifests, "Service") if s["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    assert [s["metadata"]["name"] for s in external] == ["relais-smtp"]
    (smtp,) = external
    assert smtp["spec"]["externalTrafficPolicy"] == "Local"
    assert sorted(p["port"] for p in smtp["spec"]["ports"]) == [25, 465, 587]
    ingress = one(manifests, "Deployment", "relais-ingress")
    container = _main_container(ingress)
    targets = {container_port(container, p["targetPort"]) for p in smtp["spec"]["ports"]}
    assert len(targets) == 3
    # Each public port reaches the listener of the mode that port means in SMTP.
    listeners = effective_config(manifests, ingress, tmp_path).ingress.listeners
    mode_by_port = {port_of(listener.listen): listener.mode for listener in listeners}
    public = {p["port"]: container_port(container, p["targetPort"]) for p in smtp["spec"]["ports"]}
    assert {port: mode_by_port.get(target) for port, target in public.items()} == PUBLIC_PORT_MODES
    # externalTrafficPolicy Local already keeps client addresses: a PROXY header would be refused.
    assert not any(listener.proxy_protocol for listener in listeners)
    policy = one(manifests, "NetworkPolicy", "ingress-smtp-from-anywhere")
    (rule,) = policy["spec"]["ingress"]
    assert "from" not in rule
    assert {p["port"] for p in rule["ports"]} == targets
    assert policy["spec"]["podSelector"]["matchLabels"] == ingress["spec"]["selector"]["matchLabels"]


@PARAMS
def test_namespace_denies_by_default(kustomization: Path) -> None:
    manifests = render(kustomization)
    deny = one(manifests, "NetworkPolicy", "default-deny")
    assert deny["spec"]["podSelector"] == {}
    assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    # Nothing but the SMTP policy admits traffic from any address.
    for policy in by_kind(manifests, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            if policy["metadata"]["name"] != "ingress-smtp-from-anywhere":
                assert rule.get("from"), policy["metadata"]["name"]


# ---------------------------------------------------------------------------------------------
# Hardening and availability


@PARAMS
def test_workloads_are_hardened_and_sized(kustomization: Path) -> None:
    for workload in workloads(render(kustomization)):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(workload):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {kind}"
            assert ":" in container["image"] and not container["image"].endswith(":latest"), name


@PARAMS
def test_replicated_workloads_have_a_disruption_budget_and_spread(kustomization: Path) -> None:
    manifests = render(kustomization)
    budgets = by_kind(manifests, "PodDisruptionBudget")
    for workload in workloads(manifests):
        if fewest_replicas(manifests, workload) < 2:
            continue
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("topologySpreadConstraints") or pod.get("affinity", {}).get("podAntiAffinity"), (
            workload["metadata"]["name"]
        )


@PARAMS
def test_every_secret_reference_is_provided_by_a_template(kustomization: Path) -> None:
    templates = {s["metadata"]["name"]: s for s in secret_templates()}
    keys = {name: set(s.get("stringData", {})) | set(s.get("data", {})) for name, s in templates.items()}
    referenced = 0
    for workload in workloads(render(kustomization)):
        for node in walk(workload):
            if isinstance(node, dict) and "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                assert ref["key"] in keys.get(ref["name"], set()), ref
                referenced += 1
            if isinstance(node, dict) and "secretName" in node:
                assert node["secretName"] in templates, node
                for item in node.get("items", []):
                    assert item["key"] in keys[node["secretName"]], (node["secretName"], item)
                referenced += 1
    assert referenced
    for secret in templates.values():
        assert secret["metadata"]["namespace"] == _namespace(render(kustomization))


@PARAMS
def test_no_secret_reaches_a_container_through_its_environment(kustomization: Path) -> None:
    """Secrets are files on a mounted Secret: the services read theirs through
    RELAIS_<SECTION>__<KEY>_FILE, the NATS servers theirs through nats.conf's include. An
    environment variable is inherited by every child process, readable in /proc/<pid>/environ,
    and copied into crash reports, debug dumps and the tools that describe a pod."""
    manifests = render(kustomization)
    assert one(manifests, "StatefulSet", "nats") in workloads(manifests)
    for workload in workloads(manifests):
        name = workload["metadata"]["name"]
        for container in containers(workload):
            assert not [e for e in container.get("envFrom", []) if "secretRef" in e], name
            for entry in container.get("env", []):
                assert "secretKeyRef" not in entry.get("valueFrom", {}), (name, entry["name"])
                assert entry["name"] not in SECRET_SETTINGS, (name, entry["name"])


@PARAMS
def test_every_file_variable_names_a_file_on_a_mounted_secret(kustomization: Path) -> None:
    used = 0
    for workload in relais_workloads(render(kustomization)):
        for container in containers(workload):
            files = secret_files(workload, container)
            for name, value in plain_env(container).items():
                if name in FILE_VARIANTS:
                    assert value in files, f"{workload['metadata']['name']}: {name}={value} is on no Secret"
                    used += 1
    assert used, "no secret is read from a file"


@PARAMS
def test_secret_files_are_read_only_and_readable_by_the_service_alone(kustomization: Path) -> None:
    """Mounted as root's files with the pod's group (fsGroup) readable: 0440. Without fsGroup
    the service (uid 10001; the NATS servers' 1000) could not read them; with an `other` bit,
    any uid could."""
    secret_volumes = 0
    manifests = render(kustomization)
    for workload in [*relais_workloads(manifests), one(manifests, "StatefulSet", "nats")]:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        context = pod["securityContext"]
        secrets = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
        for volume, secret in secrets.items():
            # A file's mode is its item's, else the volume's defaultMode (the API's default 0644).
            default = secret.get("defaultMode", 0o644)
            items = secret.get("items")
            modes = [i.get("mode", default) for i in items] if items else [default]
            for mode in modes:
                assert mode & 0o007 == 0, f"{name}: {volume} is readable by any uid ({mode:o})"
                assert mode & 0o040, f"{name}: {volume} is not readable by the pod's group ({mode:o})"
            assert context["fsGroup"] == context["runAsGroup"], name
            secret_volumes += 1
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                if mount["name"] in secrets:
                    assert mount.get("readOnly") is True, f"{name}: {mount['name']}"
    assert secret_volumes


@PARAMS
def test_no_secret_material_in_config_maps(kustomization: Path) -> None:
    for config_map in by_kind(render(kustomization), "ConfigMap"):
        for text in config_map["data"].values():
            assert "PRIVATE KEY" not in text
            assert not re.search(r"^\s*(password|token)\s*=", text, re.M), config_map["metadata"]["name"]


@PARAMS
def test_dkim_keys_are_read_from_the_mounted_secret(kustomization: Path, tmp_path: Path) -> None:
    manifests = render(kustomization)
    router = one(manifests, "Deployment", "relais-router")
    config = effective_config(manifests, router, tmp_path)
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    mounts = {
        m["mountPath"]: volumes[m["name"]]
        for m in _main_container(router)["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    templates = {s["metadata"]["name"]: s for s in secret_templates()}
    for domain, keys in config.dkim.items():
        for key in keys:
            directory, _, filename = key.key_file.rpartition("/")
            assert directory in mounts, f"dkim.{domain}: {key.key_file} is not on a mounted Secret"
            secret = templates[mounts[directory]["secret"]["secretName"]]
            assert filename in secret["stringData"], f"the Secret template has no {filename}"


def _bytes(quantity: str) -> int:
    # Binary either way: nats-server may read "18G" as GiB, and the check must hold if it does.
    units = {
        "K": 2**10,
        "M": 2**20,
        "G": 2**30,
        "T": 2**40,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", quantity)
    assert match, quantity
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


@PARAMS
def test_jetstream_store_limit_fits_the_volume(kustomization: Path) -> None:
    """A full JetStream refuses writes (the ingress answers 451); a full disk would corrupt it."""
    manifests = render(kustomization)
    conf = config_map_data(manifests, "nats-config")["nats.conf"]
    (limit,) = re.findall(r"max_file_store: (\w+)", conf)
    sts = one(manifests, "StatefulSet", "nats")
    volume = sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert _bytes(limit) <= 0.95 * _bytes(volume)


@PARAMS
def test_verp_secrets_reach_only_the_services_that_sign_and_verify(
    kustomization: Path, tmp_path: Path
) -> None:
    manifests = render(kustomization)
    verp: dict[str, set[bool]] = {}
    for workload in relais_workloads(manifests):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in ("ingress", "router"):
            container = _main_container(workload)
            assert not {"RELAIS_BOUNCE__VERP_SECRETS", "RELAIS_BOUNCE__VERP_SECRETS_FILE"} & set(
                env_of(container)
            )
            assert "relais-verp" not in {s for s, _ in secret_files(workload, container).values()}
        verp.setdefault(component, set()).add(effective_config(manifests, workload, tmp_path).bounce.verp)
    # Delivery signs return paths and bounce verifies them: on for both, or off for both.
    assert len(verp["delivery"] | verp["bounce"]) == 1


@PARAMS
def test_delivery_connects_only_to_public_addresses(kustomization: Path, tmp_path: Path) -> None:
    """In a cluster, an MX (or MTA-STS host) that any sender's domain can point at a pod, a
    Service or the metadata address must not be connected to (delivery.public_mx_only)."""
    manifests = render(kustomization)
    deliveries = [w for w in relais_workloads(manifests) if _main_container(w)["args"] == ["delivery"]]
    assert deliveries
    for workload in deliveries:
        config = effective_config(manifests, workload, tmp_path)
        assert config.delivery.public_mx_only, workload["metadata"]["name"]
