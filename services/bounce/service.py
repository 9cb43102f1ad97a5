"""The bounce service: failures become DSNs, events and suppression; inbound reports are read.

Three independent loops in one process (each its own durable consumer, so each scales with the
replicas of this service and none waits for another):

* `relais.bounce` (durable `bounce`): permanent failures, expiries and delay warnings from the
  router and delivery. Each failed recipient is classified (category in its event), hard
  bounces go on the account's suppression list, and one DSN per notice goes to the sender,
  honouring NOTIFY / RET / ENVID / ORCPT.
* `relais.inbound` (durable `bounce-inbound`): asynchronous bounces and ARF reports to our own
  domains, see `services.bounce.inbound`.
* `relais.events.>` (durable `webhooks`): event webhooks, see `services.bounce.webhooks`.
"""

from __future__ import annotations

import asyncio
import email
import logging
import secrets
import time
from datetime import UTC, datetime

from nats.aio.msg import Msg

from services.bounce import policy
from services.bounce.classify import DEFAULT_RULES, rules_from_data
from services.bounce.dsn import RecipientStatus, build_dsn, is_dsn_or_auto
from services.bounce.inbound import InboundHandler
from services.bounce.webhooks import WebhookDispatcher
from services.core import bus as transport
from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import Bus
from services.core.config import Config
from services.core.envelope import BounceNotice, Envelope, EnvelopeDecodeError, new_message_id
from services.core.events import event_for, publish_event
from services.core.outcome import Bounced
from services.core.suppression import Suppression, SuppressionList
from services.core.telemetry import consumer_span
from services.core.topology import bounce_binding, bounce_subject, inbound_binding, route_subject

log = logging.getLogger(__name__)


class BounceService:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        self._bodies = BodyStore(bus.js, config.nats.inline_body_max)
        self._hostname = config.bounce.reporting_mta or config.ingress.hostname
        self._rules = rules_from_data(config.bounce.rules) + DEFAULT_RULES
        self._suppression = SuppressionList(bus.js)
        self._inbound = InboundHandler(config.bounce, bus, self._bodies, self._rules)
        self._webhooks = WebhookDispatcher(config.bounce, config.accounts, bus)

    async def run(self, stop: asyncio.Event) -> None:
        ack_wait = self._config.nats.ack_wait
        await asyncio.gather(
            transport.consume(
                self._bus, bounce_binding(), self.handle, concurrency=32, stop=stop, ack_wait=ack_wait
            ),
            transport.consume(
                self._bus,
                inbound_binding(),
                self._inbound.handle,
                concurrency=8,
                stop=stop,
                ack_wait=ack_wait,
            ),
            self._webhooks.run(stop),
        )

    async def handle(self, msg: Msg) -> None:
        try:
            notice = BounceNotice.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.Poison(str(exc)) from exc
        env = notice.envelope
        # A delay warning (settle sends one when retry.delay_warning_after passes) is only a DSN.
        outcome = "delayed" if notice.delay_warning else "bounced"
        with consumer_span(
            bounce_subject(),
            msg.headers,
            {"relais.message_id": env.id, "relais.job_id": env.job_id, "relais.outcome": outcome},
        ) as span:
            round_no = env.attempt_count
            dsn_id = await self._send_dsn(notice, round_no)
            if dsn_id:
                span.set_attribute("relais.dsn_id", dsn_id)
            if notice.delay_warning:
                return  # still being retried: no outcome yet, and the body stays
            kind = "expired" if notice.expired else "bounced"
            for failure in notice.failures:
                await self._record(env, failure, kind, round_no)
            if notice.releases_body:
                await self._bodies.release(env.body, env.key)

    async def _record(self, env: Envelope, failure: Bounced, kind: str, round_no: int) -> None:
        """Classify one failed recipient; suppress it if the address is dead; publish its event."""
        category = policy.category_of(failure.reply, self._rules)
        detail = {"category": str(category)}
        if policy.suppresses(env, failure.reply, category):
            # Before the event: a consumer that sees "bounced" can rely on the entry existing.
            await self._suppression.add(
                Suppression(
                    account=env.account,
                    address=failure.recipient.lower(),
                    reason="hard_bounce",
                    source=env.id,
                    category=str(category),
                    expires_at=policy.suppression_expiry(self._config.bounce),
                )
            )
            detail["suppressed"] = "true"
        await publish_event(
            self._bus,
            event_for(kind, env, [failure.recipient], failure.reply, mx_host=failure.mx_host, detail=detail),
            msg_id=f"{kind}-{env.key}-{round_no}-{failure.recipient}",
        )

    async def _send_dsn(self, notice: BounceNotice, round_no: int) -> str:
        """Publish the DSN for this notice, if anyone should get one; returns its id or ''."""
        env = notice.envelope
        delayed = notice.delay_warning
        wanted = set(policy.dsn_recipients(env, [f.recipient for f in notice.failures], delayed=delayed))
        failures = [f for f in notice.failures if f.recipient in wanted]
        if not failures:
            return ""
        try:
            original = await self._bodies.get(env.body)
        except BodyMissing:
            original = b""
        headers = policy.header_block(original)
        if headers and is_dsn_or_auto(email.message_from_bytes(headers)):
            log.info("no DSN for %s: it is itself a report or an automatic message", env.id)
            return ""
        now = datetime.now(UTC)
        retry_until = datetime.fromtimestamp(env.received_at + self._config.retry.max_age, UTC)
        statuses = [
            RecipientStatus(
                final_recipient=f.recipient,
                original_recipient=policy.original_recipient(env, f.recipient),
                action="delayed" if delayed else "failed",
                status=_status_for(f.reply.enhanced_status, delayed),
                diagnostic_code=f"{f.reply.code} {f.reply.enhanced_status} {f.reply.text}",
                remote_mta=f.mx_host or None,
                last_attempt=now,
                will_retry_until=retry_until if delayed else None,
            )
            for f in failures
        ]
        full = policy.returns_full(env, self._config.bounce.return_full) and not delayed
        dsn_id = new_message_id()
        data = build_dsn(
            reporting_mta=self._hostname,
            from_address=f"{self._config.bounce.dsn_from}@{self._hostname}",
            to_address=env.sender,
            original_headers=headers,
            recipients=statuses,
            arrival_date=datetime.fromtimestamp(env.received_at, UTC),
            envelope_id=env.dsn_envid or None,
            original_message=original if full and original else None,
            message_id=f"<{dsn_id}.{secrets.token_hex(4)}@{self._hostname}>",
            date=now,
        )
        dsn = Envelope(
            id=dsn_id,
            sender="",
            recipients=(env.sender,),
            account=env.account,
            sender_domain=env.sender_domain,
            body=await self._bodies.put(dsn_id, data),
            received_at=time.time(),
            trace_context=env.trace_context,
            kind="dsn",
            meta={"dsn_for": env.id},
        )
        # The msg id ties the DSN to this notice, so a redelivered notice sends no second DSN.
        prefix = "dsnw" if delayed else "dsn"
        await self._bus.publish(
            route_subject(),
            dsn.to_msgpack(),
            msg_id=f"{prefix}-{env.key}-{round_no}",
            attributes={"relais.message_id": dsn_id, "relais.dsn_for": env.id},
        )
        return dsn_id


def _status_for(enhanced: str, delayed: bool) -> str:
    """A delay report carries a 4.x.x status (RFC 3464 2.3.4), whatever class the reply had."""
    if delayed and enhanced[:1] != "4":
        return "4" + enhanced[1:] if enhanced[:1] in "25" else "4.0.0"
    return enhanced
