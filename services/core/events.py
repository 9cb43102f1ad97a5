"""Outcome events: one JSON record per thing that happened to a message, per account subject.

Events are an external contract (webhooks, `relais message`, tests), so they are JSON with
stable field names rather than msgpack.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

from services.core import metrics, telemetry
from services.core.bus import ACK_PATIENCE, BrokerUnavailable, Bus, patiently
from services.core.envelope import Envelope
from services.core.outcome import Reply
from services.core.topology import event_subject

# One log line per event, under its own logger so operators can route or silence it.
event_log = logging.getLogger("relais.events")


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    message_id: str
    account: str
    recipients: list[str]
    at: float = field(default_factory=time.time)
    job_id: str = ""
    sender: str = ""
    pool: str = ""
    site: str = ""
    mx_host: str = ""
    source_ip: str = ""
    attempt: int = 0
    reply: dict[str, Any] | None = None
    trace_id: str = ""
    detail: dict[str, str] = field(default_factory=dict)
    # Facts of the SMTP attempt behind a delivered/deferred event (empty for other kinds).
    mx_address: str = ""
    tls_version: str = ""
    tls_cipher: str = ""
    duration_ms: int = 0
    # When the message was accepted: delivery latency is `at - received_at`.
    received_at: float = 0.0

    def to_json(self) -> bytes:
        # A shallow dict: every field is already JSON-ready, and `asdict`'s recursive deep copy
        # cost more than the encoding itself (~15 µs of ~20 per event).
        return json.dumps(
            {name: getattr(self, name) for name in _EVENT_FIELDS}, separators=(",", ":")
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Event:
        # Fields a newer release added are ignored: during a rolling upgrade an older webhook
        # replica would otherwise refuse, and drop, every event the newer services write.
        record = json.loads(data)
        if not isinstance(record, dict):
            raise TypeError("an event is a JSON object")
        return cls(**{k: v for k, v in record.items() if k in _FIELD_NAMES})


_EVENT_FIELDS = tuple(f.name for f in fields(Event))
_FIELD_NAMES = frozenset(_EVENT_FIELDS)


def trace_id_of(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) >= 3 else ""


def event_for(
    kind: str,
    env: Envelope,
    recipients: list[str] | tuple[str, ...],
    reply: Reply | None = None,
    **extra: Any,
) -> Event:
    if kind == "accepted" and "tls_version" not in extra:
        # How the message came in: the ingress records its TLS facts in the envelope's meta.
        extra = {
            **extra,
            "tls_version": env.meta.get("tls_version", ""),
            "tls_cipher": env.meta.get("tls_cipher", ""),
        }
    if env.kind == "dsn" and env.meta.get("dsn_for"):
        # A DSN's events point back at the message it reports on (`relais message` shows them).
        extra = {**extra, "detail": {**extra.get("detail", {}), "dsn_for": env.meta["dsn_for"]}}
    return Event(
        kind=kind,
        message_id=env.id,
        account=env.account,
        recipients=list(recipients),
        job_id=env.job_id,
        sender=env.sender,
        pool=env.pool,
        site=env.site,
        attempt=env.attempt_count,
        reply=reply.to_dict() if reply else None,
        trace_id=trace_id_of(env.trace_context),
        received_at=env.received_at,
        **extra,
    )


class _Unanswered:
    """Msg ids of events this process published without getting an answer (the publish timed
    out: maybe stored). When publishing one again finds it stored, the copy found is this
    process's own, which nobody recorded. Bounded: only ids still being retried matter."""

    def __init__(self, cap: int = 10_000) -> None:
        self._cap = cap
        self._ids: dict[str, None] = {}

    def add(self, msg_id: str) -> None:
        self._ids[msg_id] = None
        if len(self._ids) > self._cap:
            del self._ids[next(iter(self._ids))]  # the oldest: insertion order

    def take(self, msg_id: str) -> bool:
        return self._ids.pop(msg_id, 0) is None


_unanswered = _Unanswered()


