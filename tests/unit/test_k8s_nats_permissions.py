"""The service users' permissions in deploy/k8s/base/nats.conf, read against the topology.

Who may write each subject and bucket, and who may read each stream, bucket and consumer, is
stated here once, from the services' code; the conf must grant exactly that, and name only
streams, consumers and buckets the topology declares (a renamed bucket would otherwise leave a
permission for nothing and a service refused). The integration test
(tests/integration/test_k8s_nats_permissions.py) proves the server enforces them and that
Relais runs with them.
"""

from __future__ import annotations

import re
from functools import cache

import pytest

from services.core import topology
from services.core.bus import inbox_prefix
from services.core.config import Config
from tests.unit.k8s_manifests import BASE

SERVICE_USERS = ("ingress", "router", "delivery", "bounce")

# Which users may publish to a subject, as the services' code does (grep `publish`, `publish_at`,
# the KV and Object Store writes). Schedules put their target here too: nats-server does not
# check a schedule's target against its publisher's permissions, so a service that schedules
# into a subject can write it anyway (delivery's postponed jobs, retries into relais.route).
# New mail goes to relais.submit (no schedules, no roll-ups): the ingress and bounce may not
# publish relais.route, whose stream takes both.
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
    topology.submit_subject(): {"ingress", "bounce"},
    topology.route_subject(): {"router", "delivery"},
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
    # Bodies: the ingress stores the mail's and bounce its DSNs' (chunks, then a meta); a body
    # is deleted with a meta that says so, by whichever service releases it last.
    topology.object_meta_subject(topology.BODY_BUCKET, "name"): {"ingress", "router", "delivery", "bounce"},
    topology.object_chunk_subject(topology.BODY_BUCKET, "nuid"): {"ingress", "bounce"},
    # Acks (and naks, terms, "in progress") of each durable consumer: only its service's.
    f"$JS.ACK.{topology.SUBMIT_STREAM}.{topology.SUBMIT_CONSUMER}.1.1.1.1.0": {"router"},
    f"$JS.ACK.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}.1.1.1.1.0": {"router"},
    f"$JS.ACK.{topology.DELIVER_STREAM}.{topology.VERDICT_CONSUMER}.1.1.1.1.0": {"router"},
    f"$JS.ACK.{topology.DELIVER_STREAM}.{topology.delivery_consumer('default')}.1.1.1.1.0": {"delivery"},
    f"$JS.ACK.{topology.BOUNCE_STREAM}.{topology.BOUNCE_CONSUMER}.1.1.1.1.0": {"bounce"},
    f"$JS.ACK.{topology.BOUNCE_FLUSH_STREAM}.{topology.BOUNCE_FLUSH_CONSUMER}.1.1.1.1.0": {"bounce"},
    f"$JS.ACK.{topology.INBOUND_STREAM}.{topology.INBOUND_CONSUMER}.1.1.1.1.0": {"bounce"},
    f"$JS.ACK.{topology.EVENTS_STREAM}.webhooks-acme.1.1.1.1.0": {"bounce"},
    # The per-account webhook consumers: the bounce service makes them for the account records
    # and deletes an earlier release's shared one.
    f"$JS.API.CONSUMER.DURABLE.CREATE.{topology.EVENTS_STREAM}.webhooks-acme": {"bounce"},
    f"$JS.API.CONSUMER.DELETE.{topology.EVENTS_STREAM}.webhooks": {"bounce"},
    f"$JS.API.CONSUMER.DELETE.{topology.EVENTS_STREAM}.webhooks-acme": set(),  # `admin`'s --clear
    # What none may do: only `admin` (the relais-topology pod, operators). Declaring the
    # topology (a stream update could add a republish into the delivery jobs), a consumer on a
    # mail stream (a second one on a work queue takes the service's messages).
    f"$JS.API.STREAM.CREATE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.STREAM.CREATE.{topology.kv_stream(topology.ACCOUNTS_BUCKET)}": set(),
    f"$JS.API.STREAM.UPDATE.{topology.ROUTE_STREAM}": set(),
    f"$JS.API.STREAM.UPDATE.{topology.SUBMIT_STREAM}": set(),
    f"$JS.API.STREAM.UPDATE.{topology.kv_stream(topology.WARMUP_BUCKET)}": set(),
    f"$JS.API.STREAM.RESTORE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.CONSUMER.PAUSE.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}": set(),
    f"$JS.API.CONSUMER.PAUSE.{topology.SUBMIT_STREAM}.{topology.SUBMIT_CONSUMER}": set(),
    f"$JS.API.CONSUMER.CREATE.{topology.EVENTS_STREAM}.x.relais.events.acme.delivered": {"bounce"},
    f"$JS.API.STREAM.DELETE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.STREAM.MSG.DELETE.{topology.DELIVER_STREAM}": set(),
    f"$JS.API.STREAM.MSG.DELETE.{topology.kv_stream(topology.ACCOUNTS_BUCKET)}": set(),
    **{f"$JS.API.STREAM.PURGE.{s.name}": set() for s in topology.stream_configs(Config())},
    **{
        f"$JS.API.CONSUMER.{verb}.{stream}{suffix}": set()
        for stream in MAIL_STREAMS
        for verb, suffix in CONSUMER_REQUESTS
    },
    f"$JS.API.CONSUMER.DURABLE.CREATE.{topology.EVENTS_STREAM}.x": {"bounce"},
    # Nor the bodies' stream: a purge's filter, or a deleted message's sequence, is in the
    # request's body, so a user that could purge one body's chunks could purge every queued
    # body. The relais-topology pod (`admin`) purges the bodies the services marked deleted.
    f"$JS.API.STREAM.PURGE.{topology.object_stream(topology.BODY_BUCKET)}": set(),
    f"$JS.API.STREAM.MSG.DELETE.{topology.object_stream(topology.BODY_BUCKET)}": set(),
}


