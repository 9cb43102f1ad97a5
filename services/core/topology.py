"""The JetStream topology: every stream, subject, consumer and bucket Relais uses.

This module is the only place that builds or parses subject and consumer names, and the only
place that declares streams; services bind to what `ensure_topology` created, either at their
own start or, with `nats.declare_topology = false`, as an operator applied it
(`relais topology apply`): they then only check that it exists (`missing_topology`).

    relais.submit                     accepted messages and DSNs -> router-submit
    relais.route                      retries of deferred jobs, jobs routed again -> router
    relais.retry.route.<key>.<n>      scheduled re-route after a DNS failure (ADR-51 schedule)
    relais.deliver.<pool>             delivery jobs, partitioned by IP pool -> delivery-<pool>
    relais.retry.deliver.<key>.<n>    scheduled retry of a deferred job (ADR-51 schedule)
    relais.verdict                    jobs the router settles itself (bounce, defer) -> router-verdicts
    relais.bounce                     permanent failures and expiries -> bounce
    relais.bounce.window.<msg>.<win>  end of one DSN window of a message (ADR-51 schedule)
    relais.bounce.flush               fired by a window's schedule: one DSN for it -> bounce-flush
    relais.events.<account>.<kind>    every outcome, replayable per account
    relais.inbound                    mail to Relais' own domains (bounces, FBL reports) -> bounce-inbound
    relais.limits.<kind>.<key>.<win>  ingress counters (ADR-49): messages per account per hour/day,
                                      AUTH failures per IP/user per lockout window
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from services.core.accounts import AccountRecordError, decode_account
from services.core.config import AccountConfig, Config

log = logging.getLogger(__name__)

PREFIX = "relais"
# New mail (the ingress's accepted messages, bounce's DSNs) has a stream of its own, which takes
# no schedules: nats-server gives a stream that takes schedules roll-ups too (and a schedule is
# stored as a roll-up of its subject), so whoever may publish one of its subjects can empty it.
# Only the router and delivery publish to the route stream, whose retries are schedules.
SUBMIT_STREAM = "RELAIS_SUBMIT"
ROUTE_STREAM = "RELAIS_ROUTE"
DELIVER_STREAM = "RELAIS_DELIVER"
BOUNCE_STREAM = "RELAIS_BOUNCE"
EVENTS_STREAM = "RELAIS_EVENTS"
INBOUND_STREAM = "RELAIS_INBOUND"
BODY_BUCKET = "relais-bodies"
BODY_REFS_BUCKET = "relais-body-refs"
ROUTER_CONSUMER = "router"
SUBMIT_CONSUMER = "router-submit"
VERDICT_CONSUMER = "router-verdicts"
BOUNCE_CONSUMER = "bounce"
INBOUND_CONSUMER = "bounce-inbound"
# One DSN per message and window (bounce.dsn_window): the notices of a message's domain jobs wait
# in the hold bucket until the window's schedule fires a flush on the flush stream.
BOUNCE_FLUSH_STREAM = "RELAIS_BOUNCE_FLUSH"
BOUNCE_FLUSH_CONSUMER = "bounce-flush"
BOUNCE_HOLD_BUCKET = "relais-bounce-hold"
# Posts an account's events to its webhook: one consumer per account with a webhook
# (`webhooks-<account>`), so a dead receiver never slows mail nor another account's webhook, and
# none for accounts without one, whose mail then costs no delivery and ack of each event (about
# 2.6 NATS messages per mail, and a replicated consumer-state write per ack on a cluster).
WEBHOOKS_CONSUMER_PREFIX = "webhooks-"
# What earlier releases used: one consumer for every account with a webhook. A dead receiver's
# events, nak'ed and waiting, filled its ack-pending limit and stopped every other account's.
LEGACY_WEBHOOKS_CONSUMER = "webhooks"
SUPPRESSION_BUCKET = "relais-suppression"
# Delivery shaping shared by every delivery worker: rate slots and connection leases per
# (source IP, site), and the control flags (pause, push-back back-off) every worker watches.
SHAPING_BUCKET = "relais-shaping"
DELIVERY_CONTROL_BUCKET = "relais-delivery-control"
# A back-off is stored with a per-message TTL (ADR-43) and expires when it ends; JetStream then
# writes a marker that tells every watching worker, and removes that marker after this long.
# Pauses carry no TTL and stay until resumed; a resume's marker is removed after this long too.
DELIVERY_CONTROL_MARKER_TTL = 300.0
# Warm-up/daily-cap counters per (UTC day, source, site), shared by every router replica.
WARMUP_BUCKET = "relais-warmup"
LIMITS_STREAM = "RELAIS_LIMITS"
ACCOUNTS_BUCKET = "relais-accounts"
# One key per (account, ingress replica): that replica's open sessions, refreshed while alive.
SESSIONS_BUCKET = "relais-ingress-sessions"
SESSIONS_TTL = 60.0
LIMIT_KINDS = ("msg-hour", "msg-day", "authfail-ip", "authfail-user", "auth-known")

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
EVENT_KINDS = ("accepted", "delivered", "deferred", "bounced", "expired", "suppressed", "complained")


class SubjectError(ValueError):
    """A name that cannot be a single NATS subject token, or a subject that is not Relais'."""


