"""Prometheus metrics: one registry per process, fed at the chokepoints every service shares.

- outcomes come from `services.core.events.publish_event` (accepted, delivered, deferred,
  bounced, expired, suppressed, complained), labelled with the same nouns as span attributes;
- handler results and durations come from `services.core.bus.consume`; delivery attempts
  (`relais_attempt_duration_seconds{pool}`) from delivery, which knows a run that made one;
- publishes and broker failures come from `Bus.publish`; inbound reports given up from
  `services.bounce.inbound`;
- queue depth and consumer lag are read from JetStream when /metrics is scraped
  (`refresh_queue_gauges`), for the consumers the scraped service pulls from
  (`services.core.runtime.lag_bindings`: the bounce service's webhook consumers too).

Label values are bounded: pools and sources come from the config, accounts (also added at run
time) and sites (MX hosts, one per receiving provider) keep their first distinct values and
count the rest as "other", and subjects are reduced to their family (`relais.retry`, not the
per-job schedule subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.core import telemetry as t

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# `*_created` series double the output and no Relais dashboard uses them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

_OUTCOME_LABELS = [t.label(t.OUTCOME), t.label(t.POOL), t.label(t.SOURCE_IP), t.label(t.SITE)]

ACCEPTED = Counter(
    "relais_accepted_messages",
    "Messages accepted (250 after the JetStream ack) by the ingress",
    [t.label(t.ACCOUNT)],
    registry=REGISTRY,
)
ACCEPTED_RECIPIENTS = Counter(
    "relais_accepted_recipients", "Recipients of accepted messages", [t.label(t.ACCOUNT)], registry=REGISTRY
)
REJECTED = Counter(
    "relais_rejected",
    "SMTP commands the ingress refused (4xx/5xx replies), by reason: reply code and enhanced status",
    ["reason"],
    registry=REGISTRY,
)
RECIPIENTS = Counter(
    "relais_recipients",
    "Recipient outcomes: delivered, deferred, bounced, expired, suppressed, complained",
    _OUTCOME_LABELS,
    registry=REGISTRY,
)
BOUNCES = Counter(
    "relais_bounces",
    "Bounced recipients by bounce category",
    [t.label(t.POOL), t.label(t.BOUNCE_CATEGORY)],
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "relais_delivery_latency_seconds",
    "Time from acceptance to delivery, retries included",
    [t.label(t.POOL)],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 5 * 86400),
    registry=REGISTRY,
)
ATTEMPT_DURATION = Histogram(
    "relais_attempt_duration_seconds",
    "Duration of one delivery attempt, its wait for a shaping slot included, up to the MX's last "
    "reply (a job postponed without contacting an MX is no attempt)",
    [t.label(t.POOL)],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
PROCESSED = Counter(
    "relais_processed",
    "Messages handled by a consumer, by result (ack, retry, poison, error)",
    ["consumer", "result"],
    registry=REGISTRY,
)
INBOUND_GIVEN_UP = Counter(
    "relais_inbound_given_up",
    "Inbound reports (mail to our own domains) given up (terminated) once "
    "services.bounce.inbound.MAX_DELIVERIES deliveries of each went wrong, by how the last ended: "
    "error (the handler raised) or lost (its replica died or stopped while reading it)",
    ["reason"],
    registry=REGISTRY,
)
HANDLER_DURATION = Histogram(
    "relais_handler_duration_seconds",
    "Time a consumer's handler took per message",
    ["consumer"],
    registry=REGISTRY,
)
PUBLISHED = Counter(
    "relais_published",
    "Publishes acknowledged by JetStream, by subject family",
    ["subject"],
    registry=REGISTRY,
)
PUBLISH_FAILURES = Counter(
    "relais_publish_failures",
    "Publishes JetStream did not acknowledge in time (ingress answers 451)",
    ["subject"],
    registry=REGISTRY,
)
SMTP_SESSIONS = Counter(
    "relais_smtp_sessions",
    "SMTP sessions the ingress accepted (outbound: relais_delivery_connections_opened_total)",
    ["direction"],
    registry=REGISTRY,
)
INGRESS_CONNECTIONS = Gauge(
    "relais_ingress_connections",
    "Connections open on each ingress listener of this process, from their accept, against "
    "ingress.max_connections",
    ["listener"],
    registry=REGISTRY,
)
INGRESS_BUFFERED_BYTES = Gauge(
    "relais_ingress_buffered_bytes",
    "DATA octets this ingress process's sessions hold in memory, against ingress.max_buffered_bytes",
    registry=REGISTRY,
)
TLS_RECIPIENTS = Counter(
    "relais_tls_recipients",
    "Recipients by the TLS version of their SMTP transaction ('none': plaintext): inbound when "
    "accepted, outbound per delivered or deferred SMTP transaction",
    ["direction", "version"],
    registry=REGISTRY,
)
DKIM_SIGN_FAILURES = Counter(
    "relais_dkim_sign_failures",
    "Messages the router sent unsigned because DKIM signing failed, by reason (a closed set: "
    "message, key, parameter, dkim, internal)",
    ["reason"],
    registry=REGISTRY,
)
STREAM_MESSAGES = Gauge(
    "relais_stream_messages", "Messages stored in a stream (queue depth)", ["stream"], registry=REGISTRY
)
CONSUMER_PENDING = Gauge(
    "relais_consumer_pending",
    "Messages not yet delivered to a consumer (lag); per pool for delivery-<pool>, per account "
    "for webhooks-<account>",
    ["consumer"],
    registry=REGISTRY,
)
CONSUMER_ACK_PENDING = Gauge(
    "relais_consumer_ack_pending", "Messages handed out and not yet acked", ["consumer"], registry=REGISTRY
)
CONSUMER_REDELIVERED = Gauge(
    "relais_consumer_redelivered", "Messages redelivered at least once", ["consumer"], registry=REGISTRY
)


class BoundedLabel:
    """Keeps a label's distinct values under a cap: the first `cap` values seen keep their name,
    later ones count as "other". Sites are rolled up by the router (one per big provider), but the
    long tail of small recipient domains would otherwise be one time series each."""

    def __init__(self, cap: int, other: str = "other") -> None:
        self.cap = cap
        self.other = other
        self._seen: set[str] = set()

    def label(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.cap:
            return self.other
        self._seen.add(value)
        return value


SITES = BoundedLabel(cap=500)
# Accounts live in the accounts bucket, added at run time (`relais account add`), not only in
# the config: a relay with tens of thousands of senders would be as many series per ingress.
ACCOUNTS = BoundedLabel(cap=1000)


def subject_family(subject: str) -> str:
    """`relais.retry.route.<key>.<n>` -> `relais.retry`; `relais.deliver.<pool>` is kept whole."""
    parts = subject.split(".")
    if len(parts) >= 3 and parts[1] == "deliver":
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def observe_smtp_reply(reply: str) -> None:
    """One reply the ingress sent; 4xx and 5xx count as rejections by their code and status."""
    if reply[:1] in ("4", "5"):
        parts = reply.replace("-", " ", 1).split()
        reason = " ".join(parts[:2]) if len(parts) > 1 and parts[1][:1].isdigit() else parts[0]
        REJECTED.labels(reason).inc()


def observe_event(event: Any) -> None:
    """Count one published outcome event (`services.core.events.Event`)."""
    kind = event.kind
    n = len(event.recipients) or 1
    if kind == "accepted":
        account = ACCOUNTS.label(event.account)
        ACCEPTED.labels(account).inc()
        ACCEPTED_RECIPIENTS.labels(account).inc(n)
        TLS_RECIPIENTS.labels("inbound", getattr(event, "tls_version", "") or "none").inc(n)
        return
    RECIPIENTS.labels(kind, event.pool, event.source_ip, SITES.label(event.site)).inc(n)
    if kind in ("delivered", "deferred") and getattr(event, "mx_address", ""):
        # Only attempts that reached an MX's transaction have a TLS version, or none: a deferral
        # without an SMTP session (DNS, warm-up, connect failure) or the capture mailbox is
        # neither encrypted nor plaintext mail.
        TLS_RECIPIENTS.labels("outbound", getattr(event, "tls_version", "") or "none").inc(n)
    if kind in ("bounced", "expired"):
        category = (event.detail or {}).get("category", "") or kind
        BOUNCES.labels(event.pool, category).inc(n)
    received_at = getattr(event, "received_at", 0.0) or 0.0
    if kind == "delivered" and received_at:
        DELIVERY_LATENCY.labels(event.pool).observe(max(0.0, event.at - received_at))


def observe_handler(consumer: str, result: str, seconds: float) -> None:
    """One message handled by a durable consumer. Called from the consume loop's bookkeeping,
    so it never raises.

    Not every run of a delivery consumer's handler is an attempt (a job postponed while its
    pool is paused, handed back to the host of its pinned source, or already finished): attempts
    are observed by delivery itself (`observe_attempt`)."""
    try:
        PROCESSED.labels(consumer, result).inc()
        HANDLER_DURATION.labels(consumer).observe(seconds)
    except Exception:
        log.exception("handler metrics for %s failed", consumer)


def observe_batch(consumer: str, result: str, count: int, seconds: float) -> None:
    """`count` messages a consumer settled together, in `seconds` (a webhook batch: one POST)."""
    for _ in range(count):
        observe_handler(consumer, result, seconds)


def observe_attempt(pool: str, seconds: float) -> None:
    """One delivery attempt of a job of `pool`: it went to an MX (or the capture mailbox)."""
    ATTEMPT_DURATION.labels(pool).observe(seconds)


class DnsCacheCollector(Collector):
    """Hits and misses of the resolvers' caches (dnspython counts them; we only read)."""

    def __init__(self) -> None:
        # Weak: a resolver dropped (tests build many) must not be kept alive by its metrics.
        self._caches: weakref.WeakSet[Any] = weakref.WeakSet()

    def track(self, cache: Any) -> None:
        if cache is not None and hasattr(cache, "statistics"):
            self._caches.add(cache)

    def collect(self) -> Iterable[CounterMetricFamily]:
        hits = CounterMetricFamily("relais_dns_cache_hits", "DNS answers served from the cache")
        misses = CounterMetricFamily("relais_dns_cache_misses", "DNS lookups that missed the cache")
        caches = list(self._caches)
        hits.add_metric([], sum(c.statistics.hits for c in caches))
        misses.add_metric([], sum(c.statistics.misses for c in caches))
        yield hits
        yield misses


