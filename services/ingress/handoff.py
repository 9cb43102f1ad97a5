"""Hand an accepted message to JetStream: body first, then the envelope; 250 only after both acks.

The `accepted` event is not part of that promise: it feeds webhooks and `relais message`, and is
published after the 250 (see `EventFeed`), so one JetStream round trip fewer delays each reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from services.core.bodies import BodyStore
from services.core.bus import BrokerUnavailable, Bus
from services.core.envelope import Envelope, new_message_id
from services.core.events import Event, event_for, publish_event, record_event
from services.core.outcome import QUEUE_UNAVAILABLE
from services.core.telemetry import traceparent_of
from services.core.topology import inbound_subject, route_subject

log = logging.getLogger(__name__)

# Within the hand-off deadline the envelope is published up to this many times (see
# `_publish_until_acked`), each attempt waiting at most deadline / attempts for its ack.
_PUBLISH_ATTEMPTS = 3
_MIN_ATTEMPT = 0.2
_RETRY_PAUSE = 0.1


@dataclass(frozen=True, slots=True)
class Submission:
    """What the SMTP session established about one message."""

    account: str
    sender: str
    recipients: tuple[str, ...]
    sender_domain: str
    data: bytes
    client_ip: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    # "message" from an account (-> router), "inbound" to Relais' own domains (-> bounce service).
    kind: str = "message"
    dsn_ret: str = ""
    dsn_envid: str = ""
    dsn_notify: dict[str, str] = field(default_factory=dict)
    dsn_orcpt: dict[str, str] = field(default_factory=dict)


class EventFeed:
    """Publishes events after the SMTP reply, a bounded number at a time, retrying briefly.

    At `max_in_flight` the next session waits for a slot: a stalled broker slows replies down
    (as it did when every event was awaited) instead of piling up tasks. `drain` at shutdown
    waits for what is still in flight, so a clean stop loses no event.
    """

    def __init__(
        self, bus: Bus, *, max_in_flight: int = 1000, attempts: int = 3, backoff: float = 0.5
    ) -> None:
        self._bus = bus
        self._max_in_flight = max_in_flight
        self._attempts = attempts
        self._backoff = backoff
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def send(self, event: Event, *, msg_id: str) -> None:
        """Start publishing `event` (already recorded with `record_event`); returns at once
        unless `max_in_flight` publishes are pending."""
        while len(self._in_flight) >= self._max_in_flight:
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
        # The task copies the current context, so the event's PRODUCER span joins the message's trace.
        task = asyncio.get_running_loop().create_task(self._publish(event, msg_id))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _publish(self, event: Event, msg_id: str) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                # The msg id makes a retry after a lost ack a no-op in JetStream.
                await publish_event(self._bus, event, msg_id=msg_id, record=False)
                return
            except BrokerUnavailable as exc:
                if attempt == self._attempts:
                    log.warning("%s event for %s not published: %s", event.kind, event.message_id, exc)
                    return
                await asyncio.sleep(self._backoff * attempt)
            except Exception:
                # Nobody awaits this task: say what went wrong rather than lose it silently.
                log.exception("%s event for %s not published", event.kind, event.message_id)
                return

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a grace period, then cancel
        """Wait up to `timeout` for the events still in flight; cancel (and log) the rest."""
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d event(s) not published before stopping", len(pending))


class Handoff:
    def __init__(self, bus: Bus, bodies: BodyStore, deadline: float, events: EventFeed | None = None) -> None:
        self._bus = bus
        self._bodies = bodies
        self._deadline = deadline
        self.events = events or EventFeed(bus)

    async def queue(self, sub: Submission, *, message_id: str | None = None, span: object = None) -> str:
        """Queue durably and return the SMTP reply: `250 ... queued as <id>` or `451 4.3.0`."""
        message_id = message_id or new_message_id()
        accept_by = time.time() + self._deadline
        try:
            async with asyncio.timeout(self._deadline):
                env = await self._queue(sub, message_id, span, accept_by)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("queueing %s failed, answering 451: %s", message_id, exc)
            return f"{QUEUE_UNAVAILABLE.code} {QUEUE_UNAVAILABLE.enhanced_status} {QUEUE_UNAVAILABLE.text}"
        if sub.kind == "inbound":
            return f"250 2.0.0 Ok: queued as {message_id}"
        # The message is durably queued: it is accepted now (metrics, span, log line), whatever
        # happens to its event, which is informational and published after the 250. A failure
        # there must never turn the 250 into a 451 (the client would send the message twice).
        event = event_for("accepted", env, env.recipients)
        record_event(event)
        await self.events.send(event, msg_id=f"acc-{message_id}")
        return f"250 2.0.0 Ok: queued as {message_id}"

    async def _queue(self, sub: Submission, message_id: str, span: object, accept_by: float) -> Envelope:
        body = await self._bodies.put(message_id, sub.data)
        env = Envelope(
            id=message_id,
            sender=sub.sender,
            recipients=sub.recipients,
            account=sub.account,
            sender_domain=sub.sender_domain,
            body=body,
            received_at=time.time(),
            client_ip=sub.client_ip,
            accept_by=accept_by,
            meta=sub.meta,
            kind=sub.kind,
            dsn_ret=sub.dsn_ret,
            dsn_envid=sub.dsn_envid,
            dsn_notify=sub.dsn_notify,
            dsn_orcpt=sub.dsn_orcpt,
            trace_context=traceparent_of(span) if span is not None else "",  # type: ignore[arg-type]
        )
        try:
            await self._publish_until_acked(
                inbound_subject() if sub.kind == "inbound" else route_subject(),
                env.to_msgpack(),
                msg_id=message_id,
                attributes={"relais.message_id": message_id, "relais.account": sub.account},
                accept_by=accept_by,
            )
        except BrokerUnavailable as exc:
            if not exc.maybe_stored:
                await self._bodies.discard(body)
            # else: the envelope may be stored after all; the body then expires with its TTL.
            raise
        return env

    async def _publish_until_acked(
        self, subject: str, payload: bytes, *, msg_id: str, attributes: dict[str, str], accept_by: float
    ) -> None:
        """Publish, and publish again with the same message id until JetStream acknowledges or
        the deadline passes.

        An ack lost in a leader change does not mean the message was not stored: the new
        leader may hold it. Asking again with the same `Nats-Msg-Id` is answered from the
        stream's de-duplication window (`duplicate`), which turns that case into the `250` it
        deserves instead of a `451` whose retry the client would see delivered twice.
        """
        attempt_timeout = max(self._deadline / _PUBLISH_ATTEMPTS, _MIN_ATTEMPT)
        maybe_stored = False
        while True:
            remaining = accept_by - time.time()
            try:
                await self._bus.publish(
                    subject,
                    payload,
                    msg_id=msg_id,
                    attributes=attributes,
                    timeout=max(min(attempt_timeout, remaining), _MIN_ATTEMPT),
                )
                return
            except BrokerUnavailable as exc:
                maybe_stored = maybe_stored or exc.maybe_stored
                if accept_by - time.time() < _MIN_ATTEMPT:
                    raise BrokerUnavailable(str(exc), maybe_stored=maybe_stored) from exc
                log.info("publishing %s again after: %s", msg_id, exc)
                await asyncio.sleep(_RETRY_PAUSE)
