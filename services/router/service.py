"""The router service: resolve each recipient domain and hand jobs to their pool's delivery subject."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from nats.aio.msg import Msg

from services.core import bus as transport
from services.core.bodies import BodyStore
from services.core.bus import Bus
from services.core.config import Config
from services.core.disposition import settle
from services.core.dns import make_resolver
from services.core.envelope import Envelope, EnvelopeDecodeError
from services.core.outcome import Bounced, Deferred
from services.core.telemetry import consumer_span
from services.core.topology import deliver_subject, route_subject, router_binding
from services.router.mx import MxRoute, resolve_mx
from services.router.plan import Job, choose_pool, split_by_domain

log = logging.getLogger(__name__)


class RouterService:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        self._bodies = BodyStore(bus.js, config.nats.inline_body_max)
        self._resolver = make_resolver(config.dns)

    async def run(self, stop: asyncio.Event) -> None:
        await transport.consume(
            self._bus,
            router_binding(),
            self.handle,
            concurrency=self._config.router.concurrency,
            stop=stop,
            ack_wait=self._config.nats.ack_wait,
        )

    async def handle(self, msg: Msg) -> None:
        try:
            env = Envelope.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.Poison(str(exc)) from exc
        with consumer_span(
            route_subject(),
            msg.headers,
            {"relais.message_id": env.id, "relais.account": env.account, "relais.attempt": env.attempt_count},
        ):
            await self.route(env)

    async def route(self, env: Envelope) -> None:
        pool = choose_pool(self._config, env)
        jobs = split_by_domain(env)
        if not env.job_id:
            await self._bodies.hold(env.body, [job.job_id for job in jobs])
        await asyncio.gather(*(self._route_job(env, job, pool) for job in jobs))

    async def _resolve(self, domain: str) -> MxRoute:
        if self._config.delivery.mode == "capture":
            return MxRoute(hosts=())
        return await resolve_mx(self._resolver, domain)

    async def _route_job(self, env: Envelope, job: Job, pool: str) -> None:
        route = await self._resolve(job.domain)
        routed = replace(env, job_id=job.job_id, recipients=job.recipients, domain=job.domain, pool=pool)
        if route.failure is not None:
            kind = Bounced if route.is_permanent_failure else Deferred
            await settle(
                self._bus,
                self._bodies,
                self._config.retry,
                routed,
                [kind(rcpt, route.failure) for rcpt in job.recipients],
            )
            return
        routed = replace(routed, mx_hosts=route.hosts, site=route.hosts[0] if route.hosts else job.domain)
        await self._bus.publish(
            deliver_subject(pool),
            routed.to_msgpack(),
            msg_id=f"{job.job_id}.{env.attempt_count}",
            attributes={"relais.message_id": env.id, "relais.pool": pool, "relais.site": routed.site},
        )