def _token(value: str, what: str) -> str:
    if not _TOKEN.match(value):
        raise SubjectError(f"{what} {value!r} is not a valid subject token")
    return value


def submit_subject() -> str:
    """New mail for the router: what the ingress accepted, the DSNs bounce writes."""
    return f"{PREFIX}.submit"


def route_subject() -> str:
    """Mail for the router again: deferred jobs' retries (fired by their schedules), jobs it
    hands back to be routed alone."""
    return f"{PREFIX}.route"


_ROUTE_RETRIES = f"{PREFIX}.retry.route.>"
_DELIVER_RETRIES = f"{PREFIX}.retry.deliver.>"


def route_retry_subject(key: str, attempt: int) -> str:
    return f"{PREFIX}.retry.route.{_token(key, 'key')}.{attempt}"


def deliver_subject(pool: str) -> str:
    return f"{PREFIX}.deliver.{_token(pool, 'pool')}"


def deliver_filter() -> str:
    """Every pool's delivery jobs (not their retry schedules)."""
    return f"{PREFIX}.deliver.>"


def verdict_subject() -> str:
    """The router's verdicts (`envelope.Verdict`). In the delivery stream, beside the delivery
    jobs, so that a job's verdict and its delivery job share one msg id namespace."""
    return f"{PREFIX}.verdict"


def deliver_retry_subject(key: str, attempt: int) -> str:
    return f"{PREFIX}.retry.deliver.{_token(key, 'key')}.{attempt}"


# The subjects that carry an id or an account: (tokens before the variable part, names of the
# variable tokens). Spans are named by their template.
_TEMPLATED_SUBJECTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    ((PREFIX, "retry", "route"), ("{key}", "{attempt}")),
    ((PREFIX, "retry", "deliver"), ("{key}", "{attempt}")),
    ((PREFIX, "bounce", "window"), ("{message_id}", "{window}")),
    ((PREFIX, "events"), ("{account}",)),
)


def subject_template(subject: str) -> str:
    """The low-cardinality form of a subject that names one job, DSN window or account
    (`relais.retry.route.{key}.{attempt}`); the subject itself when it has no variable part.

    Span names use it, as OpenTelemetry's messaging conventions ask: trace backends index span
    names (Jaeger's operations, Tempo's span-name values), and a name per deferred job grows that
    index by one per retry, for ever. The subject stays in `messaging.destination.name`."""
    parts = subject.split(".")
    for fixed, variable in _TEMPLATED_SUBJECTS:
        n = len(fixed)
        if tuple(parts[:n]) == fixed and len(parts) >= n + len(variable):
            return ".".join((*fixed, *variable, *parts[n + len(variable) :]))
    return subject


