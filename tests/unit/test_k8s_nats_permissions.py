"""The service users' permissions in deploy/k8s/base/nats.conf, read against the topology.

Who may write each subject and bucket is stated here once, from the services' code; the conf
must grant exactly that, and name only streams, consumers and buckets the topology declares (a
renamed bucket would otherwise leave a permission for nothing and a service refused). The
integration test (tests/integration/test_k8s_nats_permissions.py) proves the server enforces
them and that Relais runs with them.
"""

from __future__ import annotations

import re
from functools import cache

import pytest

from services.core import topology
from services.core.config import Config
from tests.unit.k8s_manifests import BASE

SERVICE_USERS = ("ingress", "router", "delivery", "bounce")

# Which users may publish to a subject, as the services' code does (grep `publish`, `publish_at`,
# the KV and Object Store writes). Schedules put their target here too: nats-server does not
# check a schedule's target against its publisher's permissions, so a service that schedules
# into a subject can write it anyway (delivery's postponed jobs, retries into relais.route).
ALL = set(SERVICE_USERS)
# The streams whose consumers are the topology's alone: the work queues and the counters.
MAIL_STREAMS = [s.name for s in topology.stream_configs(Config()) if s.name != topology.EVENTS_STREAM]
# Every way to ask for a consumer (ephemeral, named, named with a filter, durable) or to delete one.
CONSUMER_REQUESTS = (
    ("CREATE", ""),
    ("CREATE", ".x"),
    ("CREATE", ".x.relais.route"),
    ("DURABLE.CREATE", ".x"),
    ("DELETE", f".{topology.ROUTER_CONSUMER}"),
)
WRITERS: dict[str, set[str]] = {
    topology.route_subject(): {"ingress", "router", "delivery", "bounce"},
    topology.inbound_subject(): {"ingress"},
    topology.limit_subject("msg-hour", "acme", 1): {"ingress"},
    topology.deliver_subject("default"): {"router", "delivery"},
    topology.verdict_subject(): {"router"},
    topology.route_retry_subject("key", 1): {"router", "delivery"},
    topology.deliver_retry_subject("key", 1): {"delivery"},
    topology.bounce_subject(): {"router", "delivery"},
    topology.bounce_window_subject("msg", "win"): {"bounce"},
    topology.bounce_flush_subject(): {"bounce"},
    topology.event_subject("acme", "accepted"): {"ingress"},
    topology.event_subject("acme", "suppressed"): {"router"},
    topology.event_subject("acme", "deferred"): {"router", "delivery"},
    topology.event_subject("acme", "delivered"): {"delivery"},
    topology.event_subject("acme", "bounced"): {"bounce"},
    topology.event_subject("acme", "expired"): {"bounce"},
    topology.event_subject("acme", "complained"): {"bounce"},
    topology.kv_subject(topology.ACCOUNTS_BUCKET, "acme"): {"ingress"},
    topology.kv_subject(topology.SESSIONS_BUCKET, "acme.replica"): {"ingress"},
    topology.kv_subject(topology.SUPPRESSION_BUCKET, "acme.key"): {"bounce"},
    topology.kv_subject(topology.WARMUP_BUCKET, "key"): {"router"},
    topology.kv_subject(topology.SHAPING_BUCKET, "key"): {"delivery"},
    topology.kv_subject(topology.DELIVERY_CONTROL_BUCKET, "key"): {"delivery"},
    topology.kv_subject(topology.BOUNCE_HOLD_BUCKET, "key"): {"bounce"},
    topology.kv_subject(topology.BODY_REFS_BUCKET, "key"): {"router", "delivery", "bounce"},
    topology.object_meta_subject(topology.BODY_BUCKET, "name"): {"ingress", "router", "delivery", "bounce"},
    # Acks (and naks, terms, "in progress") of each durable consumer: only its service's.
    f"$JS.ACK.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}.1.1.1.1.0": {"router"},
    f"$JS.ACK.{topology.DELIVER_STREAM}.{topology.VERDICT_CONSUMER}.1.1.1.1.0": {"router"},
    f"$JS.ACK.{topology.DELIVER_STREAM}.{topology.delivery_consumer('default')}.1.1.1.1.0": {"delivery"},
    f"$JS.ACK.{topology.BOUNCE_STREAM}.{topology.BOUNCE_CONSUMER}.1.1.1.1.0": {"bounce"},
    f"$JS.ACK.{topology.BOUNCE_FLUSH_STREAM}.{topology.BOUNCE_FLUSH_CONSUMER}.1.1.1.1.0": {"bounce"},
    f"$JS.ACK.{topology.INBOUND_STREAM}.{topology.INBOUND_CONSUMER}.1.1.1.1.0": {"bounce"},
    f"$JS.ACK.{topology.EVENTS_STREAM}.webhooks-acme.1.1.1.1.0": {"bounce"},
    # What the services do with JetStream's API at run time: read streams and consumers, pull,
    # get messages, watch buckets (ephemeral consumers on their streams), read bodies, read
    # events (`relais status`, `relais message`: ephemeral consumers).
    f"$JS.API.STREAM.INFO.{topology.DELIVER_STREAM}": ALL,
    f"$JS.API.CONSUMER.INFO.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}": ALL,
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}": ALL,
    f"$JS.API.DIRECT.GET.{topology.kv_stream(topology.SUPPRESSION_BUCKET)}": ALL,
    f"$JS.API.STREAM.MSG.GET.{topology.DELIVER_STREAM}": ALL,
    f"$JS.API.CONSUMER.CREATE.{topology.kv_stream(topology.ACCOUNTS_BUCKET)}": ALL,
    f"$JS.API.CONSUMER.CREATE.{topology.object_stream(topology.BODY_BUCKET)}": ALL,
    f"$JS.API.CONSUMER.CREATE.{topology.EVENTS_STREAM}": ALL,
    f"$JS.API.STREAM.PURGE.{topology.object_stream(topology.BODY_BUCKET)}": ALL,
    # The per-account webhook consumers: the bounce service makes them for the account records
    # and deletes an earlier release's shared one.
    f"$JS.API.CONSUMER.DURABLE.CREATE.{topology.EVENTS_STREAM}.webhooks-acme": {"bounce"},
    f"$JS.API.CONSUMER.DELETE.{topology.EVENTS_STREAM}.webhooks": {"bounce"},
    # What none may do: only `admin` (the relais-topology pod, operators). Declaring the
    # topology (a stream update could add a republish into the delivery jobs), a consumer on a
    # mail stream (a second one on a work queue takes the service's messages).
    f"$JS.API.STREAM.CREATE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.STREAM.CREATE.{topology.kv_stream(topology.ACCOUNTS_BUCKET)}": set(),
    f"$JS.API.STREAM.UPDATE.{topology.ROUTE_STREAM}": set(),
    f"$JS.API.STREAM.UPDATE.{topology.kv_stream(topology.WARMUP_BUCKET)}": set(),
    f"$JS.API.STREAM.RESTORE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.CONSUMER.PAUSE.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}": set(),
    f"$JS.API.CONSUMER.CREATE.{topology.EVENTS_STREAM}.x.relais.events.acme.delivered": {"bounce"},
    f"$JS.API.STREAM.DELETE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.STREAM.MSG.DELETE.{topology.DELIVER_STREAM}": set(),
    **{f"$JS.API.STREAM.PURGE.{s.name}": set() for s in topology.stream_configs(Config())},
    **{
        f"$JS.API.CONSUMER.{verb}.{stream}{suffix}": set()
        for stream in MAIL_STREAMS
        for verb, suffix in CONSUMER_REQUESTS
    },
    f"$JS.API.CONSUMER.DURABLE.CREATE.{topology.EVENTS_STREAM}.x": {"bounce"},
}


