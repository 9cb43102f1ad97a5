"""The shipped NATS configuration, run for real: three nats-server processes on loopback.

deploy/k8s/base/nats.conf is used as rendered into its ConfigMap, with the StatefulSet's
environment and the passwords and routes its init container writes from the Secret (the routes'
pod DNS names swapped for loopback ports, since there is no cluster DNS here). It
proves what the manifests rely on: the routes authenticate and form a JetStream cluster, each
`admin` applies Relais' topology at 3 replicas and each service's user finds it (the services do
not declare it there, nats.declare_topology = false), anonymous clients are refused, the
system account cannot touch Relais' streams, and the monitoring endpoint shows consumer lag
under account RELAIS where KEDA's nats-jetstream scaler looks for it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from services.core import topology
from services.core.bus import connect
from services.core.config import Config, load_config, replace
from services.core.embedded import free_port, nats_server_binary, wait_for_port
from tests.unit.k8s_manifests import BASE, NATS_PASSWORD_KEYS, lay_out_nats_pod, one, plain_env, render
from tests.unit.test_k8s_wiring import _kube_env, _main_container

REPLICAS = 3


@dataclass
class Node:
    name: str
    client: int
    route: int
    monitor: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    def monitor_json(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}{path}", timeout=5) as response:
            return json.loads(response.read())


def _replace_once(text: str, old: str, new: str) -> str:
    # Exactly once: if nats.conf changes shape, this test must notice rather than run on defaults.
    assert text.count(old) == 1, f"nats.conf no longer contains {old!r} exactly once"
    return text.replace(old, new)


def _node_config(conf: str, node: Node, store: Path) -> str:
    conf = _replace_once(conf, "listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{node.client}")
    conf = _replace_once(conf, "listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{node.route}")
    conf = _replace_once(conf, "http_port: 8222", f"http: 127.0.0.1:{node.monitor}")
    conf = _replace_once(conf, "store_dir: /data/jetstream", f'store_dir: "{store / "jetstream"}"')
    # The shipped max_file_store stays: it is only reserved, and the streams' caps (the events
    # stream's 4 GiB) must fit it on every server of the cluster.
    return _replace_once(conf, '"/var/run/nats/nats.pid"', f'"{store / "nats.pid"}"')


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[Node], dict[str, str]]]:
    """The three servers, and their users' passwords as <USER>_PASSWORD."""
    manifests = render(BASE)
    sts = one(manifests, "StatefulSet", "nats")
    base_env = _kube_env(_main_container(sts))
    nodes = [Node(f"nats-{i}", free_port(), free_port(), free_port()) for i in range(REPLICAS)]
    passwords = {key: secrets.token_hex(32) for key in NATS_PASSWORD_KEYS}
    (init,) = sts["spec"]["template"]["spec"]["initContainers"]
    # The routes' hosts as the StatefulSet names them, each pointed at loopback instead.
    assert plain_env(init)["ROUTE_HOSTS"].split() == [f"nats-{j}.nats-headless:6222" for j in range(REPLICAS)]
    route_hosts = " ".join(f"127.0.0.1:{peer.route}" for peer in nodes)
    try:
        for node in nodes:
            store = tmp_path / node.name
            store.mkdir()
            path = lay_out_nats_pod(manifests, store, passwords, route_hosts=route_hosts)
            path.write_text(_node_config(path.read_text(), node, store))
            env = dict(base_env)
            env.update(SERVER_NAME=node.name, CLIENT_ADVERTISE=f"127.0.0.1:{node.client}")
            log = (store / "nats-server.log").open("wb")
            node.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(path)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            wait_for_port("127.0.0.1", node.client, timeout=15)
        _wait_for_meta_leader(nodes)
        yield nodes, {f"{key.split('-')[0].upper()}_PASSWORD": value for key, value in passwords.items()}
    finally:
        for node in nodes:
            if node.process is not None:
                node.process.terminate()
        for node in nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(timeout=5)


