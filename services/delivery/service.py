"""The delivery service: pull jobs of the pools this worker serves, send them, settle outcomes."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from nats.aio.msg import Msg

from services.core import bus as transport
from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import Bus
from services.core.config import Config
from services.core.disposition import settle
from services.core.dns import make_resolver
from services.core.envelope import Envelope, EnvelopeDecodeError
from services.core.returnpath import return_path
from services.core.telemetry import consumer_span
from services.core.topology import delivery_binding
from services.delivery.capture import capture
from services.delivery.smtp_session import AttemptResult, SessionSettings, send_message
from services.delivery.sources import pick_source, pool_sources

log = logging.getLogger(__name__)


class DeliveryService:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        self._bodies = BodyStore(bus.js, config.nats.inline_body_max)
        self._resolver = make_resolver(config.dns)
        d = config.delivery
        self._settings = SessionSettings(
            port=d.smtp_port,
            connect_timeout=d.connect_timeout,
            command_timeout=d.command_timeout,
            starttls=d.starttls,
            tls_verify=d.tls_verify,
        )
        self._mailbox = Path(d.capture_dir)

    async def run(self, stop: asyncio.Event) -> None:
        pools = self._config.served_pools()
        per_pool = max(1, self._config.delivery.concurrency // max(1, len(pools)))
        await asyncio.gather(
            *(
                transport.consume(
                    self._bus,
                    delivery_binding(pool),
                    self.handle,
                    concurrency=per_pool,
                    stop=stop,
                    ack_wait=self._config.nats.ack_wait,
                )
                for pool in pools
            )
        )

    async def handle(self, msg: Msg) -> None:
        try:
            env = Envelope.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.Poison(str(exc)) from exc
        attrs = {
            "relais.message_id": env.id,
            "relais.job_id": env.job_id,
            "relais.pool": env.pool,
            "relais.site": env.site,
            "relais.attempt": env.attempt_count + 1,
        }
        with consumer_span(msg.subject, msg.headers, attrs) as span:
            try:
                body = await self._bodies.get(env.body)
            except BodyMissing:
                # Redelivered after its final outcome (body already released): nothing to do.
                log.info("job %s already finished; dropping redelivery", env.key)
                return
            # DKIM-Signature field(s) the router computed once per message (services/router/dkim.py).
            body = env.meta.get("dkim", "").encode() + body
            started = time.monotonic()
            result = await self._attempt(env, body)
            span.set_attribute("relais.mx_host", result.mx_host)
            span.set_attribute("relais.duration_ms", int((time.monotonic() - started) * 1000))
            if result.tls:
                span.set_attribute("tls.protocol.version", result.tls)
            kinds = sorted({o.kind for o in result.outcomes})
            span.set_attribute("relais.outcome", ",".join(kinds))
            await settle(
                self._bus,
                self._bodies,
                self._config.retry,
                env,
                result.outcomes,
                mx_host=result.mx_host,
                source_ip=result.source_ip,
            )

    async def _attempt(self, env: Envelope, body: bytes) -> AttemptResult:
        if self._config.delivery.mode == "capture":
            outcomes = await asyncio.to_thread(capture, self._mailbox, env, body)
            return AttemptResult(outcomes, mx_host="mailbox")
        source = pick_source(pool_sources(self._config, env.pool))
        result = await send_message(
            resolver=self._resolver,
            mx_hosts=env.mx_hosts,
            # VERP return path when configured (async bounces map back to message and recipient).
            sender=return_path(self._config.bounce, env),
            recipients=env.recipients,
            body=body,
            source=source,
            settings=self._settings,
        )
        result.source_ip = source.address
        return result
