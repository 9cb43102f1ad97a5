"""`relais message <id>`: everything that happened to one message, from the events stream.

The id may be a job key too (`envelope.job_key`, as log lines name jobs): the message's history
is shown, that job's events marked and its fate last.

Events carry the message id in their body, not in their subject (`relais.events.<account>.<kind>`),
so the lookup is a scan with a filter. It starts at the message's own arrival time, read from its
id (ids begin with the millisecond clock, see `envelope.new_message_id`), so it only reads events
written after the message arrived, not the whole retention window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.core.addresses import recipient_key
from services.core.envelope import is_message_id, message_id_of_job
from services.core.events import Event
from services.core.topology import EVENTS_STREAM, events_filter

# How far before the id's timestamp the scan starts: clocks of ingress replicas differ a little.
CLOCK_SLACK = 60.0


@dataclass(frozen=True, slots=True)
class Lookup:
    """What `relais message` was asked about: a message, or one job of it (`job_key`)."""

    message_id: str
    job_key: str = ""


def lookup_of(asked: str) -> Lookup:
    """A message id or a job key as an operator copied it: in any case, between `<>`. Only the
    format Relais writes is folded to lower case; anything else is looked up as written."""
    text = asked.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    folded = text.lower()
    if message_id := message_id_of_job(folded):
        return Lookup(message_id, folded)
    return Lookup(folded) if is_message_id(folded) else Lookup(text)


class Events(list[Event]):
    """A message's events, oldest first. `complete` is False when the scan stopped at its limit
    before the end of the stream: later events, such as an outcome after a retry, were not read."""

    complete: bool = True


def arrival_of(message_id: str) -> float | None:
    """Epoch seconds encoded in a Relais message id, or None for something else."""
    try:
        ms = int(message_id[:11], 16)
    except ValueError:
        return None
    seconds = ms / 1000
    return seconds if 1e9 < seconds < 1e11 else None


async def message_events(
    js: JetStreamContext, message_id: str, *, idle: float = 0.5, limit: int = 1_000_000
) -> Events:
    """Events of one message (or of a DSN about it), oldest first, from at most `limit` events."""
    arrival = arrival_of(message_id)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if arrival is not None:
        start = datetime.fromtimestamp(max(0.0, arrival - CLOCK_SLACK), UTC)
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    sub = await js.subscribe(events_filter(), stream=EVENTS_STREAM, ordered_consumer=True, config=config)
    found = Events()
    try:
        for _ in range(limit):
            try:
                msg = await sub.next_msg(timeout=idle)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            try:
                event = Event.from_json(msg.data)
            except (ValueError, TypeError):
                continue
            if event.message_id == message_id or event.detail.get("dsn_for") == message_id:
                found.append(event)
            pending = msg.metadata.num_pending if msg.metadata else 1
            if pending == 0:
                break
        else:
            found.complete = False
    finally:
        await sub.unsubscribe()
    return found


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def render_history(message_id: str, events: Sequence[Event], *, job: str = "") -> str:
    """The message's history; asked about one of its jobs, that job's events are marked `*`
    and its fate follows the message's."""
    complete = getattr(events, "complete", True)
    if not events:
        return f"no events for {job or message_id}" + ("" if complete else f"\n{_CUT_SHORT}")
    first = events[0]
    lines = [
        f"message {message_id}  account {first.account}  from <{first.sender}>",
    ]
    trace_ids = sorted({e.trace_id for e in events if e.trace_id})
    if trace_ids:
        lines.append(f"trace {', '.join(trace_ids)}   (relais trace {message_id})")
    for e in events:
        where = " ".join(
            f"{k}={v}"
            for k, v in (("pool", e.pool), ("site", e.site), ("mx", e.mx_host), ("source", e.source_ip))
            if v
        )
        reply = ""
        if e.reply:
            reply = f'  "{e.reply.get("code")} {e.reply.get("enhanced")} {e.reply.get("text", "")}"'.rstrip()
        attempt = f"  attempt {e.attempt}" if e.kind not in ("accepted",) and e.attempt else ""
        retry = e.detail.get("retry_at")
        retry_at = f"  next try {_when(float(retry))}" if retry else ""
        rcpts = ", ".join(e.recipients)
        if e.message_id != message_id:
            rcpts = f"DSN {e.message_id} to {rcpts}"
        mark = ("* " if e.job_id == job else "  ") if job else ""
        lines.append(f"{mark}{_when(e.at)}  {e.kind:<10} {rcpts}{attempt}  {where}{reply}{retry_at}".rstrip())
    # Cut short, the last events read are not the message's last: no fate can be told from them.
    if not complete:
        return "\n".join([*lines, _CUT_SHORT])
    own = [e for e in events if e.message_id == message_id]
    lines += _fate(own)
    if job:
        lines.append(_job_fate(job, own))
    return "\n".join(lines)


def _job_fate(job: str, own: Sequence[Event]) -> str:
    fate = _fate([e for e in own if e.job_id == job])
    if fate:
        return f"job {job}: {fate[0]}"
    # Not attempted yet (a routed job has no event before its first attempt), or a mistyped key.
    seen = ", ".join(sorted({e.job_id for e in own if e.job_id}, key=lambda key: (len(key), key)))
    return f"job {job}: no events yet (the message's jobs with events: {seen or 'none'})"


_CUT_SHORT = "scan stopped at its limit of events: later events not read, the outcome may be among them"


FINAL_KINDS = ("delivered", "bounced", "expired", "suppressed")


def _fate(own: Sequence[Event]) -> list[str]:
    """`final: ...` once every recipient has a final event; until then which are still queued:
    one recipient delivered says nothing about another one deferred."""
    recipients: dict[str, str] = {}  # recipient key -> the address as first written
    finals: dict[str, str] = {}  # recipient key -> its final kind
    for e in own:
        for rcpt in e.recipients:
            key = recipient_key(rcpt)
            recipients.setdefault(key, rcpt)
            if e.kind in FINAL_KINDS:
                finals.setdefault(key, e.kind)
    if not recipients:
        return []
    queued = [rcpt for key, rcpt in recipients.items() if key not in finals]
    if not queued:
        return [f"final: {', '.join(sorted(set(finals.values())))}"]
    return [f"still queued: {', '.join(queued)}"]
