"""`relais status`: streams, consumers (lag per pool), outcome rates, queued, deferred and held
mail per site, pauses.

Held is the mail of a paused pool or site, waiting in the pool's queue or postponed by a worker:
delivery re-schedules it as it schedules a deferred job's retry, and an operator must not read it
as a site deferring mail. Deferred is what a remote MX (or DNS) deferred: its retry waits for its
time whatever is paused.

Everything is read from NATS, so it works against any cluster. Rates are measured, not stored:
the events that arrive during `interval` seconds are counted by kind. (Differences of the events
stream's stored counts read ~0/s once the stream is as old as its max_age or as large as its
max_bytes: as many events leave it as arrive.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.admin.queue import deferred_by_site, queued_by_site
from services.core.bus import Bus
from services.core.pause import Pause, PauseState, holding
from services.core.topology import (
    EVENT_KINDS,
    EVENTS_STREAM,
    SubjectError,
    events_filter,
    parse_event_subject,
    pool_of_delivery_consumer,
)

RELAIS_STREAM_PREFIX = "RELAIS_"


@dataclass
class StreamRow:
    name: str
    messages: int
    bytes: int
    consumers: int


@dataclass
class ConsumerRow:
    stream: str
    name: str
    pending: int
    ack_pending: int
    redelivered: int
    waiting: int


@dataclass
class Status:
    streams: list[StreamRow] = field(default_factory=list)
    consumers: list[ConsumerRow] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    interval: float = 0.0
    queued_sites: dict[str, int] = field(default_factory=dict)
    queued_truncated: bool = False
    deferred_sites: dict[str, int] = field(default_factory=dict)
    deferred_truncated: bool = False
    held_sites: dict[str, int] = field(default_factory=dict)
    held_truncated: bool = False
    paused: list[Pause] = field(default_factory=list)


# Events counted per sample at most: the loop ends at the interval's end or at this, whichever
# comes first, so a burst cannot keep the command running.
MAX_SAMPLED_EVENTS = 10_000_000


async def event_rates(bus: Bus, interval: float, *, limit: int = MAX_SAMPLED_EVENTS) -> dict[str, float]:
    """Events per second by kind, counted as they arrive for `interval` seconds. Headers only:
    the subject names the kind, so no event body crosses the wire."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW, headers_only=True)
    sub = await bus.js.subscribe(events_filter(), stream=EVENTS_STREAM, ordered_consumer=True, config=config)
    counts = dict.fromkeys(EVENT_KINDS, 0)
    deadline = time.monotonic() + interval
    try:
        for _ in range(limit):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=remaining)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            _count(counts, msg.subject)
    finally:
        await sub.unsubscribe()
    return {k: n / interval for k, n in counts.items()}


def _count(counts: dict[str, int], subject: str) -> None:
    try:
        _, kind = parse_event_subject(subject)
    except SubjectError:
        return
    if kind in counts:
        counts[kind] += 1


async def collect_status(bus: Bus, *, interval: float = 1.0, scan_sites: bool = True) -> Status:
    status = Status(interval=interval)
    if interval > 0:
        status.rates = await event_rates(bus, interval)
    for info in await bus.js.streams_info():
        name = info.config.name or ""
        if not name.startswith(RELAIS_STREAM_PREFIX):
            continue
        status.streams.append(
            StreamRow(name, info.state.messages, info.state.bytes, info.state.consumer_count)
        )
        for c in await bus.js.consumers_info(name):
            if not c.config.durable_name:
                continue  # someone's ephemeral reader (e.g. `relais message`), not a queue
            status.consumers.append(
                ConsumerRow(
                    name,
                    c.name,
                    c.num_pending or 0,
                    c.num_ack_pending or 0,
                    c.num_redelivered or 0,
                    c.num_waiting or 0,
                )
            )
    status.paused = await PauseState(bus.js).paused()
    if scan_sites:
        holds = holding(status.paused)
        queued = await queued_by_site(bus, holds=holds)
        deferred = await deferred_by_site(bus, holds=holds)
        status.queued_sites, status.queued_truncated = queued.sites, queued.truncated
        status.deferred_sites, status.deferred_truncated = deferred.sites, deferred.truncated
        status.held_sites = {
            site: queued.held.get(site, 0) + deferred.held.get(site, 0)
            for site in queued.held.keys() | deferred.held.keys()
        }
        status.held_truncated = queued.truncated or deferred.truncated
    return status


def render_status(status: Status) -> str:
    out = ["STREAM              MESSAGES        BYTES  CONSUMERS"]
    for s in sorted(status.streams, key=lambda s: s.name):
        out.append(f"{s.name:<18} {s.messages:>9} {s.bytes:>12} {s.consumers:>10}")
    out.append("")
    out.append(f"{'CONSUMER':<34} {'LAG':>7} {'ACK-PENDING':>12} {'REDELIVERED':>12} {'WAITING-PULLS':>14}")
    for c in sorted(status.consumers, key=lambda c: (c.stream, c.name)):
        label = (
            f"{c.name} (pool {pool_of_delivery_consumer(c.name)})"
            if c.name.startswith("delivery-")
            else c.name
        )
        out.append(f"{label:<34} {c.pending:>7} {c.ack_pending:>12} {c.redelivered:>12} {c.waiting:>14}")
    if status.rates:
        out.append("")
        rates = "  ".join(f"{k} {v:.1f}/s" for k, v in status.rates.items() if k != "complained" or v)
        out.append(f"RATES (over {status.interval:.0f}s)  {rates}")
    out.append("")
    waiting = " (waiting for delivery or in it)"
    out += _by_site("QUEUED", status.queued_sites, status.queued_truncated, waiting)
    out.append("")
    out += _by_site("DEFERRED", status.deferred_sites, status.deferred_truncated)
    out.append("")
    held = " (their pool or site is paused)"
    out += _by_site("HELD", status.held_sites, status.held_truncated, held)
    out.append("")
    if status.paused:
        out.append("PAUSED")
        for p in status.paused:
            reason = f"  ({p.reason})" if p.reason else ""
            out.append(f"  {p.kind:<7} {p.name}{reason}")
    else:
        out.append("PAUSED: nothing")
    return "\n".join(out)


def _by_site(title: str, sites: dict[str, int], truncated: bool, what: str = "") -> list[str]:
    if not sites:
        return [f"{title}: none"]
    note = " (scan truncated)" if truncated else ""
    lines = [f"{title} RECIPIENTS BY SITE{what}{note}"]
    for site, n in sorted(sites.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {site:<40} {n:>7}")
    return lines
