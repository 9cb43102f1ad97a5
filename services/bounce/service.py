"""The bounce service: failures become DSNs, events and suppression; inbound reports are read.

Three independent loops in one process (each its own durable consumer, so each scales with the
replicas of this service and none waits for another):

* `relais.bounce` (durable `bounce`): permanent failures, expiries and delay warnings from the
  router and delivery. Each failed recipient is classified (category in its event) and hard
  bounces go on the account's suppression list at once. The DSN to the sender (honouring
  NOTIFY / RET / ENVID / ORCPT) waits `bounce.dsn_window` in `services.bounce.hold`, so the
  failures of a message's several domain jobs share one; with a window of 0 it goes at once.
* `relais.bounce.flush` (durable `bounce-flush`): the end of a window: one DSN for its notices.
* `relais.inbound` (durable `bounce-inbound`): asynchronous bounces and ARF reports to our own
  domains, see `services.bounce.inbound`.
* `relais.events.<account>.*` (durable `webhooks-<account>`, one per account with a webhook):
  event webhooks, see `services.bounce.webhooks`.
"""

from __future__ import annotations

import asyncio
import email
import functools
import logging
import secrets
import time
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

from nats.aio.msg import Msg

from services.bounce import policy
from services.bounce.classify import DEFAULT_RULES, rules_from_data
from services.bounce.dsn import (
    DIAGNOSTIC_LOCAL,
    MAX_RETURNED,
    RecipientStatus,
    build_dsn,
    diagnostic_type,
    is_report,
)
from services.bounce.hold import DELAYED, FAILED, FlushRequest, HoldStore, notice_id
from services.bounce.inbound import InboundHandler
from services.bounce.retrying import still_retried
from services.bounce.webhooks import WebhookDispatcher
from services.core import bus as transport
from services.core.bodies import BodyMissing, BodyStore, head_octets
from services.core.bus import Bus
from services.core.config import Config
from services.core.envelope import (
    BodyRef,
    BounceNotice,
    Envelope,
    EnvelopeDecodeError,
    dsn_recipients,
    new_message_id,
)
from services.core.events import event_for, publish_event
from services.core.held_bodies import HeldBodies
from services.core.outcome import LOCAL_MAILBOX, Bounced, Delivered
from services.core.schedule import publish_at
from services.core.suppression import Suppression, SuppressionList
from services.core.telemetry import MESSAGE_ID, consumer_span
from services.core.topology import (
    ConsumerBinding,
    bounce_binding,
    bounce_flush_binding,
    bounce_flush_subject,
    bounce_subject,
    bounce_window_subject,
    inbound_binding,
    submit_subject,
)

log = logging.getLogger(__name__)

# How long after its window's end a flush counts as late. Schedules fire on the second and a
# flush consumer without a backlog takes its request at once; later than this, the delay
# warnings it sends are checked again (`bounce.retrying`), since their retries may have run.
LATE_FLUSH = 30.0
# Room for what the ingress adds to a header block it took within ingress.max_header_size: its
# Received field and any Message-ID, Date or other missing fields.
ADDED_HEADERS = 4096