# The entries that name no stream, consumer or bucket of their own.
_API_WIDE = ("$JS.API.>", "$JS.FC.>", "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.MSG.DELETE.>")


@cache
def _conf() -> str:
    return (BASE / "nats.conf").read_text()


def _list(text: str) -> list[str]:
    return re.findall(r'"([^"]+)"', text)


def _block(name: str) -> str:
    match = re.search(rf"^{name}: \{{(.*?)^\}}", _conf(), re.S | re.M)
    assert match, f"nats.conf has no {name} block"
    return match.group(1)


def _permissions(user: str) -> tuple[list[str], list[str], list[str]]:
    """(publish allow, publish deny, subscribe allow) of a service user."""
    block = _block(f"{user.upper()}_PERMISSIONS")
    publish, subscribe = block.split("subscribe:", 1)
    allow = re.search(r"allow: \[(.*?)\]", publish, re.S)
    deny = re.search(r"deny: (\$(\w+)|\[(.*?)\])", publish, re.S)
    assert allow and deny, f"{user}: publish needs an allow and a deny list"
    if deny.group(2) is not None:  # a list shared by name (SERVICE_DENY, BOUNCE_DENY)
        named = re.search(rf"^{deny.group(2)}: \[(.*?)^\]", _conf(), re.S | re.M)
        assert named, f"nats.conf has no {deny.group(2)} list"
        denied = _list(named.group(1))
    else:
        denied = _list(deny.group(3))
    return _list(allow.group(1)), denied, _list(subscribe)


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more trailing tokens."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def _may_publish(user: str, subject: str) -> bool:
    allow, deny, _ = _permissions(user)
    return any(_matches(p, subject) for p in allow) and not any(_matches(p, subject) for p in deny)


