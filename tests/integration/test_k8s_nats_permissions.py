"""Each service's NATS user, as deploy/k8s/base/nats.conf grants it: enough to run Relais, not
enough to do another service's part.

One nats-server runs the shipped nats.conf (its cluster block cut out: one server is enough to
check permissions), with the StatefulSet's environment and the passwords its init container
writes from the Secret. The four services then run with a user
each and carry mail end to end; and each user is refused the subjects of the others, above all
the ingress (the internet-facing service, whose password leaks first) the delivery jobs: a
message put there would skip AUTH, the sender-domain checks and the router, an open relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, Header, RePublish, StreamConfig
from nats.js.errors import APIError, KeyNotFoundError, NotFoundError

from services.core import topology
from services.core.bodies import BodyMissing, BodyStore, sweep_deleted_bodies
from services.core.bus import BrokerUnavailable, Bus, inbox_prefix
from services.core.config import Config
from services.core.embedded import free_port, nats_server_binary, stop_process, wait_for_port
from services.core.envelope import new_message_id
from services.core.schedule import rfc3339
from services.ingress.server_clock import read_server_time
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
    stored_bodies,
    wait_for_events,
)
from tests.support.smtp_sink import SMTPSink
from tests.unit.k8s_manifests import BASE, NATS_PASSWORD_KEYS, lay_out_nats_pod, one, render
from tests.unit.test_k8s_wiring import _kube_env, _main_container

SERVICE_USERS = ("ingress", "router", "delivery", "bounce")
USER_UNKNOWN = "550 5.1.1 <gone@alpha.test>: Recipient address rejected: User unknown"
# Over nats.inline_body_max (128 KiB): the body goes through the Object Store and its references.
LARGE_BODY = "A large newsletter line, repeated to pass the inline limit.\r\n" * 3000


@dataclass
class ShippedNats:
    host: str
    port: int
    passwords: dict[str, str]  # the relais-nats Secret
    log: Path

    def password(self, user: str) -> str:
        return self.passwords[f"{user}-password"]

    def url(self, user: str = "admin") -> str:
        return f"nats://{user}:{self.password(user)}@{self.host}:{self.port}"

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[nats.NATS]:
        """A connection as `admin`, the user with no limits, closed on exit."""
        connection = await nats.connect(self.url())
        try:
            yield connection
        finally:
            await connection.close()

    def violations(self) -> list[str]:
        """The server's log lines about a publish or subscription it refused."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if "Violation" in line]