def pool_of_deliver_subject(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) != 3 or parts[:2] != [PREFIX, "deliver"]:
        raise SubjectError(f"not a delivery subject: {subject!r}")
    return parts[2]


def bounce_subject() -> str:
    return f"{PREFIX}.bounce"


def bounce_flush_subject() -> str:
    return f"{PREFIX}.bounce.flush"


def bounce_window_subject(message_id: str, window: str) -> str:
    """The schedule subject of one DSN window; one subject per window, so re-publishing its
    schedule (a redelivered notice) replaces it instead of adding a second flush."""
    return f"{PREFIX}.bounce.window.{_token(message_id, 'message id')}.{_token(window, 'window')}"


def inbound_subject() -> str:
    return f"{PREFIX}.inbound"


# JetStream's own naming of the streams behind KV buckets and object stores (ADR-8, ADR-20),
# for the direct gets that read them without nats-py's per-read consumers.
def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


def object_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def object_meta_subject(bucket: str, encoded_name: str) -> str:
    """`encoded_name`: the object's name, URL-safe base64 as the object store writes it."""
    return f"$O.{bucket}.M.{encoded_name}"


def object_chunk_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def limit_subject(kind: str, key: str, window: int) -> str:
    """A counter subject; `key` is an account name or an already tokenised IP/user digest."""
    if kind not in LIMIT_KINDS:
        raise SubjectError(f"unknown limit kind {kind!r}")
    return f"{PREFIX}.limits.{kind}.{_token(key, 'key')}.{int(window)}"


def parse_limit_subject(subject: str) -> tuple[str, str, int]:
    parts = subject.split(".")
    if len(parts) != 5 or parts[:2] != [PREFIX, "limits"] or parts[2] not in LIMIT_KINDS:
        raise SubjectError(f"not a limit subject: {subject!r}")
    return parts[2], parts[3], int(parts[4])


def event_subject(account: str, kind: str) -> str:
    if kind not in EVENT_KINDS:
        raise SubjectError(f"unknown event kind {kind!r}")
    return f"{PREFIX}.events.{_token(account or '_', 'account')}.{kind}"


def parse_event_subject(subject: str) -> tuple[str, str]:
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != [PREFIX, "events"] or parts[3] not in EVENT_KINDS:
        raise SubjectError(f"not an event subject: {subject!r}")
    return parts[2], parts[3]


def events_filter(account: str | None = None) -> str:
    return f"{PREFIX}.events.{_token(account, 'account') if account else '*'}.*"


def retry_filters() -> list[tuple[str, str]]:
    """(stream, subject filter) of every scheduled retry, for admin scans (requeue, bounce-queue)."""
    return [(ROUTE_STREAM, _ROUTE_RETRIES), (DELIVER_STREAM, _DELIVER_RETRIES)]


def job_retry_filters(key: str) -> list[tuple[str, str]]:
    """(stream, subject filter) of one job's scheduled retries, whatever their round."""
    token = _token(key, "key")
    return [
        (ROUTE_STREAM, f"{PREFIX}.retry.route.{token}.*"),
        (DELIVER_STREAM, f"{PREFIX}.retry.deliver.{token}.*"),
    ]


def delivery_consumer(pool: str) -> str:
    return f"delivery-{_token(pool, 'pool')}"


def pool_of_delivery_consumer(name: str) -> str:
    if not name.startswith("delivery-"):
        raise SubjectError(f"not a delivery consumer: {name!r}")
    return name[len("delivery-") :]


# What one page of a JetStream consumer list holds at most (the server's JSApiListLimit).
_CONSUMER_LIST_PAGE = 256


