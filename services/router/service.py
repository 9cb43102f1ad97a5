"""The router service: sign, split by recipient domain, drop suppressed recipients, resolve each
domain, pick the pool (and, while warming, the source), and hand jobs to the pool's subject."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import dns.asyncresolver
from nats.aio.msg import Msg

from services.core import bus as transport
from services.core import metrics
from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import Bus, consume_declared, patiently
from services.core.config import AccountConfig, Config
from services.core.disposition import settle, settle_missing_body
from services.core.dns import make_resolver
from services.core.envelope import (
    META_DKIM,
    META_SOURCE,
    META_WARMUP_DAY,
    Envelope,
    EnvelopeDecodeError,
    Verdict,
    job_msg_id,
)
from services.core.events import event_for, publish_event
from services.core.held_bodies import HeldBodies
from services.core.outcome import Bounced, Deferred, Reply
from services.core.schedule import fired_by
from services.core.suppression import Suppression, SuppressionList
from services.core.telemetry import consumer_span
from services.core.topology import (
    deliver_subject,
    route_subject,
    router_binding,
    submit_binding,
    verdict_binding,
    verdict_subject,
)
from services.router import dkim
from services.router.accounts import AccountView
from services.router.mx import MxRoute, resolve_mx
from services.router.plan import Job, choose_pool, split_by_domain, without_suppressed
from services.router.sites import SiteRules, site_for
from services.router.warmup import WARMUP_DEFERRED, WarmupCounters, pick_source

log = logging.getLogger(__name__)

SUPPRESSED = Reply(550, "5.7.1", "Recipient is on the account's suppression list; not sent", "QUEUE")
# The account's pool (or the "default" it falls back to) is not configured: no delivery worker
# takes that pool's jobs. Waiting for the configuration to be mended, as Postfix does with an
# unknown transport, gives the mail an outcome; a job for that pool would wait for ever.
NO_POOL = Reply(451, "4.3.5", "No IP pool is configured for this sender; will retry", "QUEUE")
# Verdicts are jobs the router settles itself (failing domains, warm-up, suppressed recipients):
# a small share of the jobs, each a couple of publishes.
_VERDICT_SLOTS = 16


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one recipient domain's mail goes, and the site (provider) it belongs to."""

    route: MxRoute
    site: str


async def destination(
    resolver: dns.asyncresolver.Resolver, rules: SiteRules, domain: str, *, ip_literals: bool = True
) -> Destination:
    """The routing decision for one domain (what bench/route.py measures)."""
    route = await resolve_mx(resolver, domain, ip_literals=ip_literals)
    site = site_for(domain, route.hosts, route.primary, rules) if route.failure is None else ""
    return Destination(route, site)


