"""A whole Relais cluster on loopback, made of real processes that can be killed and restarted.

    with Cluster(tmp_path, nats_nodes=3, replicas={"router": 2, ...}) as cluster:
        cluster.services["delivery"][0].kill()           # SIGKILL one delivery replica
        cluster.nats.kill(await cluster.nats.leader_of("RELAIS_DELIVER"))
        cluster.sinks["beta.test"].stop()                 # a destination goes away
        cluster.dns.stop()                                # so does DNS

Pieces: an N-node nats-server cluster (JetStream file storage, Relais' streams at N replicas
when N is 3 or 5), every service as separate OS processes (ingress replicas each on their own
port), one aiosmtpd sink per destination domain on its own 127.0.0.x, a sink for the sender's
domain (where DSNs land), and the loopback DNS server with short TTLs so that a DNS outage is
felt rather than hidden by caches. Used by tests/integration/cluster/ and bench/e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import APIError, ServiceUnavailableError

from services.core.bus import patiently
from services.core.config import Config
from services.core.embedded import ClusterPeer, EmbeddedNats, free_port, wait_for_port
from services.core.topology import EVENTS_STREAM, consumer_bindings, events_filter
from tests.support.dns_server import DNSServer
from tests.support.nats import TEST_MAX_FILE_STORE
from tests.support.relais import SERVICES, ServiceProcess, config_to_toml, make_config
from tests.support.smtp_sink import SMTPSink

SENDER_DOMAIN = "acme.test"
SENDER_MX = "127.0.0.9"
DEFAULT_DOMAINS = {"alpha.test": "127.0.0.2", "beta.test": "127.0.0.3", "gamma.test": "127.0.0.4"}
# Short TTLs: with the resolver caches of the services, long ones would hide a DNS outage.
DNS_TTL = 1


def _current(stream: StreamInfo) -> bool:
    cluster = stream.cluster
    return (
        cluster is not None
        and bool(cluster.leader)
        and all(p.current and not p.offline for p in cluster.replicas or [])
    )


class NatsCluster:
    """`size` nats-server processes joined by cluster routes; size 1 is a plain single node."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        host: str = "127.0.0.1",
        *,
        monitor: bool = False,
        sync_always: bool = False,
    ) -> None:
        self.size = size
        ports = [free_port(host) for _ in range(size)]
        # Nodes on one machine split its cores, as each would get its own CPU limit in
        # Kubernetes (Go sizes GOMAXPROCS to it). Three nodes that each schedule goroutines on
        # both cores of this machine spent over a third of their samples in Go's scheduler
        # (perf: findRunnable, sysmon); with a core each, their CPU per message fell by ~10%.
        cpus = max(1, (os.cpu_count() or 1) // size) if size > 1 else 0
        self.nodes: list[EmbeddedNats] = []
        for i in range(size):
            peer = None
            if size > 1:
                peer = ClusterPeer(
                    name=f"n{i}",
                    cluster_port=ports[i],
                    routes=[p for j, p in enumerate(ports) if j != i],
                )
            self.nodes.append(
                EmbeddedNats(
                    store_dir=base_dir / f"nats-{i}",
                    host=host,
                    peer=peer,
                    log_file=base_dir / f"nats-{i}.log",
                    monitor_port=free_port(host) if monitor else 0,
                    sync_always=sync_always,
                    cpus=cpus,
                    max_file_store=TEST_MAX_FILE_STORE,
                )
            )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node, comma-separated: what services/core/bus.connect expects."""
        return ",".join(self.urls)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            try:
                wait_for_port(node.host, node.port, timeout)
            except TimeoutError as exc:
                log = node.log_file.read_text(errors="replace")[-1500:] if node.log_file else ""
                raise TimeoutError(f"{exc}; its log ends with:\n{log}") from exc
        asyncio.run(self.wait_ready(timeout))

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def kill(self, index: int) -> None:
        """SIGKILL one node, as a machine failure would."""
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        self.nodes[index].start()

    def index_of(self, server_name: str) -> int:
        for i, node in enumerate(self.nodes):
            if (node.peer.name if node.peer else "") == server_name:
                return i
        raise KeyError(server_name)

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until JetStream answers (in a cluster: a meta leader has been elected) and every stream
        has a leader with all its replicas current.

        A node restarted by the previous scenario may still be catching up; a scenario that
        starts meanwhile measures the catch-up, and consumers placed on that node answer late.
        """
        deadline = time.monotonic() + timeout
        last: object = "(not asked yet)"
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(self.urls, connect_timeout=2, max_reconnect_attempts=1)
                try:
                    streams = await nc.jetstream(timeout=5).streams_info()
                finally:
                    await nc.close()
                behind = [s.config.name for s in streams if self.size > 1 and not _current(s)]
                if not behind:
                    return
                last = f"streams not current: {behind}"
            except (OSError, TimeoutError, nats.errors.Error, APIError) as exc:
                last = exc
            await asyncio.sleep(0.3)
        raise TimeoutError(f"JetStream not ready within {timeout}s: {last!r}")

    async def leader_of(self, stream: str, consumer: str = "", timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """Index of the node leading a stream, or one of its consumers (waits through an election)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(self.live_urls(), connect_timeout=2, max_reconnect_attempts=1)
                try:
                    js = nc.jetstream(timeout=2)
                    info = await (js.consumer_info(stream, consumer) if consumer else js.stream_info(stream))
                finally:
                    await nc.close()
                if info.cluster is not None and info.cluster.leader:
                    return self.index_of(info.cluster.leader)
                if self.size == 1:
                    return 0
            except (OSError, TimeoutError, nats.errors.Error, APIError, ServiceUnavailableError) as exc:
                last = exc
            await asyncio.sleep(0.3)
        raise TimeoutError(f"no leader for {stream} {consumer} within {timeout}s: {last!r}")

    async def lead_from(
        self,
        index: int,
        streams: Sequence[str],
        consumers: Sequence[tuple[str, str]] = (),
        timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline
    ) -> None:
        """Make node `index` the leader of `streams` and of `consumers` ((stream, durable) pairs).

        Each stream and consumer is its own Raft group, with its leader wherever its election
        put it: killing the leader of one stream leaves the others (and the consumers, whose
        acks and redeliveries matter as much) on the nodes that survive. Each leader elsewhere is
        asked to step down in favour of `index` (`placement.preferred`, nats-server 2.11+).
        """
        target = self.nodes[index].peer.name if self.nodes[index].peer else ""
        groups: list[tuple[str, str]] = [(s, "") for s in streams] + list(consumers)
        deadline = time.monotonic() + timeout
        nc = await nats.connect(self.live_urls(), connect_timeout=2, max_reconnect_attempts=3)
        try:
            js = nc.jetstream(timeout=5)
            for stream, consumer in groups:
                what = f"{stream}.{consumer}" if consumer else stream
                api = f"$JS.API.{'CONSUMER' if consumer else 'STREAM'}.LEADER.STEPDOWN.{what}"
                request = json.dumps({"placement": {"preferred": target}}).encode()
                while True:
                    info = await (js.consumer_info(stream, consumer) if consumer else js.stream_info(stream))
                    leader = info.cluster.leader if info.cluster else ""
                    if leader == target:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{what} led by {leader!r}, not {target!r}, after {timeout}s")
                    if leader:
                        with contextlib.suppress(nats.errors.TimeoutError):
                            await nc.request(api, request, timeout=5)
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    def live_urls(self) -> list[str]:
        return [n.url for n in self.nodes if n.process is not None and n.process.poll() is None]

    def pids(self) -> dict[str, int]:
        return {
            f"nats-{i}": n.process.pid
            for i, n in enumerate(self.nodes)
            if n.process and n.process.poll() is None
        }


class Cluster:
    """The harness; see the module docstring. Stops everything it started, also on failure."""

    def __init__(
        self,
        base_dir: Path,
        *,
        nats_nodes: int = 3,
        replicas: Mapping[str, int] | None = None,
        domains: Mapping[str, str] | None = None,
        sink_port: int | None = None,
        sink_factory: Any = None,
        nats_monitor: bool = False,
        nats_sync_always: bool = False,
        dns_ttl: int = DNS_TTL,
        **config_sections: Any,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = {name: 2 for name in SERVICES} | dict(replicas or {})
        self.domains = dict(DEFAULT_DOMAINS if domains is None else domains)
        self.nats = NatsCluster(self.base_dir, nats_nodes, monitor=nats_monitor, sync_always=nats_sync_always)
        self.dns = DNSServer("127.0.0.1")
        self.dns_ttl = dns_ttl
        hosts = [*self.domains.values(), SENDER_MX]
        self.sink_port = sink_port or free_port(*hosts)
        # bench/e2e.py swaps the aiosmtpd sinks for Postfix's smtp-sink; anything with start/stop.
        make_sink = sink_factory or (lambda host, port: SMTPSink(host, port))
        self.sinks: dict[str, Any] = {d: make_sink(ip, self.sink_port) for d, ip in self.domains.items()}
        self.sender_mx = SMTPSink(SENDER_MX, self.sink_port)
        self._config_sections = config_sections
        self.config: Config | None = None
        self.config_path = self.base_dir / "relais.toml"
        self.services: dict[str, list[ServiceProcess]] = {}
        self.ingress_addresses: list[tuple[str, int]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def build_config(self) -> Config:
        sections = dict(self._config_sections)
        nats_section = {"replicas": 3 if self.nats.size >= 3 else 1, "publish_timeout": 5.0, "ack_wait": 6.0}
        nats_section |= sections.pop("nats", {})
        telemetry = {"http_listen": ""} | sections.pop("telemetry", {})
        return make_config(
            nats_url=self.nats.url,
            dns_port=self.dns.port,
            smtp_port=self.sink_port,
            nats=nats_section,
            telemetry=telemetry,
            **sections,
        )

    def start(self) -> None:
        self.dns.start()
        self._fill_zone()
        for sink in [*self.sinks.values(), self.sender_mx]:
            sink.start()
        self.nats.start()
        self.config = self.build_config()
        self.config_path.write_text(config_to_toml(self.config))
        for name in SERVICES:
            self.services[name] = []
            for _ in range(self.replicas.get(name, 0)):
                self.add_replica(name)
        for address in self.ingress_addresses:
            wait_for_port(*address, timeout=60)

    def add_replica(self, name: str) -> ServiceProcess:
        env = {}
        if name == "ingress":
            address = ("127.0.0.1", free_port())
            self.ingress_addresses.append(address)
            env["RELAIS_INGRESS__LISTEN"] = f"{address[0]}:{address[1]}"
        proc = ServiceProcess(name, self.config_path, self.base_dir, env=env)
        proc.start()
        self.services.setdefault(name, []).append(proc)
        return proc

    def stop(self) -> None:
        for procs in self.services.values():
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.stop()
        self.nats.stop()
        for sink in [*self.sinks.values(), self.sender_mx]:
            with contextlib.suppress(Exception):
                sink.stop()
        self.dns.stop()

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _fill_zone(self) -> None:
        ttl = self.dns_ttl
        self.dns.add(SENDER_DOMAIN, "MX", "10 mx.acme.test.", ttl=ttl)
        self.dns.add("mx.acme.test", "A", SENDER_MX, ttl=ttl)
        for domain, ip in self.domains.items():
            self.dns.add(domain, "MX", f"10 mx.{domain}.", ttl=ttl)
            self.dns.add(f"mx.{domain}", "A", ip, ttl=ttl)

    # -- faults -----------------------------------------------------------------------------

    def kill(self, name: str, index: int = 0) -> None:
        self.services[name][index].kill()

    def restart(self, name: str, index: int = 0) -> None:
        self.services[name][index].start()

    def heal(self) -> None:
        """Everything back up: services, NATS nodes, sinks, DNS (between scenarios)."""
        for i, node in enumerate(self.nats.nodes):
            if node.process is None or node.process.poll() is not None:
                self.nats.restart(i)
        for procs in self.services.values():
            for proc in procs:
                if proc.process is None or proc.process.poll() is not None:
                    proc.start()
        for sink in self.sinks.values():
            sink.start()
        self.dns.start()

    def pids(self) -> dict[str, int]:
        """Live process ids by role, e.g. {"router-0": 1234, "nats-1": 1240}."""
        out = self.nats.pids()
        for name, procs in self.services.items():
            for i, proc in enumerate(procs):
                if proc.process is not None and proc.process.poll() is None:
                    out[f"{name}-{i}"] = proc.process.pid
        return out

    async def in_flight(self) -> dict[str, tuple[int, int]]:
        """Work the services have not finished, by consumer: (not yet handed out, handed out and
        not acked). Empty when every service consumer is idle: then no job is left that could
        still reach a sink (a duplicate) or write an outcome."""
        assert self.config is not None
        busy: dict[str, tuple[int, int]] = {}
        nc = await nats.connect(self.nats.live_urls(), connect_timeout=2, max_reconnect_attempts=3)
        try:
            js = nc.jetstream(timeout=5)
            for binding in consumer_bindings(self.config):
                info = await js.consumer_info(binding.stream, binding.durable)
                if info.num_pending or info.num_ack_pending:
                    busy[binding.durable] = (info.num_pending or 0, info.num_ack_pending or 0)
        finally:
            await nc.close()
        return busy

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for procs in self.services.values():
            for i, proc in enumerate(procs):
                parts.append(f"--- {proc.name}-{i} ---\n{proc.log()[-tail:]}")
        return "\n".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """The fields of an outcome event the harness relies on. Read from the JSON directly, so
    fields the services add to their events never break the audit."""

    kind: str
    message_id: str
    recipients: tuple[str, ...]
    at: float
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: bytes) -> Event:
        raw = json.loads(data)
        return cls(raw["kind"], raw["message_id"], tuple(raw["recipients"]), float(raw.get("at", 0.0)), raw)


class EventLog:
    """Reads RELAIS_EVENTS incrementally (each poll continues after the last sequence seen).

    A fresh ephemeral consumer per poll, so a stream leader change between polls costs nothing.
    """

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.events: list[Event] = []
        self._next_seq = 1

    async def poll(self, timeout: float = 10.0) -> list[Event]:  # noqa: ASYNC109
        """Fetch what arrived since the last poll; returns the new events."""
        new: list[Event] = []
        nc = await nats.connect(self.urls, connect_timeout=2, max_reconnect_attempts=3)
        try:
            js = nc.jetstream(timeout=timeout)
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._next_seq,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
                num_replicas=1,
                mem_storage=True,
            )
            # On a loaded machine a consumer create has gone unanswered for the whole API
            # timeout (CI, right after a node restart). Asked again, a create that did happen
            # leaves an ephemeral consumer that expires after its inactive threshold.
            sub = await patiently(
                lambda: js.pull_subscribe(events_filter(), stream=EVENTS_STREAM, config=config),
                "events consumer",
                patience=60.0,
            )
            try:
                unavailable = 0
                while True:
                    try:
                        msgs = await sub.fetch(1000, timeout=1.0)
                    except (TimeoutError, nats.errors.TimeoutError):
                        break
                    except ServiceUnavailableError:
                        # A new consumer (or a moved stream leader) is not serving yet.
                        unavailable += 1
                        if unavailable > 50:
                            raise
                        await asyncio.sleep(0.2)
                        continue
                    for msg in msgs:
                        new.append(Event.from_json(msg.data))
                        self._next_seq = msg.metadata.sequence.stream + 1
                    if msgs and msgs[-1].metadata.num_pending == 0:
                        break
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        finally:
            await nc.close()
        self.events.extend(new)
        return new

    async def read_to_end(self, timeout: float = 60.0) -> list[Event]:  # noqa: ASYNC109
        """Poll until every event the stream held when called has been read.

        One poll ends at its first quiet second, which on a loaded machine (a consumer just
        created, a stream leader just moved) is not always the end of the stream; an audit that
        stopped there would miss the very events it looks for (a second outcome, a late one).
        """
        nc = await nats.connect(self.urls, connect_timeout=2, max_reconnect_attempts=3)
        try:
            js = nc.jetstream(timeout=10)
            info = await patiently(lambda: js.stream_info(EVENTS_STREAM), "events stream info")
            last = info.state.last_seq
        finally:
            await nc.close()
        deadline = time.monotonic() + timeout
        new: list[Event] = []
        while self._next_seq <= last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read events up to {self._next_seq - 1} of {last} within {timeout}s")
            new += await self.poll()
        return new