async def publish_event(bus: Bus, event: Event, *, msg_id: str | None = None, record: bool = True) -> None:
    """Publish one event; the msg id makes a redelivered stage's republish a no-op.

    `record=False` when the caller already called `record_event` (the ingress records `accepted`
    at its 250 and publishes the event after answering). A duplicate (the stream already held
    the msg id: a redelivery) is not recorded: it was counted when it was first stored. Unless
    the copy stored is the one this process published without an answer (`settle` trying again
    after a timeout): that one was never recorded, and the outcome would have no count, no log
    line and no span event."""
    try:
        ack = await bus.publish(
            event_subject(event.account, event.kind),
            event.to_json(),
            msg_id=msg_id,
            # The span is named by the subject's template: the account is an attribute instead.
            attributes={telemetry.MESSAGE_ID: event.message_id, telemetry.ACCOUNT: event.account},
        )
    except BrokerUnavailable as exc:
        if record and msg_id and exc.maybe_stored:
            _unanswered.add(msg_id)
        raise
    ours = bool(msg_id) and _unanswered.take(msg_id or "")
    if record and (not ack.duplicate or ours):
        record_event(event)


async def report_later(bus: Bus, event: Event, *, msg_id: str, what: str, record: bool = True) -> None:
    """Publish an event whose outcome is already durable (`accepted` after the 250, `deferred`
    once its retry is stored) without making the caller wait: `Bus.background`, asked again with
    the same msg id while JetStream does not answer (a leader election) for up to ACK_PATIENCE,
    then logged as lost. The task copies the current context, so the event's PRODUCER span joins
    the message's trace."""
    publish = partial(publish_event, bus, event, msg_id=msg_id, record=record)
    await bus.background(patiently(publish, what, patience=ACK_PATIENCE), what)


def record_event(event: Event) -> None:
    """Metrics, span event and log line of one outcome; never raises.

    Events are the chokepoint every outcome passes: metrics and the span see them here. The
    outcome already happened: nothing here may turn that success into a redelivery."""
    try:
        metrics.observe_event(event)
        attributes = outcome_attributes(event)
        telemetry.annotate_outcome(event.kind, attributes, event.recipients)
        log_event(event, attributes)
    except Exception:
        event_log.exception("recording %s event of %s failed", event.kind, event.message_id)


def annotate_event(event: Event) -> None:
    """Only the span event of an outcome (`record_event` counts and logs it too), for an event
    published after the span it belongs to has ended; never raises."""
    try:
        telemetry.annotate_outcome(event.kind, outcome_attributes(event), event.recipients)
    except Exception:
        event_log.exception("annotating %s event of %s failed", event.kind, event.message_id)


def log_event(event: Event, attributes: dict[str, object]) -> None:
    """The event as one structured log line: message id, trace id and the outcome's facts."""
    if not event_log.isEnabledFor(logging.INFO):
        return
    reply = event.reply or {}
    event_log.info(
        "%s %s%s",
        event.kind,
        ",".join(event.recipients),
        f" {reply.get('code')} {reply.get('enhanced')}" if reply else "",
        extra={
            "message_id": event.message_id,
            "trace_id": event.trace_id,
            "event": {telemetry.label(k): v for k, v in attributes.items() if v not in (None, "")},
        },
    )


def outcome_attributes(event: Event) -> dict[str, object]:
    """An event's facts under the span attribute names (and, shortened, metric labels)."""
    reply = event.reply or {}
    return {
        telemetry.OUTCOME: event.kind,
        telemetry.POOL: event.pool,
        telemetry.SITE: event.site,
        telemetry.MX_HOST: event.mx_host,
        telemetry.SOURCE_IP: event.source_ip,
        telemetry.ATTEMPT: event.attempt,
        telemetry.REPLY_CODE: reply.get("code"),
        telemetry.ENHANCED_STATUS: reply.get("enhanced"),
        telemetry.REPLY_TEXT: str(reply.get("text") or "")[: telemetry.REPLY_TEXT_MAX],
        telemetry.BOUNCE_CATEGORY: event.detail.get("category"),
        telemetry.TLS_VERSION: event.tls_version,
        telemetry.RECIPIENTS: ",".join(event.recipients),
    }