def _single_server(conf: str, port: int, store: Path) -> str:
    """The shipped nats.conf for one server on loopback: the cluster block goes (its routes
    name pods), and everything else (accounts, users, permissions) stays as shipped. (The
    route password and routes, which only the cluster block used, go from the passwords.)"""
    assert conf.count("\ncluster {") == 1, "nats.conf no longer has one cluster block"
    start = conf.index("\ncluster {")
    end = conf.index("\n}\n", start) + len("\n}\n")
    conf = conf[:start] + "\n" + conf[end:]
    conf = _replace_once(conf, "listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
    conf = _replace_once(conf, "http_port: 8222\n", "")
    conf = _replace_once(conf, "store_dir: /data/jetstream", f'store_dir: "{store / "jetstream"}"')
    return _replace_once(conf, '"/var/run/nats/nats.pid"', f'"{store / "nats.pid"}"')


def secret_passwords() -> dict[str, str]:
    """A relais-nats Secret: a password for each key, one of them with the characters a conf
    string must escape (`"`, `\\`), a `$` and leading digits, the others as
    docs/operations.md generates them."""
    passwords = {key: secrets.token_hex(32) for key in NATS_PASSWORD_KEYS}
    passwords["router-password"] = f'0123"\\$ROUTER {secrets.token_hex(8)}'
    return passwords


@pytest.fixture
def shipped_nats(tmp_path: Path) -> Iterator[ShippedNats]:
    manifests = render(BASE)
    passwords = secret_passwords()
    path = lay_out_nats_pod(manifests, tmp_path, passwords)
    env = _kube_env(_main_container(one(manifests, "StatefulSet", "nats")))
    port = free_port()
    env.update(SERVER_NAME="nats-0", CLIENT_ADVERTISE=f"127.0.0.1:{port}")
    path.write_text(_single_server(path.read_text(), port, tmp_path))
    (name,) = re.findall(r'^include "([^"]+)"', path.read_text(), re.M)
    included = path.parent / name
    kept = [
        line
        for line in included.read_text().splitlines()
        if not line.startswith(("ROUTE_PASSWORD:", "ROUTES:"))
    ]
    included.chmod(0o600)  # written read-only, as the server's user alone reads it
    included.write_text("\n".join(kept) + "\n")
    log = tmp_path / "nats-server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [nats_server_binary(), "-c", str(path)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port("127.0.0.1", port, timeout=15)
        yield ShippedNats("127.0.0.1", port, passwords, log)
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
    """Every part of the flow with its user: a large body (Object Store, references, deleted
    and then swept by `admin`), a deferral and its scheduled retry, a hard bounce (held notice,
    DSN window schedule, DSN as a new message, suppression entry), the suppressed address
    dropped, a domain that does not exist bounced and one whose DNS fails deferred by the
    router, mail to Relais' own domain, webhook posts. The server refuses nothing on the way."""
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

    # The large body was deleted by the service that settled its last recipient, which may not
    # purge: its chunks are gone once the relais-topology pod (`admin`) has swept them.
    deadline = time.monotonic() + 15
    while await stored_bodies(admin):
        assert time.monotonic() < deadline, "the large body was never deleted"
        await asyncio.sleep(0.2)
    nc = await nats.connect(admin)
    try:
        await sweep_deleted_bodies(Bus(nc=nc, js=nc.jetstream(), publish_timeout=5.0))
        assert await _bodies_stream_messages(nc) == 0
    finally:
        await nc.close()
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
            if self.saw_refused(subject, what):
                return True
            await asyncio.sleep(0.02)
        return False

    def saw_refused(self, subject: str, what: str = "publish") -> bool:
        return any(f'{what} to "{subject.lower()}"' in refusal for refusal in self.refusals)


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
            # As the services connect (services.core.bus.connect): each user's own inboxes.
            inbox_prefix=inbox_prefix(user),
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
    # Only the router and delivery publish mail routed again: the route stream takes schedules,
    # and so roll-ups, which would let a publisher empty it (test_k8s_nats_schedule_targets.py).
    ("ingress", topology.route_subject()),
    ("bounce", topology.route_subject()),
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
    async with shipped_nats.admin() as admin:
        js = admin.jetstream()
        for stream in (
            topology.DELIVER_STREAM,
            topology.BOUNCE_STREAM,
            topology.ROUTE_STREAM,
            topology.SUBMIT_STREAM,
        ):
            assert (await js.stream_info(stream)).state.messages == 0, f"{user} got into {stream}"


# The control beside the refusals: what each user's service publishes is accepted, so a refusal
# above is the permission at work, not a probe that can never succeed.
ACCEPTED = [
    ("ingress", topology.submit_subject()),
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
    ("bounce", topology.submit_subject()),
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
    against its stream's: the submit stream, where the ingress publishes, takes no schedule at
    all (and the route stream, which takes them, holds no delivery job)."""
    connection = await probe("ingress")
    schedule = {
        Header.SCHEDULE: f"@at {rfc3339(time.time() + 1)}",
        Header.SCHEDULE_TARGET: topology.deliver_subject("default"),
    }
    with pytest.raises(APIError):
        await connection.nc.jetstream(timeout=5).publish(
            topology.submit_subject(), b"forged", headers=schedule
        )
    await asyncio.sleep(2)  # past the time it would have fired
    async with shipped_nats.admin() as admin:
        assert (await admin.jetstream().stream_info(topology.DELIVER_STREAM)).state.messages == 0


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
# the relais-topology pod (`admin`: a webhook's consumer is made on the events stream), and the
# commands that read across services there too (`relais status` reads the events).
OPERATOR_COMMANDS = [
    ("admin", ("account", "add", "newsletter", "--domain", "news.test", "--password", "a long password")),
    ("admin", ("account", "webhook", "newsletter", "--url", "https://hooks.example.com/relais")),
    ("admin", ("account", "webhook", "newsletter", "--clear")),
    ("admin", ("account", "disable", "newsletter")),
    ("ingress", ("account", "enable", "newsletter")),
    ("bounce", ("suppression", "add", "gone@alpha.test", "--account", ACCOUNT)),
    # An account made with `relais account add` is in KV only: the bounce user reads its record.
    ("bounce", ("suppression", "add", "gone@news.test", "--account", "newsletter")),
    ("delivery", ("pause", "pool", "default", "--reason", "maintenance")),
    ("delivery", ("resume", "pool", "default")),
    ("delivery", ("requeue", "all")),
    ("admin", ("status", "--interval", "0")),
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


async def test_a_mistyped_pool_is_refused_in_the_delivery_pod_naming_the_pools(
    shipped_nats: ShippedNats, tmp_path: Path
) -> None:
    """`relais pause pool` refuses a pool the cluster does not have, naming those it has, which it
    reads from the delivery stream's consumers: the delivery user may list them."""
    config = make_config(nats_url=shipped_nats.url())
    _apply_topology(config, shipped_nats, tmp_path)
    ran = await asyncio.to_thread(
        run_cli, _as_user(config, shipped_nats, "delivery"), tmp_path, "pause", "pool", "defualt"
    )
    assert ran.returncode == 2, (ran.stdout, ran.stderr)
    assert ran.stderr.startswith("relais: ") and "its pools: default" in ran.stderr, ran.stderr
    assert shipped_nats.violations() == []


async def _refused_request(connection: Probe, request: Awaitable[object], subject: str) -> bool:
    """Whether the server refused a JetStream API request's publish. Nobody answers a refused
    request, so it is given up as soon as the refusal came rather than left to time out."""
    asked = asyncio.ensure_future(request)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if asked.done() or connection.saw_refused(subject):
            break
        await asyncio.sleep(0.02)
    asked.cancel()
    with contextlib.suppress(
        APIError, nats.errors.TimeoutError, TimeoutError, BrokerUnavailable, asyncio.CancelledError
    ):
        await asked
    return await connection.refused(subject)


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_reconfigure_a_stream_into_an_open_relay(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str
) -> None:
    """A republish from relais.submit (which the ingress may publish) into a pool's delivery
    jobs would let a leaked password queue mail past AUTH and the router; a lower limit would
    drop queued mail. Only `admin` (the relais-topology pod) changes streams."""
    connection = await probe(user)
    js = connection.nc.jetstream(timeout=2)
    async with shipped_nats.admin() as admin:
        declared = (await admin.jetstream().stream_info(topology.SUBMIT_STREAM)).config
        relay = dataclasses.replace(
            declared,
            republish=RePublish(src=topology.submit_subject(), dest=topology.deliver_subject("default")),
            max_msgs=1,
        )
        subject = f"$JS.API.STREAM.UPDATE.{topology.SUBMIT_STREAM}"
        assert await _refused_request(connection, js.update_stream(relay), subject), f"{user} updated it"
        current = (await admin.jetstream().stream_info(topology.SUBMIT_STREAM)).config
        assert current.republish is None and current.max_msgs == declared.max_msgs


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_create_a_stream(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str
) -> None:
    connection = await probe(user)
    forged = StreamConfig(name="FORGED", subjects=["forged.>"])
    created = connection.nc.jetstream(timeout=2).add_stream(forged)
    assert await _refused_request(connection, created, "$JS.API.STREAM.CREATE.FORGED")
    async with shipped_nats.admin() as admin:
        with pytest.raises(NotFoundError):
            await admin.jetstream().stream_info("FORGED")


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
        (topology.SUBMIT_STREAM, "forged", topology.submit_subject()),
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
    async with shipped_nats.admin() as admin:
        with pytest.raises(NotFoundError):
            await admin.jetstream().consumer_info(stream, name)


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
    async with shipped_nats.admin() as admin:
        await admin.jetstream().consumer_info(topology.ROUTE_STREAM, topology.ROUTER_CONSUMER)


# What a service reads, as its code reads it: the tests below ask as a leaked password would,
# with nats-py's own calls (a KV get, a watch, a get through the stream leader) and Relais'
# batched direct get (services.core.bus.Bus.get_last).
Read = Callable[[nats.NATS], Awaitable[object]]
# A record that stands for what the account records hold (password hashes, webhook secrets).
ACCOUNT_RECORD = b"password hash and webhook secret"


def _kv_get(bucket: str, key: str) -> Read:
    async def read(nc: nats.NATS) -> object:
        try:
            return (await (await nc.jetstream(timeout=2).key_value(bucket)).get(key)).value
        except KeyNotFoundError:
            return None  # answered: nothing stored under that key

    return read


def _leader_get(stream: str, subject: str) -> Read:
    async def read(nc: nats.NATS) -> object:
        try:
            return (await nc.jetstream(timeout=2).get_msg(stream, subject=subject, direct=False)).data
        except NotFoundError:
            return None

    return read


def _batched_get(stream: str, subject: str) -> Read:
    async def read(nc: nats.NATS) -> object:
        bus = Bus(nc=nc, js=nc.jetstream(timeout=2), publish_timeout=2.0)
        return [m.data for m in (await bus.get_last(stream, [subject])).values()]

    return read


def _server_clock() -> Read:
    """What the ingress reads the servers' clock from (`accept_by` is written in it)."""

    async def read(nc: nats.NATS) -> object:
        return await read_server_time(Bus(nc=nc, js=nc.jetstream(timeout=2), publish_timeout=2.0))

    return read


def _watch(bucket: str) -> Read:
    async def read(nc: nats.NATS) -> object:
        watcher = await (await nc.jetstream(timeout=2).key_value(bucket)).watch(">")
        try:
            first = await watcher.updates(timeout=2)
            return first.value if first is not None else None
        finally:
            await watcher.stop()

    return read


def _events_consumer() -> Read:
    """What `relais status` and `relais message` do: an ordered consumer on the events."""

    async def read(nc: nats.NATS) -> object:
        js = nc.jetstream(timeout=2)
        sub = await js.subscribe(
            topology.events_filter(), stream=topology.EVENTS_STREAM, ordered_consumer=True
        )
        await sub.unsubscribe()
        return sub

    return read


_ACCOUNT_KEY = (topology.ACCOUNTS_BUCKET, ACCOUNT)
_ACCOUNTS_STREAM = topology.kv_stream(topology.ACCOUNTS_BUCKET)
_SUPPRESSION_STREAM = topology.kv_stream(topology.SUPPRESSION_BUCKET)
_SUPPRESSED = topology.kv_subject(topology.SUPPRESSION_BUCKET, f"{ACCOUNT}.x")
_BODIES_STREAM = topology.object_stream(topology.BODY_BUCKET)
_BODY_META = topology.object_meta_subject(topology.BODY_BUCKET, "Ym9keQ==")
_CONTROL = topology.DELIVERY_CONTROL_BUCKET
_COUNTER = topology.limit_subject("authfail-ip", "digest", 1)


def _account_subject() -> str:
    return topology.kv_subject(*_ACCOUNT_KEY)


# What each user must not read, and the request the server refuses: the account records (above
# all for delivery, which never reads them), a bucket its service does not read, the bodies'
# store for the ingress (which only stores them), the events (`relais status` reads them as
# `admin`), another service's queued jobs.
READ_REFUSED: list[tuple[str, str, Read, str]] = [
    (
        "delivery",
        "account record by key",
        _kv_get(*_ACCOUNT_KEY),
        f"$JS.API.DIRECT.GET.{_ACCOUNTS_STREAM}.{_account_subject()}",
    ),
    (
        "delivery",
        "account record from the leader",
        _leader_get(_ACCOUNTS_STREAM, _account_subject()),
        f"$JS.API.STREAM.MSG.GET.{_ACCOUNTS_STREAM}",
    ),
    (
        "delivery",
        "account records batched",
        _batched_get(_ACCOUNTS_STREAM, _account_subject()),
        f"$JS.API.DIRECT.GET.{_ACCOUNTS_STREAM}",
    ),
    (
        "delivery",
        "account records watched",
        _watch(topology.ACCOUNTS_BUCKET),
        f"$JS.API.CONSUMER.CREATE.{_ACCOUNTS_STREAM}",
    ),
    (
        "router",
        "account records watched",
        _watch(topology.ACCOUNTS_BUCKET),
        f"$JS.API.CONSUMER.CREATE.{_ACCOUNTS_STREAM}",
    ),
    (
        "router",
        "account records batched",
        _batched_get(_ACCOUNTS_STREAM, _account_subject()),
        f"$JS.API.DIRECT.GET.{_ACCOUNTS_STREAM}",
    ),
    (
        "ingress",
        "suppression list",
        _batched_get(_SUPPRESSION_STREAM, _SUPPRESSED),
        f"$JS.API.DIRECT.GET.{_SUPPRESSION_STREAM}",
    ),
    (
        "delivery",
        "suppression list",
        _batched_get(_SUPPRESSION_STREAM, _SUPPRESSED),
        f"$JS.API.DIRECT.GET.{_SUPPRESSION_STREAM}",
    ),
    (
        "router",
        "suppression list watched",
        _watch(topology.SUPPRESSION_BUCKET),
        f"$JS.API.CONSUMER.CREATE.{_SUPPRESSION_STREAM}",
    ),
    (
        "ingress",
        "delivery control watched",
        _watch(_CONTROL),
        f"$JS.API.CONSUMER.CREATE.{topology.kv_stream(_CONTROL)}",
    ),
    ("ingress", "bodies", _batched_get(_BODIES_STREAM, _BODY_META), f"$JS.API.DIRECT.GET.{_BODIES_STREAM}"),
    (
        "bounce",
        "AUTH counters",
        _batched_get(topology.LIMITS_STREAM, _COUNTER),
        f"$JS.API.DIRECT.GET.{topology.LIMITS_STREAM}",
    ),
    (
        "ingress",
        "delivery jobs",
        _leader_get(topology.DELIVER_STREAM, topology.deliver_subject("default")),
        f"$JS.API.STREAM.MSG.GET.{topology.DELIVER_STREAM}",
    ),
    *[
        (user, "events", _events_consumer(), f"$JS.API.CONSUMER.CREATE.{topology.EVENTS_STREAM}")
        for user in ("ingress", "router", "delivery")
    ],
]


# The control beside the refusals: what each service reads, read with the same calls.
READ_ACCEPTED: list[tuple[str, str, Read]] = [
    ("ingress", "account record by key", _kv_get(*_ACCOUNT_KEY)),
    ("ingress", "account records watched", _watch(topology.ACCOUNTS_BUCKET)),
    ("router", "account record by key", _kv_get(*_ACCOUNT_KEY)),
    ("bounce", "account records watched", _watch(topology.ACCOUNTS_BUCKET)),
    ("bounce", "account record from the leader", _leader_get(_ACCOUNTS_STREAM, _account_subject())),
    ("router", "suppression list", _batched_get(_SUPPRESSION_STREAM, _SUPPRESSED)),
    ("bounce", "suppression list watched", _watch(topology.SUPPRESSION_BUCKET)),
    ("delivery", "delivery control watched", _watch(_CONTROL)),
    ("delivery", "bodies", _batched_get(_BODIES_STREAM, _BODY_META)),
    ("ingress", "AUTH counters", _batched_get(topology.LIMITS_STREAM, _COUNTER)),
    ("ingress", "NATS servers' clock", _server_clock()),
    ("delivery", "delivery jobs", _leader_get(topology.DELIVER_STREAM, topology.deliver_subject("default"))),
    ("admin", "events", _events_consumer()),
]


@pytest.fixture
async def account_record(
    shipped_nats: ShippedNats,
    probe: Callable[[str], Awaitable[Probe]],  # declares the topology, the bucket with it
) -> None:
    """An account record, stored by `admin`: what a refused read would have got."""
    async with shipped_nats.admin() as admin:
        await admin.jetstream().publish(_account_subject(), ACCOUNT_RECORD)


@pytest.mark.parametrize(
    ("user", "what", "read", "subject"), READ_REFUSED, ids=[f"{u}:{w}" for u, w, _, _ in READ_REFUSED]
)
async def test_a_service_user_cannot_read_what_its_service_does_not(
    probe: Callable[[str], Awaitable[Probe]],
    account_record: None,
    user: str,
    what: str,
    read: Read,
    subject: str,
) -> None:
    connection = await probe(user)
    assert await _refused_request(connection, read(connection.nc), subject), f"{user} may read the {what}"


@pytest.mark.parametrize(
    ("user", "what", "read"), READ_ACCEPTED, ids=[f"{u}:{w}" for u, w, _ in READ_ACCEPTED]
)
async def test_a_service_user_reads_what_its_service_reads(
    probe: Callable[[str], Awaitable[Probe]], account_record: None, user: str, what: str, read: Read
) -> None:
    connection = await probe(user)
    got = await read(connection.nc)
    await connection.nc.flush(timeout=5)
    assert connection.refusals == [], f"{user} was refused the {what}"
    if "account record" in what:
        assert got == ACCOUNT_RECORD


# Each durable consumer with a message waiting, and the service that pulls from it. A pull by
# anyone else would get the message (whole mail, on the delivery and route streams) and, never
# acked, hold it back from the service for nats.ack_wait.
PULLS = [
    (topology.submit_binding(), "router"),
    (topology.router_binding(), "router"),
    (topology.verdict_binding(), "router"),
    (topology.delivery_binding("default"), "delivery"),
    (topology.bounce_binding(), "bounce"),
]


@pytest.mark.parametrize(("binding", "owner"), PULLS, ids=[b.durable for b, _ in PULLS])
async def test_only_a_consumers_service_pulls_from_it(
    probe: Callable[[str], Awaitable[Probe]],
    shipped_nats: ShippedNats,
    binding: topology.ConsumerBinding,
    owner: str,
) -> None:
    async with shipped_nats.admin() as admin:
        await admin.jetstream().publish(binding.subject, b"queued mail")
        for user in SERVICE_USERS:
            if user == owner:
                continue
            connection = await probe(user)
            sub = await connection.nc.jetstream(timeout=2).pull_subscribe_bind(
                binding.durable, binding.stream
            )
            subject = f"$JS.API.CONSUMER.MSG.NEXT.{binding.stream}.{binding.durable}"
            assert await _refused_request(connection, sub.fetch(1, timeout=1), subject), f"{user} pulled it"
        info = await admin.jetstream().consumer_info(binding.stream, binding.durable)
        assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (1, 0, 0)
    service = await probe(owner)
    sub = await service.nc.jetstream(timeout=5).pull_subscribe_bind(binding.durable, binding.stream)
    (msg,) = await sub.fetch(1, timeout=5)
    assert msg.data == b"queued mail"
    await msg.ack_sync()
    assert service.refusals == []


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_listen_to_another_users_inboxes(
    probe: Callable[[str], Awaitable[Probe]], user: str
) -> None:
    """Replies to every request come to inboxes: the messages a service pulls, the entries its
    watches deliver, the answers of its direct gets (account records among them). Each user
    subscribes only to its own."""
    connection = await probe(user)
    own = f"{inbox_prefix(user)}.>"
    await connection.nc.subscribe(own)
    others = [f"{inbox_prefix(other)}.>" for other in (*SERVICE_USERS, "admin") if other != user]
    for subject in [*others, "_INBOX.>"]:
        await connection.nc.subscribe(subject)
        assert await connection.refused(subject, "subscription"), f"{user} may subscribe to {subject}"
    # Refusals come in order: the one for its own inboxes would have come before the others'.
    assert not any(f'"{own.lower()}"' in refusal for refusal in connection.refusals)


# The bodies' stream holds every queued large body. No service user may purge it or delete its
# messages: both name what they remove in the request's body, so a user allowed to remove one
# body's chunks could remove every queued body's. Nor roll it up: `Nats-Rollup: all` on any
# subject a user may publish empties a stream, so the body store refuses roll-ups. A service
# deletes a body by marking it deleted; `admin` (the relais-topology pod) purges it.
BODY = LARGE_BODY.encode()


async def _bodies_stream_messages(nc: nats.NATS) -> int:
    return (await nc.jetstream().stream_info(_BODIES_STREAM)).state.messages


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_purge_the_bodies_stream(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str
) -> None:
    connection = await probe(user)
    async with shipped_nats.admin() as admin:
        queued = await BodyStore(admin.jetstream(), 0).put(new_message_id(), BODY)
        stored = await _bodies_stream_messages(admin)
        js = connection.nc.jetstream(timeout=2)
        purge = f"$JS.API.STREAM.PURGE.{_BODIES_STREAM}"
        assert await _refused_request(connection, js.purge_stream(_BODIES_STREAM), purge), f"{user} purged"
        delete = f"$JS.API.STREAM.MSG.DELETE.{_BODIES_STREAM}"
        assert await _refused_request(connection, js.delete_msg(_BODIES_STREAM, 1), delete), f"{user} deleted"
        assert await _bodies_stream_messages(admin) == stored
        assert await BodyStore(admin.jetstream(), 0).get(queued) == BODY


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_user_cannot_roll_up_the_bodies_stream(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats, user: str
) -> None:
    """A meta of the body store is a subject every service user may publish to (to delete a
    body); a header in that publish would have emptied the stream."""
    connection = await probe(user)
    async with shipped_nats.admin() as admin:
        queued = await BodyStore(admin.jetstream(), 0).put(new_message_id(), BODY)
        stored = await _bodies_stream_messages(admin)
        forged = topology.object_meta_subject(topology.BODY_BUCKET, "Zm9yZ2Vk")
        with pytest.raises(APIError, match="rollup not permitted"):
            await connection.nc.jetstream(timeout=5).publish(forged, b"{}", headers={Header.ROLLUP: "all"})
        assert connection.refusals == [], "the stream refused it, not the user's permissions"
        assert await _bodies_stream_messages(admin) == stored
        assert await BodyStore(admin.jetstream(), 0).get(queued) == BODY


async def test_each_service_user_stores_reads_and_deletes_bodies_as_its_service_does(
    probe: Callable[[str], Awaitable[Probe]], shipped_nats: ShippedNats
) -> None:
    """The control beside the refusals: the ingress stores the mail's bodies and bounce its
    DSNs', the others read them, and each may delete one (its service's user may not purge:
    `purges=False`, as `nats.declare_topology = false` makes it). `admin`'s sweep then leaves
    nothing in the stream."""
    users = {user: await probe(user) for user in SERVICE_USERS}

    def store(user: str) -> BodyStore:
        nc = users[user].nc
        bus = Bus(nc=nc, js=nc.jetstream(timeout=5), publish_timeout=5.0)
        return BodyStore(bus.js, 0, bus, purges=False)

    mail = await store("ingress").put(new_message_id(), BODY)
    dsn = await store("bounce").put(new_message_id(), BODY)
    discarded = await store("ingress").put(new_message_id(), BODY)
    for user in ("router", "delivery", "bounce"):
        assert await store(user).get(mail) == BODY
        assert await store(user).get(dsn) == BODY
    await store("ingress").discard(discarded)  # the 451 after a body was stored
    await store("delivery").discard(mail)
    await store("router").discard(dsn)
    for user, connection in users.items():
        await connection.nc.flush(timeout=5)
        assert connection.refusals == [], f"{user} was refused {connection.refusals}"
    for ref in (mail, dsn, discarded):
        with pytest.raises(BodyMissing):
            await store("delivery").get(ref)

    async with shipped_nats.admin() as admin:
        assert await _bodies_stream_messages(admin) > 0, "the chunks wait for the sweep"
        await sweep_deleted_bodies(Bus(nc=admin, js=admin.jetstream(), publish_timeout=5.0))
        assert await _bodies_stream_messages(admin) == 0