DNS_CACHE = DnsCacheCollector()
REGISTRY.register(DNS_CACHE)


class SpanDropsCollector(Collector):
    """Spans the tracer never exported (the SDK only logs them): see `telemetry.spans_dropped`."""

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "relais_spans_dropped",
            "Finished spans never exported: the export queue was full, or the export failed "
            "(collector unreachable)",
            t.spans_dropped(),
        )


REGISTRY.register(SpanDropsCollector())


_CONSUMER_GAUGES = (CONSUMER_PENDING, CONSUMER_ACK_PENDING, CONSUMER_REDELIVERED)


# Consumer and stream infos read at once per scrape: the bounce service reads one consumer per
# account with a webhook, and read one after another they outlasted the scrape's deadline.
_READS_AT_ONCE = 16


async def refresh_queue_gauges(js: Any, bindings: Iterable[Any], per_call: float = 2.0) -> None:
    """Read depth and lag of the given consumers (`ConsumerBinding`s) and their streams.

    What cannot be read now is left out of the scrape rather than left at its last value: a
    frozen lag looks healthy to an alert while nobody measures it (`absent()` catches a gap)."""
    bindings = list(bindings)
    slots = asyncio.Semaphore(_READS_AT_ONCE)

    async def consumer(binding: Any) -> None:
        try:
            async with slots:
                info = await asyncio.wait_for(js.consumer_info(binding.stream, binding.durable), per_call)
        except Exception as exc:
            log.debug("consumer info %s unavailable: %r", binding.durable, exc)
            forget_consumers([binding.durable])
            return
        CONSUMER_PENDING.labels(binding.durable).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(binding.durable).set(info.num_ack_pending or 0)
        CONSUMER_REDELIVERED.labels(binding.durable).set(info.num_redelivered or 0)

    async def stream(name: str) -> None:
        try:
            async with slots:
                sinfo = await asyncio.wait_for(js.stream_info(name), per_call)
        except Exception as exc:
            log.debug("stream info %s unavailable: %r", name, exc)
            _forget(STREAM_MESSAGES, name)
            return
        STREAM_MESSAGES.labels(name).set(sinfo.state.messages)

    streams = sorted({binding.stream for binding in bindings})
    await asyncio.gather(*(consumer(b) for b in bindings), *(stream(s) for s in streams))


def forget_consumers(durables: Iterable[str]) -> None:
    """Drop the series of consumers no longer measured."""
    for durable in durables:
        for gauge in _CONSUMER_GAUGES:
            _forget(gauge, durable)


def _forget(gauge: Gauge, label: str) -> None:
    with contextlib.suppress(KeyError):  # never read yet
        gauge.remove(label)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
