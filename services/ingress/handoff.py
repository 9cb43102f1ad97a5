"""Hand an accepted message to JetStream: body first, then the envelope; 250 only after both acks."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from services.core.bodies import BodyStore
from services.core.bus import BrokerUnavailable, Bus
from services.core.envelope import Envelope, new_message_id
from services.core.events import event_for, publish_event
from services.core.outcome import QUEUE_UNAVAILABLE
from services.core.telemetry import traceparent_of
from services.core.topology import inbound_subject, route_subject

log = logging.getLogger(__name__)


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


class Handoff:
    def __init__(self, bus: Bus, bodies: BodyStore, deadline: float) -> None:
        self._bus = bus
        self._bodies = bodies
        self._deadline = deadline

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
        # The event is informational: the message is already durably queued, so a failure
        # here must not turn the 250 into a 451 (which would make the client send it twice).
        try:
            await publish_event(
                self._bus, event_for("accepted", env, env.recipients), msg_id=f"acc-{message_id}"
            )
        except BrokerUnavailable as exc:
            log.warning("accepted event for %s not published: %s", message_id, exc)
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
            await self._bus.publish(
                inbound_subject() if sub.kind == "inbound" else route_subject(),
                env.to_msgpack(),
                msg_id=message_id,
                attributes={"relais.message_id": message_id, "relais.account": sub.account},
            )
        except BrokerUnavailable:
            await self._bodies.discard(body)
            raise
        return env