async def delivery_pools(js: JetStreamContext) -> list[str]:
    """The cluster's pools: those with a delivery consumer, whichever config file declared them
    (`relais pause pool` runs with only `--nats-url`). Sorted; raises NotFoundError when there is
    no delivery stream (no Relais topology)."""
    pools: list[str] = []
    offset = 0
    while True:
        page = await js.consumers_info(DELIVER_STREAM, offset=offset)
        pools += [pool_of_delivery_consumer(c.name) for c in page if c.name.startswith("delivery-")]
        if len(page) < _CONSUMER_LIST_PAGE:
            return sorted(pools)
        offset += len(page)


@dataclass(frozen=True)
class ConsumerBinding:
    """What a service needs to pull from one durable consumer."""

    stream: str
    durable: str
    subject: str


def router_binding() -> ConsumerBinding:
    return ConsumerBinding(ROUTE_STREAM, ROUTER_CONSUMER, route_subject())


def submit_binding() -> ConsumerBinding:
    return ConsumerBinding(SUBMIT_STREAM, SUBMIT_CONSUMER, submit_subject())


def verdict_binding() -> ConsumerBinding:
    return ConsumerBinding(DELIVER_STREAM, VERDICT_CONSUMER, verdict_subject())


def delivery_binding(pool: str) -> ConsumerBinding:
    return ConsumerBinding(DELIVER_STREAM, delivery_consumer(pool), deliver_subject(pool))


def bounce_binding() -> ConsumerBinding:
    return ConsumerBinding(BOUNCE_STREAM, BOUNCE_CONSUMER, bounce_subject())


def bounce_flush_binding() -> ConsumerBinding:
    return ConsumerBinding(BOUNCE_FLUSH_STREAM, BOUNCE_FLUSH_CONSUMER, bounce_flush_subject())


def inbound_binding() -> ConsumerBinding:
    return ConsumerBinding(INBOUND_STREAM, INBOUND_CONSUMER, inbound_subject())


def webhooks_binding(account: str) -> ConsumerBinding:
    return ConsumerBinding(
        EVENTS_STREAM, f"{WEBHOOKS_CONSUMER_PREFIX}{_token(account, 'account')}", events_filter(account)
    )


def webhook_accounts(accounts: Mapping[str, AccountConfig]) -> list[str]:
    """The accounts whose events are posted to a webhook, each through a consumer of its own."""
    return sorted(name for name, account in accounts.items() if account.webhook_url)