class BounceService:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        self._bodies = BodyStore(
            bus.js, config.nats.inline_body_max, bus, purges=config.nats.declare_topology
        )
        self._hostname = config.bounce.reporting_mta or config.ingress.hostname
        self._rules = rules_from_data(config.bounce.rules) + DEFAULT_RULES
        self._suppression = SuppressionList(bus.js)
        self._hold = HoldStore(bus.js)
        self._webhooks = WebhookDispatcher(config, bus)
        # One budget for every loop's stored bodies (bounce.max_buffered_bytes): it bounds the pod.
        self._held = HeldBodies(config.bounce.max_buffered_bytes)
        # A DSN returning headers reads only this much of its original (0: to its header end).
        max_header = config.ingress.max_header_size
        self._header_limit = max_header + ADDED_HEADERS if max_header else 0
        self._inbound = InboundHandler(
            config.bounce, bus, self._bodies, self._rules, self._webhooks.records, self._held
        )

    def webhook_accounts(self) -> list[str]:
        """The accounts whose events are posted now (their lag is on /metrics)."""
        return self._webhooks.webhook_accounts()

    async def run(self, stop: asyncio.Event) -> None:
        def consume(binding: ConsumerBinding, handler: transport.Handler, slots: int) -> Awaitable[None]:
            return transport.consume_declared(
                self._bus, self._config, binding, handler, concurrency=slots, stop=stop
            )

        await asyncio.gather(
            consume(bounce_binding(), self.handle, 32),
            # Also with dsn_window = 0: windows opened before the setting changed still end.
            consume(bounce_flush_binding(), self.flush, 16),
            # `stop` ends a report's wait for NATS: nak'ed, it comes back to a replica that runs.
            consume(inbound_binding(), functools.partial(self._inbound.handle, stop=stop), 8),
            self._webhooks.run(stop),
        )

    async def handle(self, msg: Msg) -> None:
        try:
            notice = BounceNotice.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.undecodable(exc) from exc
        env = notice.envelope
        # A delay warning (settle sends one when retry.delay_warning_after passes) is only a DSN,
        # as are relayed recipients (delivered, with NOTIFY=SUCCESS).
        outcome = "delayed" if notice.delay_warning else "bounced" if notice.failures else "relayed"
        with consumer_span(
            bounce_subject(),
            msg.headers,
            {"relais.message_id": env.id, "relais.job_id": env.job_id, "relais.outcome": outcome},
        ) as span:
            if notice.delay_warning:
                warned = await self._still_retried(notice)
                if warned is None:
                    # Unless an earlier delivery of it joined a window, whose flush releases it.
                    if not await self._hold.holds(env.id, notice_id(env.key, env.attempt_count, True)):
                        await self._release(notice)
                    return
                notice = warned
            round_no = env.attempt_count
            held = False
            if self._config.bounce.dsn_window > 0:
                held, dsn_id = await self._hold_for_dsn(notice, round_no)
            else:
                prefix = "dsnw" if notice.delay_warning else "dsn"
                # The msg id ties the DSN to this notice, so a redelivered notice sends no second DSN.
                dsn_id = await self._send_dsn([notice], f"{prefix}-{env.key}-{round_no}", new_message_id())
            if dsn_id:
                span.set_attribute("relais.dsn_id", dsn_id)
            # A delay warning's recipients are still being retried: no outcome yet. Events and
            # suppression never wait for the DSN window.
            if not notice.delay_warning:
                for failure in notice.failures:
                    await self._record(env, failure, round_no)
            if not held:
                await self._release(notice)

    async def _release(self, notice: BounceNotice) -> None:
        """The body references a notice holds, once its DSN is built (or none is due): the job's
        when it was the job's last outcome, and its own (`holds_body`)."""
        env = notice.envelope
        if notice.releases_body:
            await self._bodies.release(env.body, env.key)
        if notice.holds_body:
            await self._bodies.release(env.body, notice.holds_body)

    async def _hold_for_dsn(self, notice: BounceNotice, round_no: int) -> tuple[bool, str]:
        """Hold a notice for its message's DSN window. Returns (held, id the DSN will have);
        (False, "") when no DSN is due, and then the caller releases the body as usual."""
        env = notice.envelope
        if not self._dsn_failures(notice) and not self._dsn_relayed(notice):
            return False, ""
        nid = notice_id(env.key, round_no, notice.delay_warning)
        if not await self._hold.put(env.id, nid, notice.to_msgpack()):
            return True, ""  # a late redelivery: its window's flush reported it and released the body
        joined = await self._hold.join(
            env.id,
            nid,
            DELAYED if notice.delay_warning else FAILED,
            new_id=new_message_id(),
            flush_at=time.time() + self._config.bounce.dsn_window,
        )
        if joined.schedule:
            await publish_at(
                self._bus,
                schedule_subject=bounce_window_subject(env.id, joined.window_id),
                target_subject=bounce_flush_subject(),
                payload=FlushRequest(env.id, joined.window_id).to_json(),
                at=joined.flush_at,
                headers={"traceparent": env.trace_context} if env.trace_context else None,
                attributes={MESSAGE_ID: env.id, "relais.dsn_id": joined.window_id},
            )
        return True, joined.window_id

    async def flush(self, msg: Msg) -> None:
        """The end of a DSN window: one DSN for every notice that joined it, then clean up.

        Each step is idempotent, so a flush redelivered after a crash (or a second flush of the
        same window, fired by a schedule re-published late) only finishes what is left: the
        `sent` mark and the DSN's msg id keep the DSN from going twice."""
        try:
            request = FlushRequest.from_json(msg.data)
        except ValueError as exc:
            raise transport.undecodable(exc) from exc
        mid, wid = request.message_id, request.window_id
        with consumer_span(bounce_flush_subject(), msg.headers, {MESSAGE_ID: mid, "relais.dsn_id": wid}):
            window = await self._hold.close(mid, wid)
            if window is None:
                return  # finished by an earlier delivery of this flush
            notices = []
            for nid, payload in await self._hold.notices(mid, window.members):
                try:
                    notices.append(BounceNotice.from_msgpack(payload))
                except EnvelopeDecodeError as exc:
                    if exc.later_release:
                        # A later release held it: its replicas send this DSN (the window is
                        # closed, so a flush again only finishes it); dropped, it was lost.
                        raise transport.undecodable(exc) from exc
                    log.error("dropping undecodable held notice %s of %s", nid, mid)
            missing = len(window.members) - len(notices)
            if missing and not window.sent:
                log.warning("%s: %d held notices of DSN window %s are gone", mid, missing, wid)
            if not window.sent:
                reported = notices
                if window.kind == DELAYED and time.time() > window.flush_at + LATE_FLUSH:
                    # Its notices were checked when they came; a flush this late (a backlog, a
                    # stopped service) may come after their retries gave them an outcome.
                    reported = [w for w in [await self._still_retried(n) for n in notices] if w]
                if reported:
                    prefix = "dsnw" if window.kind == DELAYED else "dsn"
                    await self._send_dsn(reported, f"{prefix}-{mid}-{wid}", wid)
                await self._hold.mark_sent(mid, wid)
            # Bodies are released only now: the DSN above needed them for the returned headers.
            for notice in notices:
                await self._release(notice)
            await self._hold.drop(mid, window.members)
            await self._hold.finish(mid, wid)

    async def _still_retried(self, notice: BounceNotice) -> BounceNotice | None:
        """A delay warning cut to the recipients still being retried, None when none is: come
        late, it may find its retry already gave them a final outcome (`bounce.retrying`)."""
        warned = await still_retried(self._bus.js, notice, self._config.retry, time.time())
        if warned is None:
            env = notice.envelope
            log.info("no delay warning for job %s of %s: its retries have run since", env.key, env.id)
        return warned

    async def _record(self, env: Envelope, failure: Bounced, round_no: int) -> None:
        """Classify one failed recipient; suppress it if the address is dead; publish its event."""
        kind = "expired" if failure.expired else "bounced"
        category = policy.failure_category(failure, self._rules)
        detail = {"category": str(category)}
        if policy.suppresses(env, failure, category):
            # Before the event: a consumer that sees "bounced" can rely on the entry existing.
            await self._suppression.add(
                Suppression(
                    account=env.account,
                    address=failure.recipient.lower(),
                    reason="hard_bounce",
                    source=env.id,
                    category=str(category),
                    expires_at=policy.suppression_expiry(self._config.bounce),
                ),
                keep_longer=True,
            )
            detail["suppressed"] = "true"
        await publish_event(
            self._bus,
            event_for(kind, env, [failure.recipient], failure.reply, mx_host=failure.mx_host, detail=detail),
            msg_id=f"{kind}-{env.key}-{round_no}-{failure.recipient}",
        )

    @staticmethod
    def _dsn_failures(notice: BounceNotice) -> list[Bounced]:
        """The failures of a notice that the DSN may mention (NOTIFY; never to <>, never a DSN's)."""
        action = "delayed" if notice.delay_warning else "failed"
        recipients = [f.recipient for f in notice.failures]
        wanted = set(dsn_recipients(notice.envelope, recipients, action=action))
        return [f for f in notice.failures if f.recipient in wanted]

    @staticmethod
    def _dsn_relayed(notice: BounceNotice) -> list[Delivered]:
        """The relayed recipients of a notice that the DSN may mention (NOTIFY=SUCCESS)."""
        recipients = [d.recipient for d in notice.relayed]
        wanted = set(dsn_recipients(notice.envelope, recipients, action="relayed"))
        return [d for d in notice.relayed if d.recipient in wanted]

    async def _send_dsn(self, notices: list[BounceNotice], msg_id: str, dsn_id: str) -> str:
        """Publish one DSN for these notices of one message, all of one kind (final outcomes, or
        delays), if anyone should get one; returns its id or ''. `msg_id` makes a repeated call a
        no-op."""
        env = notices[0].envelope
        delayed = notices[0].delay_warning
        reported: list[tuple[BounceNotice, Bounced | Delivered]] = []
        seen: set[str] = set()
        for notice in notices:
            for f in [*self._dsn_failures(notice), *self._dsn_relayed(notice)]:
                if f.recipient not in seen:  # a recipient is in one job; belt and braces
                    seen.add(f.recipient)
                    reported.append((notice, f))
        if not reported:
            return ""
        # RET asks for the message in a DSN that reports a failure; others return its headers
        # (RFC 3461 section 4.3). One over MAX_RETURNED goes back as its headers too.
        failed = not delayed and any(isinstance(f, Bounced) for _, f in reported)
        full = policy.returns_full(env, self._config.bounce.return_full) and failed
        whole = full and env.body.size <= MAX_RETURNED
        async with self._holding_original(env.body, whole):
            original = await self._original(env.body, whole)
            headers = policy.header_block(original)
            if headers and is_report(email.message_from_bytes(headers)):
                log.info("no DSN for %s: it is itself a delivery or disposition report", env.id)
                return ""
            # One delay warning per message (`retry.delay_warning_after`), as Postfix sends: each
            # domain job warns when its own retries pass that age, minutes apart on their jittered
            # schedules, so the first warning of the message claims it and the later ones are dropped.
            if delayed and not await self._hold.claim_delay_warning(env.id, msg_id):
                log.info("no delay warning for job %s: the sender of %s was warned already", env.key, env.id)
                return ""
            now = datetime.now(UTC)
            retry_until = datetime.fromtimestamp(env.received_at + self._config.retry.max_age, UTC)
            statuses = [
                RecipientStatus(
                    final_recipient=f.recipient,
                    original_recipient=policy.original_recipient(env, f.recipient),
                    action=_action(f, delayed),
                    status=_status_for(f.reply.enhanced_status, delayed),
                    diagnostic_code=f"{f.reply.code} {f.reply.enhanced_status} {f.reply.text}",
                    diagnostic_type=_diagnostic_type(f),
                    remote_mta=f.mx_host if f.mx_host and f.mx_host != LOCAL_MAILBOX else None,
                    last_attempt=_last_attempt(notice, now),
                    will_retry_until=retry_until if delayed else None,
                )
                for notice, f in reported
            ]
            data = build_dsn(
                reporting_mta=self._hostname,
                from_address=f"{self._config.bounce.dsn_from}@{self._hostname}",
                to_address=env.sender,
                original_headers=headers,
                recipients=statuses,
                arrival_date=datetime.fromtimestamp(env.received_at, UTC),
                envelope_id=policy.envelope_id(env),
                original_message=original if whole and original else None,
                oversized_original=env.body.size if full and not whole and headers else 0,
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
            await self._bus.publish(
                submit_subject(),
                dsn.to_msgpack(),
                msg_id=msg_id,
                attributes={"relais.message_id": dsn_id, "relais.dsn_for": env.id},
            )
            return dsn_id

    def _holding_original(self, ref: BodyRef, whole: bool) -> AbstractAsyncContextManager[None]:
        """The budget for what a DSN reads of a stored original, from the read to the DSN's
        publish: the whole body, or the chunks of its header block."""
        if whole or ref.is_inline:
            return self._held.holding_body(ref)
        return self._held.holding(head_octets(ref, self._header_limit))

    async def _original(self, ref: BodyRef, whole: bool) -> bytes:
        """The original a DSN reports on: whole, or its header block alone; b"" when gone."""
        try:
            if whole:
                return await self._bodies.get(ref)
            return await self._bodies.get_head(ref, self._header_limit)
        except BodyMissing:
            return b""


def _last_attempt(notice: BounceNotice, now: datetime) -> datetime:
    """When the job was last tried: notices of one DSN may come from attempts seconds apart."""
    attempts = notice.envelope.attempts
    return datetime.fromtimestamp(attempts[-1].at, UTC) if attempts else now


def _action(outcome: Bounced | Delivered, delayed: bool) -> str:
    if isinstance(outcome, Delivered):
        # Into `relais up`'s mailbox is a final delivery (RFC 3464 2.3.3); anywhere else, the
        # message went on to a server that was not asked for DSNs.
        return "delivered" if outcome.mx_host == LOCAL_MAILBOX else "relayed"
    return "delayed" if delayed else "failed"


def _diagnostic_type(outcome: Bounced | Delivered) -> str:
    """An expiry's "554 4.4.7 Message expired ...; last reply: ..." is Relais' verdict, whatever
    stage its last temporary reply came from: typed `smtp`, it would read as an MX's 554."""
    expired = isinstance(outcome, Bounced) and outcome.expired
    return DIAGNOSTIC_LOCAL if expired else diagnostic_type(outcome.reply.command)


def _status_for(enhanced: str, delayed: bool) -> str:
    """A delay report carries a 4.x.x status (RFC 3464 2.3.4), whatever class the reply had."""
    if delayed and enhanced[:1] != "4":
        return "4" + enhanced[1:] if enhanced[:1] in "25" else "4.0.0"
    return enhanced
