"""Hand an accepted message to JetStream: body first, then the envelope; 250 only after both acks.

The `accepted` event is not part of that promise: it feeds webhooks and `relais message`, and is
published after the 250 (`events.report_later`: retried through a leader election, waited for when
the ingress stops), so one JetStream round trip fewer delays each reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.core.bodies import BodyStore
from services.core.bus import BrokerUnavailable, Bus
from services.core.envelope import Envelope, new_message_id
from services.core.events import Event, event_for, record_event, report_later
from services.core.outcome import QUEUE_UNAVAILABLE
from services.core.telemetry import traceparent_of
from services.core.topology import inbound_subject, submit_subject
from services.ingress.replies import INSUFFICIENT_STORAGE
from services.ingress.server_clock import ServerClock

log = logging.getLogger(__name__)

T = TypeVar("T")

# Each attempt to publish the envelope waits at most publish_timeout / this for its ack (see
# `_publish_until_acked`), so that a publish lost in a leader change is asked again in time.
_PUBLISH_ATTEMPTS = 3
_MIN_ATTEMPT = 0.2
# The pause between attempts doubles up to the maximum: an election answers "no responders"
# at once, and every waiting session asking ten times a second would only load it.
_RETRY_PAUSE = 0.1
_MAX_RETRY_PAUSE = 1.0


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
    """`publish_timeout`: how long publishes may fail for certain (nothing stored) before the
    `451`. `queue_timeout` (at least that): how long they are asked again while an earlier one
    may have been stored, its ack lost; a `451` then could be delivered anyway, and the client's
    retry a second time. `clock`: this host's offset from the NATS servers' clock, in which the
    envelope's `accept_by` is written (none: taken as 0)."""

    def __init__(
        self,
        bus: Bus,
        bodies: BodyStore,
        publish_timeout: float,
        queue_timeout: float | None = None,
        *,
        clock: ServerClock | None = None,
    ) -> None:
        self._bus = bus
        self._bodies = bodies
        self._clock = clock
        self._publish_timeout = publish_timeout
        self._queue_timeout = max(publish_timeout, queue_timeout or publish_timeout)
        # Once the service stops (`stop_by`), the loop time by which a hand-off stops waiting for
        # room to report its `accepted` event, and the waits for room until then.
        self._report_by: float | None = None
        self._waiting_for_room: set[asyncio.Timeout] = set()

    def stop_by(self, when: float) -> None:
        """The service is stopping and waits for hand-offs until `when` (loop time): from then on
        none waits for room to report its `accepted` event (`Bus.background`) beyond it. Room
        frees only as events are acknowledged, and a slow events stream could hold a hand-off
        past the stop's bound, its event then neither sent nor reported lost."""
        if self._report_by is not None:
            when = min(when, self._report_by)  # stopped again: no later than the first stop said
        self._report_by = when
        for waiting in self._waiting_for_room:
            if not waiting.expired():  # an expired one is already ending its hand-off
                waiting.reschedule(when)

    async def queue(self, sub: Submission, *, message_id: str | None = None, span: object = None) -> str:
        """Queue durably and return the SMTP reply: `250 ... queued as <id>`, `451 4.3.0`, or
        `452 4.3.1` when JetStream refused it for want of room (`unavailable_reply`)."""
        message_id = message_id or new_message_id()
        started = time.time()
        # When the 451 is given, by this host's clock: the hand-off's own deadline. The envelope
        # carries it in the servers' clock (`_queue`).
        accept_by = started + self._queue_timeout
        try:
            async with asyncio.timeout(self._queue_timeout):
                env = await self._queue(sub, message_id, span, started + self._publish_timeout, accept_by)
        except (BrokerUnavailable, TimeoutError) as exc:
            if isinstance(exc, BrokerUnavailable) and exc.maybe_stored:
                log.error(
                    "queueing %s failed, answering 451, yet it may be queued (no answer from JetStream "
                    "for %gs): it may be delivered, and the client's retry a second time: %s",
                    message_id,
                    time.time() - started,
                    exc,
                )
            elif isinstance(exc, BrokerUnavailable) and exc.store_full:
                log.error("queueing %s failed, answering 452: JetStream storage is full: %s", message_id, exc)
            else:
                log.warning("queueing %s failed, answering 451: %s", message_id, exc)
            return unavailable_reply(exc)
        if sub.kind == "inbound":
            return f"250 2.0.0 Ok: queued as {message_id}"
        # The message is durably queued: it is accepted now (metrics, span, log line), whatever
        # happens to its event, which is informational and published after the 250. A failure
        # there must never turn the 250 into a 451 (the client would send the message twice).
        event = event_for("accepted", env, env.recipients)
        record_event(event)
        await self._report_accepted(event, message_id)
        return f"250 2.0.0 Ok: queued as {message_id}"

    async def _report_accepted(self, event: Event, message_id: str) -> None:
        what = f"accepted event of {message_id}"
        try:
            async with asyncio.timeout_at(self._report_by) as waiting:
                self._waiting_for_room.add(waiting)
                try:
                    # The msg id makes a retry after a lost ack a no-op in JetStream.
                    await report_later(self._bus, event, msg_id=f"acc-{message_id}", what=what, record=False)
                finally:
                    self._waiting_for_room.discard(waiting)
        except TimeoutError:
            log.warning("%s lost: no room to publish it before the ingress stopped", what)

    async def _queue(
        self, sub: Submission, message_id: str, span: object, certain_by: float, accept_by: float
    ) -> Envelope:
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
            # The router drops a copy stored after this (`Envelope.refused_when_stored_at`): the
            # 451. It compares it with the storage time by the server's clock, hence the offset.
            accept_by=accept_by + (self._clock.offset if self._clock is not None else 0.0),
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
                inbound_subject() if sub.kind == "inbound" else submit_subject(),
                env.to_msgpack(),
                msg_id=message_id,
                attributes={"relais.message_id": message_id, "relais.account": sub.account},
                certain_by=certain_by,
                accept_by=accept_by,
            )
        except BrokerUnavailable as exc:
            if not exc.maybe_stored:
                await self._bodies.discard(body)
            # else: the envelope may be stored after all; the body then expires with its TTL.
            raise
        return env

    async def _publish_until_acked(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        attributes: dict[str, str],
        certain_by: float,
        accept_by: float,
    ) -> None:
        """Publish, and publish again with the same message id until JetStream acknowledges:
        until `certain_by` while every failure was certain (nothing stored), until `accept_by`
        once one may have stored the message, or until the service's stop bound.

        An ack lost in a leader change does not mean the message was not stored: the new
        leader may hold it. Asking again with the same `Nats-Msg-Id` is answered from the
        stream's de-duplication window (`duplicate`), which turns that case into the `250` it
        deserves instead of a `451` whose retry the client would see delivered twice. An
        election can outlast `nats.publish_timeout` on a loaded cluster, so such a message is
        asked about for `ingress.queue_timeout`: SMTP clients wait 10 minutes for the reply to
        the final dot (RFC 5321 4.5.3.2.6).
        """
        loop = asyncio.get_running_loop()
        attempt_timeout = max(self._publish_timeout / _PUBLISH_ATTEMPTS, _MIN_ATTEMPT)
        maybe_stored = False
        pause = _RETRY_PAUSE

        def time_left() -> float:
            left = (accept_by if maybe_stored else certain_by) - time.time()
            return left if self._report_by is None else min(left, self._report_by - loop.time())

        while True:
            try:
                await self._bus.publish(
                    subject,
                    payload,
                    msg_id=msg_id,
                    attributes=attributes,
                    timeout=max(min(attempt_timeout, time_left()), _MIN_ATTEMPT),
                )
                return
            except BrokerUnavailable as exc:
                maybe_stored = maybe_stored or exc.maybe_stored
                # No room: certain (nothing stored), and it lasts until an operator makes room,
                # so no answer but this one can come before the deadline.
                if (exc.store_full and not maybe_stored) or time_left() < _MIN_ATTEMPT + pause:
                    raise BrokerUnavailable(
                        str(exc), maybe_stored=maybe_stored, store_full=exc.store_full and not maybe_stored
                    ) from exc
                log.info("publishing %s again after: %s", msg_id, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_RETRY_PAUSE)


