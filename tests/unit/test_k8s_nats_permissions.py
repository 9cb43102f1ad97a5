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
    # Every service declares the whole topology at start.
    f"$JS.API.STREAM.UPDATE.{topology.DELIVER_STREAM}": {"ingress", "router", "delivery", "bounce"},
    f"$JS.API.CONSUMER.CREATE.{topology.DELIVER_STREAM}.x": {"ingress", "router", "delivery", "bounce"},
    # What none may do: only `admin` (operators).
    f"$JS.API.STREAM.DELETE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.STREAM.MSG.DELETE.{topology.DELIVER_STREAM}": set(),
    **{f"$JS.API.STREAM.PURGE.{s.name}": set() for s in topology.stream_configs(Config())},
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
    deny = re.search(r"deny: (\$SERVICE_DENY|\[(.*?)\])", publish, re.S)
    assert allow and deny, f"{user}: publish needs an allow and a deny list"
    shared = _conf().split("SERVICE_DENY: [", 1)[1].split("]", 1)[0]
    denied = _list(shared if deny.group(2) is None else deny.group(2))
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
        else:
            assert entry in (
                "$JS.API.>",
                "$JS.FC.>",
                "$JS.API.STREAM.DELETE.>",
                "$JS.API.STREAM.MSG.DELETE.>",
            )