def _direct_key(bucket: str, key: str) -> str:
    """What nats-py's `kv.get` asks: a direct get naming the key's subject."""
    return f"$JS.API.DIRECT.GET.{topology.kv_stream(bucket)}.{topology.kv_subject(bucket, key)}"


_ACCOUNTS = topology.kv_stream(topology.ACCOUNTS_BUCKET)
_SUPPRESSION = topology.kv_stream(topology.SUPPRESSION_BUCKET)
_BODIES = topology.object_stream(topology.BODY_BUCKET)
_REFS = topology.kv_stream(topology.BODY_REFS_BUCKET)
# Which users may read a stream, bucket or consumer, as the services' code does (grep
# `pull_subscribe_bind`, `get_last`, `get_next`, `leader_last`, `kv.get`, `follow`, `stored`,
# `watch`): pulls from a consumer (MSG.NEXT), direct gets (batched, with the subjects in the
# request; or naming one subject, as `kv.get` does), gets through the stream leader
# (STREAM.MSG.GET), and watches (an ordered consumer per watch, made by nats-py 2.16 on
# CONSUMER.CREATE.<stream> with its filter in the body). Anything else, another service's
# consumer or bucket, is refused: a leaked password reads only what its service reads.
READERS: dict[str, set[str]] = {
    # Info: names, counts and settings (start-up topology check, readiness, consumer lag).
    f"$JS.API.STREAM.INFO.{topology.DELIVER_STREAM}": ALL,
    f"$JS.API.STREAM.INFO.{_ACCOUNTS}": ALL,
    f"$JS.API.STREAM.INFO.{topology.SUBMIT_STREAM}": ALL,
    f"$JS.API.CONSUMER.INFO.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}": ALL,
    f"$JS.API.CONSUMER.INFO.{topology.SUBMIT_STREAM}.{topology.SUBMIT_CONSUMER}": ALL,
    f"$JS.API.CONSUMER.INFO.{_ACCOUNTS}.ordered": ALL,
    "$JS.FC.KV_relais-accounts.x": ALL,
    # Pulls: each service from its own consumers only.
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.SUBMIT_STREAM}.{topology.SUBMIT_CONSUMER}": {"router"},
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.ROUTE_STREAM}.{topology.ROUTER_CONSUMER}": {"router"},
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.DELIVER_STREAM}.{topology.VERDICT_CONSUMER}": {"router"},
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.DELIVER_STREAM}.{topology.delivery_consumer('default')}": {
        "delivery"
    },
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.BOUNCE_STREAM}.{topology.BOUNCE_CONSUMER}": {"bounce"},
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.BOUNCE_FLUSH_STREAM}.{topology.BOUNCE_FLUSH_CONSUMER}": {"bounce"},
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.INBOUND_STREAM}.{topology.INBOUND_CONSUMER}": {"bounce"},
    f"$JS.API.CONSUMER.MSG.NEXT.{topology.EVENTS_STREAM}.webhooks-acme": {"bounce"},
    # The account records (password hashes, webhook secrets): the ingress (logins) and bounce
    # (webhooks) watch them, the router reads one by key (pool, DKIM); delivery never.
    f"$JS.API.CONSUMER.CREATE.{_ACCOUNTS}": {"ingress", "bounce"},
    f"$JS.API.STREAM.MSG.GET.{_ACCOUNTS}": {"ingress", "bounce"},
    _direct_key(topology.ACCOUNTS_BUCKET, "acme"): {"ingress", "router"},
    f"$JS.API.DIRECT.GET.{_ACCOUNTS}": set(),
    # The suppression list: the router checks recipients (batched direct get), bounce keeps it.
    f"$JS.API.DIRECT.GET.{_SUPPRESSION}": {"router"},
    _direct_key(topology.SUPPRESSION_BUCKET, "acme.key"): {"bounce"},
    f"$JS.API.CONSUMER.CREATE.{_SUPPRESSION}": {"bounce"},
    f"$JS.API.STREAM.MSG.GET.{_SUPPRESSION}": {"bounce"},
    # Each service's own buckets.
    f"$JS.API.DIRECT.GET.{topology.LIMITS_STREAM}": {"ingress"},
    f"$JS.API.CONSUMER.CREATE.{topology.kv_stream(topology.SESSIONS_BUCKET)}": {"ingress"},
    f"$JS.API.DIRECT.GET.{topology.kv_stream(topology.WARMUP_BUCKET)}": {"router"},
    _direct_key(topology.SHAPING_BUCKET, "key"): {"delivery"},
    f"$JS.API.CONSUMER.CREATE.{topology.kv_stream(topology.DELIVERY_CONTROL_BUCKET)}": {"delivery"},
    f"$JS.API.STREAM.MSG.GET.{topology.kv_stream(topology.DELIVERY_CONTROL_BUCKET)}": {"delivery"},
    f"$JS.API.STREAM.MSG.GET.{topology.kv_stream(topology.BOUNCE_HOLD_BUCKET)}": {"bounce"},
    # Bodies: the ingress only stores them (no look-up first: a name is written once), the
    # others read them (direct gets of the meta and chunks, the leader's word before "gone").
    f"$JS.API.DIRECT.GET.{_BODIES}": {"router", "delivery", "bounce"},
    f"$JS.API.STREAM.MSG.GET.{_BODIES}": {"router", "delivery", "bounce"},
    f"$JS.API.CONSUMER.CREATE.{_BODIES}": set(),
    f"$JS.API.STREAM.MSG.GET.{_REFS}": {"router", "delivery", "bounce"},
    # `relais requeue`, run in a delivery pod, reads the retry schedules where they are stored;
    # bounce reads a job's own before it sends a delay warning that came late.
    f"$JS.API.STREAM.MSG.GET.{topology.ROUTE_STREAM}": {"delivery", "bounce"},
    f"$JS.API.STREAM.MSG.GET.{topology.DELIVER_STREAM}": {"delivery", "bounce"},
    # New mail holds no retry schedule: nobody reads it but the router, through its consumer.
    f"$JS.API.STREAM.MSG.GET.{topology.SUBMIT_STREAM}": set(),
    f"$JS.API.DIRECT.GET.{topology.DELIVER_STREAM}": set(),
    # The events: only bounce's webhook consumers; `relais status` and `relais message` read them
    # as `admin`, in the relais-topology pod.
    f"$JS.API.CONSUMER.CREATE.{topology.EVENTS_STREAM}": set(),
    f"$JS.API.STREAM.MSG.GET.{topology.EVENTS_STREAM}": set(),
}