def unavailable_reply(exc: BaseException) -> str:
    """The reply to a message JetStream did not take: `452 4.3.1` when it had no room (as
    Postfix answers when its queue is short of space: the client should come back later, and
    an operator should look), else `451 4.3.0`. A refusal that may have stored the message is
    always the latter."""
    if isinstance(exc, BrokerUnavailable) and exc.store_full and not exc.maybe_stored:
        return str(INSUFFICIENT_STORAGE)
    return f"{QUEUE_UNAVAILABLE.code} {QUEUE_UNAVAILABLE.enhanced_status} {QUEUE_UNAVAILABLE.text}"


async def past_the_client(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` (a message's hand-off, from counting it to queueing it) to its end even when
    the session is cancelled meanwhile, then pass the cancellation on.

    Once the final dot is read the client's leaving (a reset, a TLS connection closed) must not
    cut the hand-off halfway: the envelope stored and its quota refunded, or the quota taken and
    nothing stored. Postfix likewise keeps a message whose client left after the dot. `work` is
    bounded by its own broker deadlines; the session waits for it, so the message's octets stay
    counted in the DATA budget until then.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled() and (error := task.exception()) is not None:
            # Nobody is left to answer: the session's handle_exception will not hear of it.
            log.error("hand-off of a session that ended failed", exc_info=error)
        raise asyncio.CancelledError
    return task.result()
