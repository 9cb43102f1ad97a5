"""Each service's NATS user, as deploy/k8s/base/nats.conf grants it: enough to run Relais, not
enough to do another service's part.

One nats-server runs the shipped nats.conf (its cluster block cut out: one server is enough to
check permissions), with the StatefulSet's environment. The four services then run with a user
each and carry mail end to end; and each user is refused the subjects of the others, above all
the ingress (the internet-facing service, whose password leaks first) the delivery jobs: a
message put there would skip AUTH, the sender-domain checks and the router, an open relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, Header, RePublish, StreamConfig
from nats.js.errors import APIError, NotFoundError

from services.core import topology
from services.core.config import Config
from services.core.embedded import free_port, nats_server_binary, stop_process, wait_for_port
from services.core.schedule import rfc3339
from tests.integration.bounce.conftest import (  # noqa: F401 - fixtures
    Receiver,
    publish_inbound,
    receiver,
    suppression_entry,
    wait_accepted,
    wait_consumed,
    webhook_account,
)
from tests.integration.spine.conftest import sender_mx, zone  # noqa: F401 - fixtures
from tests.integration.test_k8s_nats_cluster import _replace_once
from tests.support.dns_server import DNSServer
from tests.support.relais import (
    ACCOUNT,
    RelaisStack,
    asubmit,
    make_config,
    message,
    read_events,
    run_cli,
    wait_for_events,
)
from tests.support.smtp_sink import SMTPSink
from tests.unit.k8s_manifests import BASE, config_map_data, one, render
from tests.unit.test_k8s_wiring import _kube_env, _main_container

SERVICE_USERS = ("ingress", "router", "delivery", "bounce")
USER_UNKNOWN = "550 5.1.1 <gone@alpha.test>: Recipient address rejected: User unknown"
# Over nats.inline_body_max (128 KiB): the body goes through the Object Store and its references.
LARGE_BODY = "A large newsletter line, repeated to pass the inline limit.\r\n" * 3000


@dataclass
class ShippedNats:
    host: str
    port: int
    env: dict[str, str]
    log: Path

    def password(self, user: str) -> str:
        return self.env[f"{user.upper()}_PASSWORD"]

    def url(self, user: str = "admin") -> str:
        return f"nats://{user}:{self.password(user)}@{self.host}:{self.port}"

    def violations(self) -> list[str]:
        """The server's log lines about a publish or subscription it refused."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if "Violation" in line]