@cache
def _conf() -> str:
    return (BASE / "nats.conf").read_text()


def _list(text: str) -> list[str]:
    """The quoted entries of a conf list, its comments left out."""
    return re.findall(r'"([^"]+)"', re.sub(r"#[^\n]*", "", text))


def _block(name: str) -> str:
    match = re.search(rf"^{name}: \{{(.*?)^\}}", _conf(), re.S | re.M)
    assert match, f"nats.conf has no {name} block"
    return match.group(1)


def _permissions(user: str) -> tuple[list[str], list[str], list[str]]:
    """(publish allow, publish deny, subscribe allow) of a service user."""
    block = _block(f"{user.upper()}_PERMISSIONS")
    publish, subscribe = block.split("subscribe:", 1)
    allow = re.search(r"allow: \[(.*?)\]", publish, re.S)
    deny = re.search(r"deny: \[(.*?)\]", publish, re.S)
    assert allow, f"{user}: publish needs an allow list"
    return _list(allow.group(1)), _list(deny.group(1)) if deny else [], _list(subscribe)


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


@pytest.mark.parametrize("subject", sorted(READERS))
def test_only_the_services_that_read_a_stream_may_ask_for_its_messages(subject: str) -> None:
    assert {user for user in SERVICE_USERS if _may_publish(user, subject)} == READERS[subject]


