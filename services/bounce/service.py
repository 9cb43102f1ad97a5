"""The bounce service: permanent failures and expiries become DSNs to the envelope sender."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime

from nats.aio.msg import Msg

from services.bounce.dsn import RecipientStatus, build_dsn
from services.core import bus as transport
from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import Bus
from services.core.config import Config
from services.core.envelope import BounceNotice, Envelope, EnvelopeDecodeError, new_message_id
from services.core.events import event_for, publish_event
from services.core.telemetry import consumer_span
from services.core.topology import bounce_binding, bounce_subject, route_subject

log = logging.getLogger(__name__)


def header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


def wants_dsn(env: Envelope) -> bool:
    """Never to the null sender, never about a DSN: that is how bounce loops start."""
    return bool(env.sender) and env.kind != "dsn"


class BounceService:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        self._bodies = BodyStore(bus.js, config.nats.inline_body_max)
        self._hostname = config.bounce.reporting_mta or config.ingress.hostname

    async def run(self, stop: asyncio.Event) -> None:
        await transport.consume(
            self._bus,
            bounce_binding(),
            self.handle,
            concurrency=32,
            stop=stop,
            ack_wait=self._config.nats.ack_wait,
        )

    async def handle(self, msg: Msg) -> None:
        try:
            notice = BounceNotice.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.Poison(str(exc)) from exc
        env = notice.envelope
        with consumer_span(
            bounce_subject(),
            msg.headers,
            {"relais.message_id": env.id, "relais.job_id": env.job_id, "relais.outcome": "bounced"},
        ) as span:
            round_no = env.attempt_count
            if wants_dsn(env):
                dsn_id = await self._send_dsn(notice, round_no)
                span.set_attribute("relais.dsn_id", dsn_id)
            kind = "expired" if notice.expired else "bounced"
            for failure in notice.failures:
                await publish_event(
                    self._bus,
                    event_for(kind, env, [failure.recipient], failure.reply, mx_host=failure.mx_host),
                    msg_id=f"{kind}-{env.key}-{round_no}-{failure.recipient}",
                )
            if notice.releases_body:
                await self._bodies.release(env.body, env.key)

    async def _send_dsn(self, notice: BounceNotice, round_no: int) -> str:
        env = notice.envelope
        try:
            original = await self._bodies.get(env.body)
        except BodyMissing:
            original = b""
        now = datetime.now(UTC)
        statuses = [
            RecipientStatus(
                final_recipient=f.recipient,
                action="failed",
                status=f.reply.enhanced_status,
                diagnostic_code=f"{f.reply.code} {f.reply.enhanced_status} {f.reply.text}",
                remote_mta=f.mx_host or None,
                last_attempt=now,
            )
            for f in notice.failures
        ]
        full = self._config.bounce.return_full or env.dsn_ret.upper() == "FULL"
        dsn_id = new_message_id()
        data = build_dsn(
            reporting_mta=self._hostname,
            from_address=f"{self._config.bounce.dsn_from}@{self._hostname}",
            to_address=env.sender,
            original_headers=header_block(original),
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
        await self._bus.publish(
            route_subject(),
            dsn.to_msgpack(),
            msg_id=f"dsn-{env.key}-{round_no}",
            attributes={"relais.message_id": dsn_id, "relais.dsn_for": env.id},
        )
        return dsn_id