def test_each_service_user_has_its_own_permissions_and_admin_has_all() -> None:
    users = dict(re.findall(r"\{user: (\w+), password: \$\w+(?:, permissions: \$(\w+))?\}", _conf()))
    assert {user: users[user] for user in SERVICE_USERS} == {
        user: f"{user.upper()}_PERMISSIONS" for user in SERVICE_USERS
    }
    assert users["admin"] == ""


@pytest.mark.parametrize("subject", sorted(WRITERS))
def test_only_the_services_that_write_a_subject_may_publish_to_it(subject: str) -> None:
    assert {user for user in SERVICE_USERS if _may_publish(user, subject)} == WRITERS[subject]


@pytest.mark.parametrize("user", SERVICE_USERS)
def test_a_service_user_subscribes_only_to_its_inboxes(user: str) -> None:
    """Replies to its requests, pulls and KV watches all come to nats-py's `_INBOX.` prefix;
    any other subscription would read mail or account records as they are published."""
    assert _permissions(user)[2] == ["_INBOX.>"]


@pytest.mark.parametrize("user", SERVICE_USERS)
def test_every_permission_names_what_the_topology_declares(user: str) -> None:
    """Relais subjects fall in a declared stream; buckets, streams and consumers exist."""
    config = Config()
    streams = {s.name: s.subjects or [] for s in topology.stream_configs(config)}
    consumers = {(b.stream, b.durable) for b in topology.consumer_bindings(config)}
    buckets = {kv.bucket for kv in topology.kv_configs(config)}
    allow, deny, _ = _permissions(user)
    for entry in allow + deny:
        tokens = entry.split(".")
        if tokens[0] == topology.PREFIX:
            concrete = entry.replace("*", "acme").replace(">", "x.1")
            assert any(_matches(s, concrete) for subjects in streams.values() for s in subjects), entry
        elif tokens[0] == "$KV":
            assert tokens[1] in buckets and tokens[2:] == [">"], entry
        elif tokens[0] == "$O":
            assert tokens[1:] == [topology.BODY_BUCKET, ">"], entry
        elif tokens[0] == "$JS" and tokens[1] == "ACK":
            assert tokens[2] in streams, entry
            assert tokens[3] == ">" or tokens[4:] == [">"], entry
            assert tokens[3] == ">" or (tokens[2], tokens[3]) in consumers, entry
        elif tokens[:4] == ["$JS", "API", "STREAM", "PURGE"]:
            assert tokens[4] in streams, entry
        elif tokens[:3] == ["$JS", "API", "CONSUMER"] and tokens[3] != "PAUSE":
            # A consumer rule names a declared stream: CREATE.<stream>[.>], DURABLE.CREATE.<stream>.>,
            # DELETE.<stream>.>
            stream = tokens[5] if tokens[3] == "DURABLE" else tokens[4]
            assert stream in streams, entry
        else:
            assert entry in (
                "$JS.API.>",
                "$JS.FC.>",
                "$JS.API.STREAM.CREATE.>",
                "$JS.API.STREAM.UPDATE.>",
                "$JS.API.STREAM.RESTORE.>",
                "$JS.API.STREAM.DELETE.>",
                "$JS.API.STREAM.MSG.DELETE.>",
                "$JS.API.CONSUMER.PAUSE.>",
            )