def _wait_for_meta_leader(nodes: list[Node], timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            metas = [n.monitor_json("/jsz").get("meta_cluster", {}) for n in nodes]
            if all(m.get("leader") and m.get("cluster_size") == REPLICAS for m in metas):
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError("the three servers did not form a JetStream cluster (see nats-server.log)")


async def test_shipped_nats_config_runs_relais_at_three_replicas(
    cluster: tuple[list[Node], dict[str, str]], tmp_path: Path
) -> None:
    nodes, env = cluster
    config = load_config(
        BASE / "relais.toml",
        {
            "RELAIS_NATS__URL": ",".join(n.url for n in nodes),
            "RELAIS_NATS__USER": "router",
            "RELAIS_NATS__PASSWORD": env["ROUTER_PASSWORD"],
        },
    )
    assert config.nats.replicas == REPLICAS
    await _applied_by_admin(config, env)
    bus = await connect(config.nats, "k8s-test")
    try:
        await topology.ensure_or_check_topology(bus.js, config)
        ack = await bus.js.publish(topology.route_subject(), b"probe")
        assert ack.stream == topology.ROUTE_STREAM
        info = await bus.js.stream_info(topology.ROUTE_STREAM)
        assert info.config.num_replicas == REPLICAS
        assert info.cluster is not None and len(info.cluster.replicas or []) == REPLICAS - 1
        assert (await bus.js.stream_info(topology.SUBMIT_STREAM)).config.num_replicas == REPLICAS
        consumer = await bus.js.consumer_info(topology.ROUTE_STREAM, topology.ROUTER_CONSUMER)
        leader = next(n for n in nodes if n.name == consumer.cluster.leader)
    finally:
        await bus.close()

    # What KEDA's nats-jetstream scaler reads: consumer lag under account RELAIS on the
    # consumer's leader, found through the advertised client URLs in /varz.
    jsz = await asyncio.to_thread(leader.monitor_json, "/jsz?acc=RELAIS&consumers=true&config=true")
    (account,) = [a for a in jsz["account_details"] if a["name"] == "RELAIS"]
    (stream,) = [s for s in account["stream_detail"] if s["name"] == topology.ROUTE_STREAM]
    (router,) = [c for c in stream["consumer_detail"] if c["name"] == topology.ROUTER_CONSUMER]
    assert router["num_pending"] + router["num_ack_pending"] == 1
    varz = await asyncio.to_thread(nodes[0].monitor_json, "/varz")
    # Every server (itself included) by its advertised name: KEDA can reach whichever leads.
    assert {f"127.0.0.1:{n.client}" for n in nodes} == set(varz["connect_urls"])


async def test_anonymous_and_wrong_password_clients_are_refused(
    cluster: tuple[list[Node], dict[str, str]],
) -> None:
    nodes, _ = cluster
    for credentials in ({}, {"user": "ingress", "password": "wrong"}):
        with pytest.raises(Exception) as refused:
            await nats.connect(nodes[0].url, allow_reconnect=False, connect_timeout=2, **credentials)
        assert "authorization" in repr(refused.value).lower() or "no servers" in repr(refused.value).lower()


async def test_system_account_cannot_reach_relais_streams(cluster: tuple[list[Node], dict[str, str]]) -> None:
    nodes, env = cluster
    relais = await nats.connect(nodes[0].url, user="admin", password=env["ADMIN_PASSWORD"])
    system = await nats.connect(nodes[0].url, user="sys", password=env["SYS_PASSWORD"])
    try:
        await admin_js(relais).add_stream(name="ISOLATION", subjects=["isolation.>"], num_replicas=1)
        with pytest.raises(Exception):  # noqa: B017 - SYS has no JetStream: any error proves isolation
            await system.jetstream(timeout=2).stream_info("ISOLATION")
    finally:
        await relais.close()
        await system.close()


SERVICE_USERS = ("ingress", "router", "delivery", "bounce")
# The mail stream each service user publishes to: new mail (the ingress, bounce's DSNs), or mail
# routed again (the router, delivery's retries).
MAIL_QUEUE = {
    "ingress": (topology.submit_subject(), topology.SUBMIT_STREAM),
    "router": (topology.route_subject(), topology.ROUTE_STREAM),
    "delivery": (topology.route_subject(), topology.ROUTE_STREAM),
    "bounce": (topology.submit_subject(), topology.SUBMIT_STREAM),
}


def admin_js(nc: nats.NATS) -> JetStreamContext:
    return nc.jetstream(timeout=5.0)


async def _applied_by_admin(config: Config, env: dict[str, str]) -> None:
    """What the relais-topology pod does: the topology declared as `admin`."""
    as_admin = replace(config, nats={"user": "admin", "password": env["ADMIN_PASSWORD"]})
    bus = await connect(as_admin.nats, "k8s-test-topology")
    try:
        await topology.ensure_topology(bus.js, as_admin)
    finally:
        await bus.close()


async def test_service_users_find_the_topology_admin_applied_but_cannot_destroy_mail(
    cluster: tuple[list[Node], dict[str, str]],
) -> None:
    """`admin` applies the topology (the relais-topology pod); each service only checks it. None
    needs to delete a stream or purge a mail stream, and a leaked service password (the
    internet-facing ingress's first) must not be able to throw away every message Relais has
    answered 250 for. Operators' `admin` user still can."""
    nodes, env = cluster
    urls = ",".join(n.url for n in nodes)
    await _applied_by_admin(load_config(BASE / "relais.toml", {"RELAIS_NATS__URL": urls}), env)
    for user in SERVICE_USERS:
        config = load_config(
            BASE / "relais.toml",
            {
                "RELAIS_NATS__URL": urls,
                "RELAIS_NATS__USER": user,
                "RELAIS_NATS__PASSWORD": env[f"{user.upper()}_PASSWORD"],
            },
        )
        bus = await connect(config.nats, f"k8s-test-{user}")
        try:
            assert not config.nats.declare_topology
            await topology.ensure_or_check_topology(bus.js, config)
            subject, stream = MAIL_QUEUE[user]
            await bus.js.publish(subject, f"kept from {user}".encode())
            js = bus.nc.jetstream(timeout=1.0)
            for attempt in (js.purge_stream, js.delete_stream):
                with pytest.raises(Exception):  # noqa: B017 - a refused request only times out
                    await attempt(stream)
            info = await bus.js.stream_info(stream)
            assert info.state.messages >= 1, f"{user} purged {stream}"
        finally:
            await bus.close()
    admin = await nats.connect([n.url for n in nodes], user="admin", password=env["ADMIN_PASSWORD"])
    try:
        assert await admin.jetstream(timeout=5.0).delete_stream(topology.ROUTE_STREAM)
    finally:
        await admin.close()