@pytest.mark.parametrize("user", SERVICE_USERS)
def test_a_service_user_subscribes_only_to_its_own_inboxes(user: str) -> None:
    """Replies to its requests, pulls and KV watches all come to its inboxes, named by
    `inbox_prefix` for its user: a subscription to another user's inboxes would read what that
    service pulls and watches, any other one mail or account records as they are published."""
    assert _permissions(user)[2] == [f"{inbox_prefix(user)}.>"]
    others = [f"{inbox_prefix(other)}.x.y" for other in SERVICE_USERS if other != user]
    assert not any(_matches(f"{inbox_prefix(user)}.>", inbox) for inbox in [*others, "_INBOX.x.y"])


def test_only_a_user_name_that_is_one_subject_token_names_its_inboxes() -> None:
    """A user's inboxes are `_INBOX.<user>.<id>` when its name is one subject token (a dot, a
    space or a wildcard would make other subjects or invalid ones); otherwise, and without a
    user name (a token, a creds file, `relais up`), a connection keeps nats-py's prefix."""
    assert inbox_prefix("delivery") == "_INBOX.delivery"
    assert inbox_prefix("ops.team") == inbox_prefix("") == inbox_prefix(None) == "_INBOX"


@pytest.mark.parametrize("user", SERVICE_USERS)
def test_every_permission_names_what_the_topology_declares(user: str) -> None:
    """Relais subjects fall in a declared stream; buckets, streams and consumers exist."""
    config = Config()
    streams = {s.name: s.subjects or [] for s in topology.stream_configs(config)}
    consumers = {(b.stream, b.durable) for b in topology.consumer_bindings(config)}
    buckets = {kv.bucket for kv in topology.kv_configs(config)}
    # The streams behind the buckets and the body store, which JetStream names.
    stores = {topology.kv_stream(b) for b in buckets} | {topology.object_stream(topology.BODY_BUCKET)}
    allow, deny, _ = _permissions(user)
    for entry in allow + deny:
        tokens = entry.split(".")
        if tokens[0] == topology.PREFIX:
            concrete = entry.replace("*", "acme").replace(">", "x.1")
            assert any(_matches(s, concrete) for subjects in streams.values() for s in subjects), entry
        elif tokens[0] == "$KV":
            assert tokens[1] in buckets and tokens[2:] == [">"], entry
        elif tokens[0] == "$O":
            # The body store, or its metas only (object_meta_subject)
            assert tokens[1:] in ([topology.BODY_BUCKET, ">"], [topology.BODY_BUCKET, "M", ">"]), entry
        elif tokens[0] == "$JS" and tokens[1] == "ACK":
            assert tokens[2] in streams, entry
            assert tokens[3] == ">" or tokens[4:] == [">"], entry
            assert tokens[3] == ">" or (tokens[2], tokens[3]) in consumers, entry
        elif tokens[:4] in (["$JS", "API", "STREAM", "PURGE"], ["$JS", "API", "STREAM", "MSG"]):
            # STREAM.PURGE.<stream>, STREAM.MSG.GET.<stream>
            assert tokens[4 if tokens[3] == "PURGE" else 5] in streams.keys() | stores, entry
        elif tokens[:4] == ["$JS", "API", "DIRECT", "GET"]:
            # DIRECT.GET.<stream>, or DIRECT.GET.<bucket's stream>.$KV.<bucket>.> as `kv.get` asks
            assert tokens[4] in streams.keys() | stores, entry
            assert tokens[5:] in ([], [">"]), entry
        elif tokens[:5] == ["$JS", "API", "CONSUMER", "MSG", "NEXT"]:
            # Its own consumers; delivery-<pool> and webhooks-<account> as <stream>.*
            assert (tokens[5], tokens[6]) in consumers or (tokens[5] in streams and tokens[6] == "*"), entry
        elif tokens[:3] == ["$JS", "API", "CONSUMER"] and tokens[3] != "INFO":
            # A consumer rule names a declared stream: CREATE.<stream>[.*.>],
            # DURABLE.CREATE.<stream>.*, DELETE.<stream>.<name>
            stream = tokens[5] if tokens[3] == "DURABLE" else tokens[4]
            assert stream in streams.keys() | stores, entry
        else:
            assert entry in ("$JS.API.STREAM.INFO.*", "$JS.API.CONSUMER.INFO.*.*", "$JS.FC.>"), entry