class RouterService:
    def __init__(self, config: Config, bus: Bus, *, rng: random.Random | None = None) -> None:
        self._config = config
        self._bus = bus
        self._bodies = BodyStore(
            bus.js, config.nats.inline_body_max, bus, purges=config.nats.declare_topology
        )
        self._held = HeldBodies(config.router.max_buffered_bytes)
        self._resolver = make_resolver(config.dns)
        self._sites = SiteRules.from_config(config.sites)
        self._suppression = SuppressionList(bus.js, bus)
        self._counters = WarmupCounters(bus)
        self._accounts = AccountView(bus.js, config)
        self._dkim_keys = dkim.load_keys(config)
        self._rng = rng or random.Random()

    async def run(self, stop: asyncio.Event) -> None:
        # New mail (relais.submit) and mail routed again (relais.route: jobs handed back, DNS
        # retries) are one kind of message in two streams; only the second takes schedules, so
        # only the router and delivery may publish there. Each queue has its own slots: a burst
        # of retries fired at once never holds new mail back, nor the other way round.
        await asyncio.gather(
            *(
                consume_declared(
                    self._bus,
                    self._config,
                    binding,
                    self.handle,
                    concurrency=self._config.router.concurrency,
                    stop=stop,
                )
                for binding in (submit_binding(), router_binding())
            ),
            consume_declared(
                self._bus,
                self._config,
                verdict_binding(),
                self.carry_out,
                concurrency=_VERDICT_SLOTS,
                stop=stop,
            ),
        )

    async def handle(self, msg: Msg) -> None:
        try:
            env = Envelope.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.undecodable(exc) from exc
        stored_at = msg.metadata.timestamp
        if env.refused_when_stored_at(stored_at.timestamp()):
            # Stored after the ingress had already answered 451 (a publish flushed after a
            # reconnect): the client sends it again. Or the ingress misjudged the servers'
            # clock (it was stepped since it measured it), and a message told 250 is lost.
            log.error(
                "message %s stored too late, at %s, %.1fs after its accept_by %s: refused at the "
                "ingress (451), or that ingress's clock is broken; dropping it",
                env.id,
                stored_at.isoformat(timespec="milliseconds"),
                stored_at.timestamp() - env.accept_by,
                datetime.fromtimestamp(env.accept_by, UTC).isoformat(timespec="milliseconds"),
            )
            await self._bodies.discard(env.body)
            return
        with consumer_span(
            msg.subject,  # relais.submit or relais.route, the router's two queues
            msg.headers,
            {"relais.message_id": env.id, "relais.account": env.account, "relais.attempt": env.attempt_count},
        ):
            await self.route(env)

    async def carry_out(self, msg: Msg) -> None:
        """Carry out a verdict that a router stored: the suppressed event of its dropped
        recipients, then the delivery job of the others, or their retry or bounce notice (as
        delivery settles an attempt's outcomes, at the time it was decided). Each publish has
        a msg id of its own, so a verdict handled again stores nothing twice."""
        scheduler = fired_by(msg.headers)
        if scheduler:
            # A router stores its verdicts itself, never through a schedule. Delivery's
            # postponements share the verdicts' stream, and a schedule fires into any subject of
            # its stream, whoever may publish there: this one was forged with delivery's password.
            raise transport.Poison(f"a verdict fired by the schedule on {scheduler}: not carried out")
        try:
            verdict = Verdict.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.undecodable(exc) from exc
        env = verdict.envelope
        with consumer_span(
            verdict_subject(),
            msg.headers,
            {"relais.message_id": env.id, "relais.job_id": env.job_id, "relais.attempt": env.attempt_count},
        ):
            if verdict.suppressed:
                await self._publish_suppressed(env, verdict.suppressed, verdict.suppressed_for)
            if not env.recipients:
                await self._bodies.release(env.body, env.job_id)
            elif verdict.reply is None:
                await self._publish_job(env, f"{job_msg_id(env)}.kept")
            else:
                kind = Bounced if verdict.bounce else Deferred
                await settle(
                    self._bus,
                    self._bodies,
                    self._config.retry,
                    env,
                    [kind(rcpt, verdict.reply) for rcpt in env.recipients],
                    now=verdict.decided_at,
                    rng=random.Random(verdict.seed),
                )

    async def route(self, env: Envelope) -> None:
        jobs = split_by_domain(env)
        account = await self._accounts.get(env.account)
        if not env.job_id:
            # First pass over the whole message: sign it once for all its recipient domains.
            if env.kind == "message" and META_DKIM not in env.meta:
                try:
                    env = await self._sign(env, account)
                except BodyMissing:
                    # Redelivered after its final outcome, or its body outlived by a long wait.
                    await self._body_missing(env, jobs, account)
                    return
            # Every job is held before suppression is looked at: ids never depend on the list.
            await self._bodies.hold(env.body, [job.job_id for job in jobs])
        pool = choose_pool(self._config, env, account)
        suppressed = await self._suppressed(env)
        # Every job runs to its end, failed siblings or not: a pass must be over before its
        # message can come back (a second pass overlapping it could decide a job otherwise).
        results = await asyncio.gather(
            *(self._route_job(env, job, pool, suppressed) for job in jobs), return_exceptions=True
        )
        failed = [(job, r) for job, r in zip(jobs, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            await self._hand_back(env, failed, done=len(jobs) - len(failed))

    async def _body_missing(self, env: Envelope, jobs: Sequence[Job], account: AccountConfig | None) -> None:
        """The message as its jobs would have it (recipients without duplicates, its pool), for
        `settle_missing_body` to drop or expire as a whole."""
        recipients = tuple(rcpt for job in jobs for rcpt in job.recipients)
        pool = choose_pool(self._config, env, account)
        whole = replace(env, recipients=recipients, pool=pool)
        await settle_missing_body(self._bus, self._bodies, self._config, whole)

    async def _hand_back(self, env: Envelope, failed: list[tuple[Job, BaseException]], *, done: int) -> None:
        """Queue the jobs that failed as route messages of their own, so only they are routed
        again. Redelivering the whole message would route its finished jobs again too: maybe to
        another fate (DNS changed meanwhile), and, once the failure has outlasted the duplicate
        window, into a second delivery job (warm-up alone would not mind: it keeps the verdict
        of each attempt). With nothing finished, the message itself is redelivered as before."""
        error = failed[0][1]
        if not done or not isinstance(error, Exception):
            raise error
        try:
            for job, exc in failed:
                log.warning("job %s of message %s failed, to be routed again: %r", job.job_id, env.id, exc)
                await self._route_again(env, job)
        except Exception as unqueued:
            raise error from unqueued

    async def _route_again(self, env: Envelope, job: Job) -> None:
        # The same attempt: a delivery job that the failed pass did store is then a duplicate.
        payload = replace(env, job_id=job.job_id, recipients=job.recipients, domain=job.domain).to_msgpack()
        await patiently(
            lambda: self._bus.publish(
                route_subject(),
                payload,
                msg_id=f"again-{job.job_id}-{env.attempt_count}",
                headers={"traceparent": env.trace_context} if env.trace_context else None,
                attributes={"relais.message_id": env.id},
            ),
            f"job {job.job_id} routed again",
        )

    async def _sign(self, env: Envelope, account: AccountConfig | None) -> Envelope:
        domains = account.domains if account else ()
        if not dkim.may_sign(self._dkim_keys, env.sender_domain, domains):
            return env
        async with self._held.holding_body(env.body):
            return await self._signed(env, domains)

    async def _signed(self, env: Envelope, domains: Sequence[str]) -> Envelope:
        body = await self._bodies.get(env.body)
        keys = dkim.signing_keys(self._dkim_keys, body, env.sender_domain, domains)
        if not keys:
            return env
        # RSA signing and hashing a large body take CPU: keep the event loop free.
        try:
            signed = await asyncio.to_thread(dkim.sign, body, keys)
        except dkim.SigningError as exc:
            # Unsigned rather than retried for ever: a message that fails once fails every time.
            log.warning("message %s sent without DKIM signature (%s): %s", env.id, exc.reason, exc)
            metrics.DKIM_SIGN_FAILURES.labels(exc.reason).inc()
            return env
        for failure in signed.failures:
            log.warning("message %s lacks one DKIM signature (%s): %s", env.id, failure.reason, failure)
            metrics.DKIM_SIGN_FAILURES.labels(failure.reason).inc()
        return replace(env, meta={**env.meta, META_DKIM: signed.fields})

    async def _suppressed(self, env: Envelope) -> Mapping[str, Suppression]:
        """Active suppression entries of the message's recipients (DSNs are never suppressed)."""
        if env.kind != "message":
            return {}
        return await self._suppression.get_many(env.account, env.recipients)

    async def _resolve(self, domain: str) -> Destination:
        if self._config.delivery.mode == "capture":
            return Destination(MxRoute(hosts=()), domain)
        return await destination(
            self._resolver, self._sites, domain, ip_literals=self._config.router.mx_ip_literals
        )

    async def _route_job(
        self, env: Envelope, job: Job, pool: str, suppressed: Mapping[str, Suppression]
    ) -> None:
        """Store the job's one fate: its delivery job, or a `Verdict` when the router settles
        some or all of its recipients itself (suppressed, bounced, deferred). Either goes under
        the job's msg id, so a pass repeated after a crash stores nothing beside the first."""
        job, dropped = without_suppressed(job, suppressed)
        # A pinned source is decided afresh for every attempt (a retry may go out elsewhere).
        meta = {k: v for k, v in env.meta.items() if k not in (META_SOURCE, META_WARMUP_DAY)}
        routed = replace(
            env, job_id=job.job_id, recipients=job.recipients, domain=job.domain, pool=pool, meta=meta
        )
        routed, reply, bounce = await self._decide(routed) if job.recipients else (routed, None, False)
        if reply is None and not dropped:
            await self._publish_job(routed, job_msg_id(routed))
            return
        because = ",".join(sorted({suppressed[r.lower()].reason for r in dropped}))
        verdict = Verdict(routed, reply, bounce, time.time(), self._rng.random(), dropped, because)
        payload = verdict.to_msgpack()
        await patiently(
            lambda: self._bus.publish(
                verdict_subject(),
                payload,
                msg_id=job_msg_id(routed),
                attributes={"relais.message_id": routed.id, "relais.reply": str(reply or SUPPRESSED)},
            ),
            f"verdict on job {routed.job_id}",
        )

    async def _decide(self, routed: Envelope) -> tuple[Envelope, Reply | None, bool]:
        """The job with its MX hosts, site and source, and no reply: it is to be delivered. Or
        the reply every recipient gets instead, and whether it bounces them."""
        if routed.pool not in self._config.pools:
            pool, job = routed.pool, routed.job_id
            log.error("message %s: pool %r is not configured; deferring job %s", routed.id, pool, job)
            return routed, NO_POOL, False
        dest = await self._resolve(routed.domain)
        route = dest.route
        if route.failure is not None:
            return routed, route.failure, route.is_permanent_failure
        routed = replace(routed, mx_hosts=route.hosts, site=dest.site)
        pick = await pick_source(
            self._config,
            self._counters,
            routed.pool,
            dest.site,
            len(routed.recipients),
            job=job_msg_id(routed),  # a pass repeated for this attempt takes the verdict stored then
            now=time.time(),
            rng=self._rng,
        )
        if pick.defer:
            return routed, WARMUP_DEFERRED, False
        if pick.source:
            # With the day it was counted for, if any: delivery must not send it on a later one.
            pinned = {META_SOURCE: pick.source} | ({META_WARMUP_DAY: pick.day} if pick.day else {})
            routed = replace(routed, meta={**routed.meta, **pinned})
        return routed, None, False

    async def _publish_job(self, routed: Envelope, msg_id: str) -> None:
        # Patiently, as `settle` does: giving up would have this job routed again, and
        # a second pass may decide this job otherwise (warm-up cap reached, DNS failing) after
        # the first one's job was in fact stored: two fates. The msg id dedupes the repeats.
        payload = routed.to_msgpack()
        await patiently(
            lambda: self._bus.publish(
                deliver_subject(routed.pool),
                payload,
                msg_id=msg_id,
                attributes={
                    "relais.message_id": routed.id,
                    "relais.pool": routed.pool,
                    "relais.site": routed.site,
                },
            ),
            f"delivery job {routed.job_id}",
        )

    async def _publish_suppressed(self, routed: Envelope, dropped: tuple[str, ...], because: str) -> None:
        digest = hashlib.sha256("\n".join(sorted(dropped)).encode()).hexdigest()[:12]
        event = event_for("suppressed", routed, dropped, SUPPRESSED, detail={"reason": because})
        await publish_event(
            self._bus,
            # This routing pass decided it: numbered like a verdict of the same pass (from 1).
            replace(event, attempt=routed.attempt_count + 1),
            msg_id=f"sup-{routed.job_id}-{routed.attempt_count}-{digest}",
        )