def _single_server(conf: str, port: int, store: Path) -> str:
    """The shipped nats.conf for one server on loopback: the cluster block goes (its routes
    name pods), and everything else (accounts, users, permissions) stays as shipped."""
    assert conf.count("\ncluster {") == 1, "nats.conf no longer has one cluster block"
    start = conf.index("\ncluster {")
    end = conf.index("\n}\n", start) + len("\n}\n")
    conf = conf[:start] + "\n" + conf[end:]
    conf = _replace_once(conf, "listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
    conf = _replace_once(conf, "http_port: 8222\n", "")
    conf = _replace_once(conf, "store_dir: /data/jetstream", f'store_dir: "{store / "jetstream"}"')
    return _replace_once(conf, '"/var/run/nats/nats.pid"', f'"{store / "nats.pid"}"')


@pytest.fixture
def shipped_nats(tmp_path: Path) -> Iterator[ShippedNats]:
    manifests = render(BASE)
    conf = config_map_data(manifests, "nats-config")["nats.conf"]
    env = _kube_env(_main_container(one(manifests, "StatefulSet", "nats")))
    port = free_port()
    env.update(SERVER_NAME="nats-0", CLIENT_ADVERTISE=f"127.0.0.1:{port}")
    path = tmp_path / "nats.conf"
    path.write_text(_single_server(conf, port, tmp_path))
    log = tmp_path / "nats-server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [nats_server_binary(), "-c", str(path)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port("127.0.0.1", port, timeout=15)
        yield ShippedNats("127.0.0.1", port, env, log)
    finally:
        stop_process(process)


def _as_user(config: Config, server: ShippedNats, user: str) -> Config:
    """The config a pod runs with: its user, and (as deploy/k8s/base/relais.toml says) not
    declaring the topology, which the relais-topology pod applies as `admin`."""
    nats_config = dataclasses.replace(
        config.nats,
        url=f"nats://{server.host}:{server.port}",
        user=user,
        password=server.password(user),
        declare_topology=False,
    )
    return dataclasses.replace(config, nats=nats_config)


def _apply_topology(config: Config, server: ShippedNats, workdir: Path) -> None:
    """What the relais-topology pod does at start: `relais topology apply` as `admin`, with the
    services' config file (which says not to declare)."""
    ran = run_cli(_as_user(config, server, "admin"), workdir, "topology", "apply")
    assert ran.returncode == 0, (ran.stdout, ran.stderr)


@pytest.fixture
async def stacks(
    shipped_nats: ShippedNats,
    zone: DNSServer,  # noqa: F811 - the imported fixture
    sink_port: int,
    receiver: Receiver,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> AsyncIterator[dict[str, RelaisStack]]:
    """Each service in a stack of its own, connected as its own user, as in the cluster, after
    the topology was applied as `admin`. The account posts its events to a webhook (the bounce
    service's consumer on the events stream)."""
    config = make_config(
        nats_url=shipped_nats.url(),
        dns_port=zone.port,
        smtp_port=sink_port,
        accounts=webhook_account(receiver.url),
    )
    await asyncio.to_thread(_apply_topology, config, shipped_nats, tmp_path)
    running: dict[str, RelaisStack] = {}
    try:
        for user in SERVICE_USERS:
            running[user] = RelaisStack(_as_user(config, shipped_nats, user))
            # Each only checks at start (start_bus) that the topology is there, as its user.
            await running[user].start([user])
        yield running
    finally:
        for stack in running.values():
            await stack.stop()


async def test_the_four_services_carry_mail_each_as_its_own_user(
    shipped_nats: ShippedNats,
    stacks: dict[str, RelaisStack],
    make_sink: Callable[..., SMTPSink],
    sender_mx: SMTPSink,  # noqa: F811 - the imported fixture
    receiver: Receiver,  # noqa: F811 - the imported fixture
    zone: DNSServer,  # noqa: F811 - the imported fixture
) -> None:
    """Every part of the flow with its user: a large body (Object Store, references), a
    deferral and its scheduled retry, a hard bounce (held notice, DSN window schedule, DSN as
    a new message, suppression entry), the suppressed address dropped, a domain that does not
    exist bounced and one whose DNS fails deferred by the router, mail to Relais' own domain,
    webhook posts. The server refuses nothing along the way."""
    admin = shipped_nats.url()
    smtp = stacks["ingress"].smtp_address
    alpha = make_sink("127.0.0.2")
    alpha.rcpt_replies = {"gone@alpha.test": USER_UNKNOWN}
    alpha.tempfail_data = 1  # reader@ is deferred once, then delivered by the retry

    first = message(subject="Large", body=LARGE_BODY)
    code, _ = await asubmit(smtp, recipients=["reader@alpha.test", "gone@alpha.test"], data=first)
    assert code == 250
    (delivered,) = await alpha.async_wait_for(1)
    assert delivered.rcpt_tos == ["reader@alpha.test"]
    assert LARGE_BODY.encode() in delivered.data
    (dsn,) = await sender_mx.async_wait_for(1)
    assert b"Status: 5.1.1" in dsn.data
    assert await suppression_entry(admin, ACCOUNT, "gone@alpha.test") is not None

    zone.set_servfail("flaky.test")
    second = message(subject="Again")
    recipients = ["gone@alpha.test", "here@alpha.test", "someone@nowhere.test", "later@flaky.test"]
    code, _ = await asubmit(smtp, recipients=recipients, data=second)
    assert code == 250
    (suppressed,) = await wait_for_events(admin, "suppressed", 1)
    assert suppressed.recipients == ["gone@alpha.test"]
    assert (await alpha.async_wait_for(2))[1].rcpt_tos == ["here@alpha.test"]
    assert b"someone@nowhere.test" in (await sender_mx.async_wait_for(2))[1].data

    # What the ingress's inbound listener publishes for mail to Relais' own domains.
    await publish_inbound(shipped_nats.url("ingress"), message(), ["postmaster@relais.test"])
    await wait_consumed(admin, topology.INBOUND_STREAM, topology.INBOUND_CONSUMER)

    # Each service's events, published with its user: accepted (ingress), deferred and
    # delivered (delivery), bounced (bounce), suppressed (router); posted and acked by bounce.
    await wait_for_events(admin, "delivered", 4)  # reader@, here@, the two DSNs
    await wait_for_events(admin, "deferred", 2)  # reader@'s first attempt, later@'s DNS failure
    events = await read_events(admin)
    assert {"accepted", "deferred", "delivered", "bounced", "suppressed"} <= {e.kind for e in events}
    dns_deferrals = [e for e in events if e.kind == "deferred" and (e.reply or {}).get("enhanced") == "4.4.3"]
    assert dns_deferrals and dns_deferrals[0].recipients == ["later@flaky.test"]
    await wait_accepted(receiver, 1)
    await wait_consumed(admin, topology.EVENTS_STREAM, topology.webhooks_binding(ACCOUNT).durable)
    assert shipped_nats.violations() == []


@dataclass
class Probe:
    """A connection as one service user that records what the server refused it."""

    nc: nats.NATS
    refusals: list[str]

    async def refused(self, subject: str, what: str = "publish") -> bool:
        """Whether the server refused the last publish or subscription for `subject` (it
        answers at once, before the PONG of a flush; the error callback runs as a task, so it
        is waited for)."""
        await self.nc.flush(timeout=5)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if any(f'{what} to "{subject.lower()}"' in refusal for refusal in self.refusals):
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture
async def probe(shipped_nats: ShippedNats) -> AsyncIterator[Callable[[str], Awaitable[Probe]]]:
    probes: list[Probe] = []
    admin = await nats.connect(shipped_nats.url())
    # The topology as the services declare it, so that whatever a probe got through would be
    # stored, and seen.
    await topology.ensure_topology(admin.jetstream(), Config())

    async def connect(user: str) -> Probe:
        refusals: list[str] = []

        async def on_error(exc: Exception) -> None:
            refusals.append(str(exc).lower())

        nc = await nats.connect(
            f"nats://{shipped_nats.host}:{shipped_nats.port}",
            user=user,
            password=shipped_nats.password(user),
            error_cb=on_error,
            allow_reconnect=False,
        )
        probes.append(Probe(nc, refusals))
        return probes[-1]

    try:
        yield connect
    finally:
        for p in probes:
            await p.nc.close()
        await admin.close()


# What each user must not publish: another service's input, its bucket, its acks, or an outcome
# it does not decide.
REFUSED = [
    ("ingress", topology.deliver_subject("default")),  # the open relay
    ("ingress", topology.verdict_subject()),
    ("ingress", topology.bounce_subject()),
    ("ingress", topology.deliver_retry_subject("job", 1)),
    ("ingress", topology.route_retry_subject("job", 1)),
    ("ingress", topology.event_subject(ACCOUNT, "delivered")),
    ("ingress", topology.kv_subject(topology.SUPPRESSION_BUCKET, "acme.x")),
    ("ingress", topology.kv_subject(topology.DELIVERY_CONTROL_BUCKET, "pool.default")),
    ("ingress", f"$JS.API.STREAM.MSG.DELETE.{topology.ROUTE_STREAM}"),
    ("router", topology.kv_subject(topology.ACCOUNTS_BUCKET, "intruder")),
    ("router", topology.kv_subject(topology.SUPPRESSION_BUCKET, "acme.x")),
    ("router", topology.limit_subject("msg-hour", ACCOUNT, 1)),
    ("router", topology.inbound_subject()),
    ("router", topology.event_subject(ACCOUNT, "delivered")),
    ("delivery", topology.verdict_subject()),
    ("delivery", topology.kv_subject(topology.ACCOUNTS_BUCKET, "intruder")),
    ("delivery", topology.kv_subject(topology.SUPPRESSION_BUCKET, "acme.x")),
    ("delivery", topology.kv_subject(topology.WARMUP_BUCKET, "day")),
    ("delivery", f"$JS.ACK.{topology.DELIVER_STREAM}.{topology.VERDICT_CONSUMER}.1.1.1.1.0"),
    ("bounce", topology.deliver_subject("default")),
    ("bounce", topology.verdict_subject()),
    ("bounce", topology.kv_subject(topology.ACCOUNTS_BUCKET, "intruder")),
    ("bounce", topology.kv_subject(topology.WARMUP_BUCKET, "day")),
    ("bounce", f"$JS.ACK.{topology.DELIVER_STREAM}.{topology.delivery_consumer('default')}.1.1.1.1.0"),
]


@pytest.mark.parametrize(("user", "subject"), REFUSED, ids=[f"{u}:{s}" for u, s in REFUSED])
async def test_a_service_user_cannot_publish_where_its_service_does_not(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str, subject: str
) -> None:
    connection = await probe(user)
    await connection.nc.publish(subject, b"forged", headers={Header.MSG_ID: f"probe-{user}"})
    assert await connection.refused(subject), f"{user} may publish to {subject}"
    admin = await nats.connect(shipped_nats.url())
    try:
        js = admin.jetstream()
        for stream in (topology.DELIVER_STREAM, topology.BOUNCE_STREAM, topology.ROUTE_STREAM):
            assert (await js.stream_info(stream)).state.messages == 0, f"{user} got into {stream}"
    finally:
        await admin.close()


# The control beside the refusals: what each user's service publishes is accepted, so a refusal
# above is the permission at work, not a probe that can never succeed.
ACCEPTED = [
    ("ingress", topology.route_subject()),
    ("ingress", topology.inbound_subject()),
    ("ingress", topology.event_subject(ACCOUNT, "accepted")),
    ("ingress", topology.kv_subject(topology.ACCOUNTS_BUCKET, "newsletter")),
    ("router", topology.deliver_subject("default")),
    ("router", topology.verdict_subject()),
    ("router", topology.route_subject()),
    ("router", topology.route_retry_subject("job", 1)),
    ("router", topology.bounce_subject()),
    ("router", topology.event_subject(ACCOUNT, "deferred")),
    ("router", topology.kv_subject(topology.WARMUP_BUCKET, "day")),
    ("delivery", topology.deliver_retry_subject("job", 1)),
    ("delivery", topology.route_retry_subject("job", 1)),
    ("delivery", topology.bounce_subject()),
    ("delivery", topology.kv_subject(topology.SHAPING_BUCKET, "slot")),
    ("delivery", topology.kv_subject(topology.DELIVERY_CONTROL_BUCKET, "pool.default")),
    ("bounce", topology.route_subject()),
    ("bounce", topology.bounce_window_subject("msg", "win")),
    ("bounce", topology.event_subject(ACCOUNT, "complained")),
    ("bounce", topology.kv_subject(topology.SUPPRESSION_BUCKET, "acme.x")),
]


@pytest.mark.parametrize(("user", "subject"), ACCEPTED, ids=[f"{u}:{s}" for u, s in ACCEPTED])
async def test_a_service_user_publishes_its_service_outputs(
    probe: Callable[[str], Awaitable[Probe]], user: str, subject: str
) -> None:
    connection = await probe(user)
    ack = await connection.nc.jetstream(timeout=5).publish(subject, b"allowed")
    assert ack.seq >= 1
    assert connection.refusals == []


async def test_the_ingress_cannot_schedule_a_delivery_job_from_its_own_subject(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats
) -> None:
    """A message schedule's target is not checked against its publisher's permissions, only
    against its stream's subjects: the route stream's, where the ingress publishes, do not
    hold the delivery jobs."""
    connection = await probe("ingress")
    schedule = {
        Header.SCHEDULE: f"@at {rfc3339(time.time() + 1)}",
        Header.SCHEDULE_TARGET: topology.deliver_subject("default"),
    }
    with pytest.raises(APIError):
        await connection.nc.jetstream(timeout=5).publish(
            topology.route_subject(), b"forged", headers=schedule
        )
    await asyncio.sleep(2)  # past the time it would have fired
    admin = await nats.connect(shipped_nats.url())
    try:
        assert (await admin.jetstream().stream_info(topology.DELIVER_STREAM)).state.messages == 0
    finally:
        await admin.close()


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_listen_to_the_mail_flowing_through_nats(
    probe: Callable[[str], Awaitable[Probe]], user: str
) -> None:
    """Core NATS subscribers see every publish, JetStream or not: the delivery jobs (whole
    messages) and account records among them."""
    connection = await probe(user)
    for subject in ("relais.>", "$KV.>", ">"):
        await connection.nc.subscribe(subject)
        assert await connection.refused(subject, "subscription"), f"{user} may subscribe to {subject}"


# The operator commands docs/operations.md has run in a pod, as that pod's user: accounts in
# the relais-topology pod (`admin`: a webhook's consumer is made on the events stream).
OPERATOR_COMMANDS = [
    ("admin", ("account", "add", "newsletter", "--domain", "news.test", "--password", "a long password")),
    ("admin", ("account", "webhook", "newsletter", "--url", "https://hooks.example.com/relais")),
    ("admin", ("account", "webhook", "newsletter", "--clear")),
    ("admin", ("account", "disable", "newsletter")),
    ("ingress", ("account", "enable", "newsletter")),
    ("bounce", ("suppression", "add", "gone@alpha.test", "--account", ACCOUNT)),
    ("delivery", ("pause", "pool", "default", "--reason", "maintenance")),
    ("delivery", ("resume", "pool", "default")),
    ("delivery", ("requeue", "all")),
    ("router", ("status", "--interval", "0")),
]


async def test_operator_commands_run_in_the_pod_whose_service_owns_what_they_change(
    shipped_nats: ShippedNats, tmp_path: Path
) -> None:
    config = make_config(nats_url=shipped_nats.url())
    _apply_topology(config, shipped_nats, tmp_path)
    for user, command in OPERATOR_COMMANDS:
        ran = await asyncio.to_thread(run_cli, _as_user(config, shipped_nats, user), tmp_path, *command)
        assert ran.returncode == 0, (user, command, ran.stdout, ran.stderr)
    assert shipped_nats.violations() == []


async def _refused_request(connection: Probe, request: Awaitable[object], subject: str) -> bool:
    """Whether the server refused a JetStream API request's publish (the request itself then
    times out or fails: nobody answers it)."""
    with contextlib.suppress(APIError, nats.errors.TimeoutError, TimeoutError):
        await request
    return await connection.refused(subject)


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_reconfigure_a_stream_into_an_open_relay(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str
) -> None:
    """A republish from relais.route (which the ingress may publish) into a pool's delivery
    jobs would let a leaked password queue mail past AUTH and the router; a lower limit would
    drop queued mail. Only `admin` (the relais-topology pod) changes streams."""
    connection = await probe(user)
    js = connection.nc.jetstream(timeout=2)
    admin = await nats.connect(shipped_nats.url())
    try:
        declared = (await admin.jetstream().stream_info(topology.ROUTE_STREAM)).config
        relay = dataclasses.replace(
            declared,
            republish=RePublish(src=topology.route_subject(), dest=topology.deliver_subject("default")),
            max_msgs=1,
        )
        subject = f"$JS.API.STREAM.UPDATE.{topology.ROUTE_STREAM}"
        assert await _refused_request(connection, js.update_stream(relay), subject), f"{user} updated it"
        current = (await admin.jetstream().stream_info(topology.ROUTE_STREAM)).config
        assert current.republish is None and current.max_msgs == declared.max_msgs
    finally:
        await admin.close()


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_create_a_stream(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str
) -> None:
    connection = await probe(user)
    forged = StreamConfig(name="FORGED", subjects=["forged.>"])
    created = connection.nc.jetstream(timeout=2).add_stream(forged)
    assert await _refused_request(connection, created, "$JS.API.STREAM.CREATE.FORGED")
    admin = await nats.connect(shipped_nats.url())
    try:
        with pytest.raises(NotFoundError):
            await admin.jetstream().stream_info("FORGED")
    finally:
        await admin.close()


# Consumers a leaked password could make or remove: a second consumer on a work queue takes its
# messages (here the scheduled retries) from the service that should have them; a named one on
# the events stream would replace an account's webhook consumer (its filter: whose events are
# posted where); deleting the router's stops the mail.
FORGED_CONSUMERS = [
    (user, stream, name, subject)
    for user in ("ingress", "router", "delivery")
    for stream, name, subject in (
        (topology.DELIVER_STREAM, "forged", "relais.retry.deliver.>"),
        (topology.ROUTE_STREAM, "forged", "relais.retry.route.>"),
        (topology.EVENTS_STREAM, topology.webhooks_binding(ACCOUNT).durable, "relais.events.>"),
    )
] + [("bounce", topology.DELIVER_STREAM, "forged", "relais.retry.deliver.>")]


@pytest.mark.parametrize(
    ("user", "stream", "name", "subject"),
    FORGED_CONSUMERS,
    ids=[f"{u}:{s}:{n}" for u, s, n, _ in FORGED_CONSUMERS],
)
async def test_a_service_user_cannot_create_a_consumer_beside_its_services(
    probe: Callable[[str], Awaitable[Probe]],
    shipped_nats: ShippedNats,
    user: str,
    stream: str,
    name: str,
    subject: str,
) -> None:
    connection = await probe(user)
    js = connection.nc.jetstream(timeout=2)
    durable = ConsumerConfig(durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT)
    assert await _refused_request(
        connection, js.add_consumer(stream, durable), f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}"
    )
    named = ConsumerConfig(name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT)
    assert await _refused_request(
        connection, js.add_consumer(stream, named), f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{subject}"
    )
    admin = await nats.connect(shipped_nats.url())
    try:
        with pytest.raises(NotFoundError):
            await admin.jetstream().consumer_info(stream, name)
    finally:
        await admin.close()


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_delete_another_services_consumer(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str
) -> None:
    connection = await probe(user)
    deleted = connection.nc.jetstream(timeout=2).delete_consumer(
        topology.ROUTE_STREAM, topology.ROUTER_CONSUMER
    )
    subject = f"$JS.API.CONSUMER.DELETE.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}"
    assert await _refused_request(connection, deleted, subject)
    admin = await nats.connect(shipped_nats.url())
    try:
        await admin.jetstream().consumer_info(topology.ROUTE_STREAM, topology.ROUTER_CONSUMER)
    finally:
        await admin.close()