def stream_configs(config: Config) -> list[StreamConfig]:
    replicas = config.nats.replicas
    common = dict(
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=config.nats.duplicate_window,
    )
    return [
        StreamConfig(
            name=SUBMIT_STREAM,
            subjects=[submit_subject()],
            retention=RetentionPolicy.WORK_QUEUE,
            # What JetStream defaults to, said here because it is the point of this stream: no
            # `Nats-Rollup: all` from a publisher empties the queue of accepted mail.
            allow_rollup_hdrs=False,
            **common,
        ),
        StreamConfig(
            name=ROUTE_STREAM,
            subjects=[route_subject(), _ROUTE_RETRIES],
            retention=RetentionPolicy.WORK_QUEUE,
            allow_msg_schedules=True,
            **common,
        ),
        StreamConfig(
            name=DELIVER_STREAM,
            subjects=[deliver_filter(), _DELIVER_RETRIES, verdict_subject()],
            retention=RetentionPolicy.WORK_QUEUE,
            allow_msg_schedules=True,
            **common,
        ),
        StreamConfig(
            name=BOUNCE_STREAM,
            subjects=[bounce_subject()],
            retention=RetentionPolicy.WORK_QUEUE,
            **common,
        ),
        StreamConfig(
            name=BOUNCE_FLUSH_STREAM,
            # ADR-51: a schedule's target must be in the schedule's own stream.
            subjects=[bounce_flush_subject(), f"{PREFIX}.bounce.window.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            allow_msg_schedules=True,
            **common,
        ),
        StreamConfig(
            name=INBOUND_STREAM,
            subjects=[inbound_subject()],
            retention=RetentionPolicy.WORK_QUEUE,
            **common,
        ),
        StreamConfig(
            name=LIMITS_STREAM,
            subjects=[f"{PREFIX}.limits.>"],
            retention=RetentionPolicy.LIMITS,
            allow_msg_counter=True,
            # The AUTH throttle reads a client's IP and user counters in one batched direct get.
            allow_direct=True,
            # Longest window is a day; older counters are only history.
            max_age=2 * 86400.0,
            storage=StorageType.FILE,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[f"{PREFIX}.events.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=config.nats.events_max_age,
            # Bounded in size too, the oldest events making room: they share the servers' file
            # store with the mail queues, and a full store refuses every write (451 to all mail).
            max_bytes=config.nats.events_max_bytes or -1,  # JetStream's "no limit"
            discard=DiscardPolicy.OLD,
            **common,
        ),
    ]


def consumer_bindings(config: Config) -> list[ConsumerBinding]:
    return [
        submit_binding(),
        router_binding(),
        verdict_binding(),
        bounce_binding(),
        bounce_flush_binding(),
        inbound_binding(),
        *(delivery_binding(p) for p in sorted(config.pools)),
    ]


def consumer_config(binding: ConsumerBinding, config: Config) -> ConsumerConfig:
    """The declared configuration of a service's durable consumer."""
    return ConsumerConfig(
        durable_name=binding.durable,
        filter_subject=binding.subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=config.nats.ack_wait,
        max_deliver=-1,
        max_ack_pending=20000,
        max_waiting=512,
    )


async def _ensure_stream(js: JetStreamContext, stream: StreamConfig) -> None:
    """Create the stream, or bring an existing one to the declared shape. An existing stream is
    updated, never added again: a single server adding it again reserves a capped stream's
    `max_bytes` a second time, and refuses (10047) a cap over half its store."""
    try:
        current = (await js.stream_info(stream.name)).config
    except NotFoundError:
        try:
            await js.add_stream(stream)
            return
        except BadRequestError as exc:
            if exc.err_code != 10058:  # not "created meanwhile by another replica"
                raise
            current = (await js.stream_info(stream.name)).config
    await js.update_stream(_keeping_later_subjects(current, stream))


def _keeping_later_subjects(current: StreamConfig, stream: StreamConfig) -> StreamConfig:
    """The declared stream plus the subjects it holds beyond them, which a later release added.
    A replica of this release restarting during a rolling upgrade must not take them away from
    the later release's replicas, whose publishes to them would find no stream."""
    later = [s for s in current.subjects or [] if s not in (stream.subjects or [])]
    return replace(stream, subjects=[*(stream.subjects or []), *later]) if later else stream


# Buckets written in atomic batches, a setting KeyValueConfig cannot carry: the router stores a
# job's warm-up counts and its verdict in one (ADR-50).
_ATOMIC_BUCKETS = (WARMUP_BUCKET,)


async def ensure_topology(js: JetStreamContext, config: Config) -> None:
    """Create (or update) every stream, consumer and bucket. Safe to run from every replica."""
    for stream in stream_configs(config):
        await _ensure_stream(js, stream)
    for binding in consumer_bindings(config):
        await js.add_consumer(binding.stream, consumer_config(binding, config))
    # The file's webhooks, unless their account records cleared them since.
    file_webhooks = await _file_webhooks_in_force(js, config)
    await ensure_webhooks_consumers(js, config, reconcile=False, accounts=file_webhooks)
    await _ensure_body_store(js, config)
    for bucket in kv_configs(config):
        await _ensure_kv(js, bucket)
    for bucket in _ATOMIC_BUCKETS:
        await _bring_stream_to(js, kv_stream(bucket), {"allow_atomic": True})


class TopologyMissing(RuntimeError):
    """What a service that does not declare the topology (`nats.declare_topology = false`) needs
    and JetStream does not have yet: an operator has not applied this release's topology."""


async def missing_topology(js: JetStreamContext, config: Config) -> list[str]:
    """What `ensure_topology` would create and is not there: streams (or the subjects this
    release added to one), consumers, the body store, buckets (or the settings their writers
    need). Only reads (stream and consumer info), so a user without the right to change streams
    can ask."""
    missing: list[str] = []
    for stream in stream_configs(config):
        try:
            current = (await js.stream_info(stream.name)).config
        except NotFoundError:
            missing.append(stream.name)
            continue
        absent = [s for s in stream.subjects or [] if s not in (current.subjects or [])]
        if absent:
            missing.append(f"{stream.name} subjects {', '.join(absent)}")
    for binding in consumer_bindings(config):
        if not await _exists(js.consumer_info(binding.stream, binding.durable)):
            missing.append(f"{binding.stream} consumer {binding.durable}")
    if not await _exists(js.stream_info(object_stream(BODY_BUCKET))):
        missing.append(object_stream(BODY_BUCKET))
    for bucket in kv_configs(config):
        missing += await _missing_bucket(js, bucket)
    return missing


async def _missing_bucket(js: JetStreamContext, bucket: KeyValueConfig) -> list[str]:
    """The bucket, or the settings its writers need: per-message TTLs and atomic batches, without
    which their writes would be refused. Its other settings (expiry markers among them)
    `ensure_topology` brings in line, but the services work without them."""
    name = kv_stream(bucket.bucket)
    try:
        current = (await js.stream_info(name)).config
    except NotFoundError:
        return [name]
    missing = []
    if _message_ttls(bucket) and not current.allow_msg_ttl:
        missing.append(f"{name} per-message TTL")
    if bucket.bucket in _ATOMIC_BUCKETS and not current.allow_atomic:
        missing.append(f"{name} atomic batches")
    return missing


async def _exists(lookup: Awaitable[object]) -> bool:
    try:
        await lookup
    except NotFoundError:
        return False
    return True


async def ensure_or_check_topology(js: JetStreamContext, config: Config) -> None:
    """At a service's start: declare the topology (`nats.declare_topology`, the default), or
    check that an operator applied it; raises `TopologyMissing` naming what is not there yet."""
    if config.nats.declare_topology:
        await ensure_topology(js, config)
        return
    missing = await missing_topology(js, config)
    if missing:
        what = "; ".join(missing)
        raise TopologyMissing(f"not applied yet (relais topology apply): missing {what}")


def body_ttl(config: Config) -> float:
    """Bodies (and their reference counts) outlive the longest possible retry, so that a leaked
    reference still expires."""
    return config.retry.max_age + 2 * 86400


async def _ensure_body_store(js: JetStreamContext, config: Config) -> None:
    ttl, replicas = body_ttl(config), config.nats.replicas
    try:
        await js.create_object_store(
            BODY_BUCKET, ObjectStoreConfig(ttl=ttl, replicas=replicas, storage=StorageType.FILE)
        )
    except BadRequestError as exc:
        # Made with another `retry.max_age` or `nats.replicas`: follow the configuration, as
        # buckets do, rather than refuse to start every service.
        if exc.err_code != 10058:
            raise
    # No roll-ups, which the Object Store turns on: `Nats-Rollup: all` on any subject a
    # service user may publish to would empty the stream of every queued body. Relais writes
    # and deletes bodies without them (services.core.bodies).
    declared = {"max_age": ttl, "num_replicas": replicas, "allow_rollup_hdrs": False}
    await _bring_stream_to(js, object_stream(BODY_BUCKET), declared)


async def ensure_webhooks_consumers(
    js: JetStreamContext, config: Config, *, reconcile: bool, accounts: Iterable[str] | None = None
) -> None:
    """One consumer per account with a webhook, filtered on that account's events: `accounts`,
    by default those of the config file with a `webhook_url`.

    `ensure_topology` (every service at start, or `relais topology apply` where they do not
    declare) creates the missing ones for the config file's accounts, so events are kept from
    the first start on, but not where an account record cleared the file's webhook (`--clear`
    deleted that consumer); the bounce service and `relais account webhook` create them for
    the account records in KV (on Kubernetes the bounce user is the one service user allowed to).
    No service deletes one: a replica still on the previous configuration during a rollout
    would delete what the current one needs (and every minute again, losing the events in
    between). NATS removes a consumer nobody has pulled from
    for `events_max_age`, by when its events have left the stream anyway; until then, a webhook
    configured again resumes where it stopped. Only `relais account webhook --clear`, an
    operator's decision, deletes one at once. The bounce service, which posts them, deletes an
    earlier release's shared consumer (`reconcile`), at its start and every minute after. While
    that one exists, only the bounce service creates the per-account ones (see below).

    A consumer created here starts at the stream's end, so a newly configured webhook receives
    the events from then on, not the stream's history (as Postmark and SendGrid do). Replacing
    the shared consumer, each account's starts after the shared one's ack floor: none is
    skipped, and every event after the oldest one it had not acknowledged (of any account) is
    posted again; receivers drop those by `event_id`."""
    names = webhook_accounts(config.accounts) if accounts is None else accounts
    wanted = [webhooks_binding(name) for name in names]
    try:
        legacy: ConsumerInfo | None = await js.consumer_info(EVENTS_STREAM, LEGACY_WEBHOOKS_CONSUMER)
    except NotFoundError:
        legacy = None
    if legacy is not None and not reconcile:
        # An upgrade in progress: the earlier release's bounce replicas still post through the
        # shared consumer. The replacements start where it stands when they are made, so only
        # the bounce service makes them, just before it deletes the shared one; made earlier
        # (by a router upgraded first), they would post everything it posts meanwhile again.
        return
    idle_limit = config.nats.events_max_age
    for binding in wanted:
        try:
            existing = await js.consumer_info(binding.stream, binding.durable)
        except NotFoundError:
            existing = None
        if existing is not None:
            if (existing.config.inactive_threshold or 0.0) != idle_limit:  # the server omits 0
                # Made by a release that deleted unwanted consumers itself.
                existing.config.inactive_threshold = idle_limit
                await js.add_consumer(binding.stream, existing.config)
            continue
        declared = consumer_config(binding, config)
        declared.deliver_policy = DeliverPolicy.NEW
        declared.inactive_threshold = idle_limit
        if legacy is not None and _legacy_covers(legacy, binding.subject):
            declared.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            declared.opt_start_seq = legacy.ack_floor.stream_seq + 1
        log.info("creating webhooks consumer %s", binding.durable)
        await js.add_consumer(binding.stream, declared)
    if reconcile and legacy is not None:
        log.info("deleting webhooks consumer %s", LEGACY_WEBHOOKS_CONSUMER)
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(EVENTS_STREAM, LEGACY_WEBHOOKS_CONSUMER)


async def _file_webhooks_in_force(js: JetStreamContext, config: Config) -> list[str]:
    """The config file's accounts with a webhook, less those whose account record has none.

    The file only seeds a record. Once `relais account webhook --clear` emptied it and deleted
    the consumer, a consumer made again at the next start would keep the account's events
    unposted, and a webhook set later would get all of them rather than those from then on.
    No record (none seeded yet, or deleted) leaves the file's webhook in force."""
    names = webhook_accounts(config.accounts)
    if not names:
        return []
    try:
        records = await js.key_value(ACCOUNTS_BUCKET)
    except NotFoundError:
        return names  # not made yet: nothing can have cleared a webhook
    return [name for name in names if await _record_keeps_webhook(records, name)]


async def _record_keeps_webhook(records: KeyValue, name: str) -> bool:
    try:
        entry = await records.get(name)
    except NotFoundError:  # no record, or a deleted one
        return True
    try:
        return bool(decode_account(entry.value or b"", check_password_hash=False).webhook_url)
    except AccountRecordError:
        return True  # unreadable: the file's webhook, as before records could clear one


def _legacy_covers(legacy: ConsumerInfo, subject: str) -> bool:
    filters = legacy.config.filter_subjects or [legacy.config.filter_subject or ""]
    return subject in filters or f"{PREFIX}.events.>" in filters


def kv_configs(config: Config) -> list[KeyValueConfig]:
    """Every KV bucket. All allow direct gets: the router reads suppression entries and delivery
    reads shaping clocks on every message, and a direct get is one request answered by any
    replica from its store, where a STREAM.MSG.GET goes through the stream leader's JSON API
    (and comes back base64-encoded)."""
    replicas = config.nats.replicas
    bodies_ttl = body_ttl(config)

    def bucket(
        name: str, *, history: int = 1, ttl: float | None = None, marker_ttl: float | None = None
    ) -> KeyValueConfig:
        return KeyValueConfig(
            bucket=name,
            history=history,
            ttl=ttl,
            replicas=replicas,
            storage=StorageType.FILE,
            direct=True,
            limit_marker_ttl=marker_ttl,
        )

    return [
        bucket(SUPPRESSION_BUCKET),
        bucket(WARMUP_BUCKET, ttl=3 * 86400.0),  # a day's counters matter for that day only
        bucket(ACCOUNTS_BUCKET, history=5),
        bucket(SESSIONS_BUCKET, ttl=SESSIONS_TTL),
        # Slots and leases are only meaningful for minutes; the TTL sweeps keys of idle (source, site)s.
        bucket(SHAPING_BUCKET, ttl=86400.0),
        # No bucket TTL: a pause lasts until resumed, and a back-off as long as its rule says.
        bucket(DELIVERY_CONTROL_BUCKET, marker_ttl=DELIVERY_CONTROL_MARKER_TTL),
        bucket(BODY_REFS_BUCKET, ttl=bodies_ttl),
        # Held bounce notices normally live for one DSN window; the TTL only sweeps what a failure
        # left behind, and keeps the delete markers that tell a redelivered notice "already
        # reported" for as long as the body it would report on can exist.
        bucket(BOUNCE_HOLD_BUCKET, ttl=bodies_ttl),
    ]


async def _ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> None:
    try:
        await js.create_key_value(config)
    except BadRequestError as exc:
        # Already there with older settings (e.g. created before direct gets were on): bring the
        # bucket's stream to the declared shape, as `_ensure_stream` does. Clients pick up
        # direct gets when they bind (`js.key_value` reads the stream's configuration).
        if exc.err_code != 10058:
            raise
        declared = {
            "allow_direct": True,
            "max_msgs_per_subject": config.history,
            "max_age": config.ttl or 0.0,
            "num_replicas": config.replicas,
            **_message_ttls(config),
        }
        await _bring_stream_to(js, kv_stream(config.bucket), declared)


def _message_ttls(config: KeyValueConfig) -> dict[str, Any]:
    """The stream settings of a bucket whose values expire one by one (per-message TTLs, and
    markers of their expiry that watchers see); an earlier release made it without them."""
    if not config.limit_marker_ttl:
        return {}
    return {"allow_msg_ttl": True, "subject_delete_marker_ttl": config.limit_marker_ttl}


async def _bring_stream_to(js: JetStreamContext, name: str, declared: dict[str, Any]) -> None:
    """Update the settings of a bucket's stream that differ from `declared`; keep the rest (the
    client library's own choices: subjects, discard policy) as they are."""
    current = (await js.stream_info(name)).config
    if any((getattr(current, k) or 0) != v for k, v in declared.items()):
        log.info("updating stream %s to the declared configuration", name)
        for key, value in declared.items():
            setattr(current, key, value)
        await js.update_stream(current)
