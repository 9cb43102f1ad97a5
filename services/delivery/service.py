"""The delivery service: pull jobs of the pools this worker serves, shape, send, settle outcomes.

Per job: pick a usable source in the job's pool (the router's warm-up pin first), wait for the
(source, site) shaping slot, send over a reused connection under the site's TLS policy, apply
the outcome rewrite rules, record provider push-back, and settle. A job that may not go now
(paused, or its slot is further away than `max_shaping_wait`) is re-scheduled to its own
delivery subject with a JetStream message schedule, without counting an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import Header

from services.core import bus as transport
from services.core import metrics
from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import BrokerUnavailable, Bus
from services.core.config import Config
from services.core.disposition import settle, settle_missing_body
from services.core.dns import make_resolver
from services.core.envelope import META_DKIM, META_SOURCE, META_WARMUP_DAY, Envelope, EnvelopeDecodeError
from services.core.held_bodies import HeldBodies
from services.core.outcome import LOCAL_MAILBOX, NO_ROUTE, Deferred, Reply
from services.core.returnpath import return_path
from services.core.schedule import publish_at
from services.core.telemetry import consumer_span, record_reply
from services.core.topology import (
    deliver_retry_subject,
    deliver_subject,
    delivery_binding,
    pool_of_deliver_subject,
)
from services.delivery import gauges
from services.delivery.capture import capture
from services.delivery.connections import ConnectionPool, Saturated
from services.delivery.control import DeliveryControl
from services.delivery.draining import Stopping
from services.delivery.limits import SharedLimits
from services.delivery.mta_sts import MtaSts
from services.delivery.public_addresses import why_not_public
from services.delivery.redelivery import (
    NOTHING,
    PARTLY_SETTLED_META,
    POSTPONED,
    Stored,
    left_to_send,
    postponed,
    postponement_id,
    stored_outcome,
    unmarked,
)
from services.delivery.sending import AttemptResult, send_job
from services.delivery.shaping import Limits, Shaping, load_shaping
from services.delivery.smtp_session import SessionSettings, Source, client_tls_context
from services.delivery.sources import RECHECK_SECONDS, SourceHealth, choose_source, pool_sources
from services.delivery.tls_policy import tls_policy

log = logging.getLogger(__name__)

# Envelope meta set when a job was re-scheduled to a reserved shaping slot: "<source>|<site>|<time>",
# and the interval it was reserved at and when the job is due back for it under keys of their
# own (so that workers of the previous release, which read only the first, keep honouring it
# during an upgrade). It is good for one attempt: the retry of a deferred job must take a slot
# of its own, and a push-back that slowed the site since makes it void, as does coming back long
# after it was due (`_Slot.late`).
SLOT_META = "shaping_slot"
SLOT_INTERVAL_META = "shaping_slot_interval"
SLOT_DUE_META = "shaping_slot_due"
_SLOT_METAS = (SLOT_META, SLOT_INTERVAL_META, SLOT_DUE_META)
# How late after the second its schedule fired a job may still go in its carried slot. Later
# than that (a delivery outage, a consumer backlog: many such jobs reach a worker together) the
# slot is void and the job takes a fresh one, or they would all go in one burst, as a held slot
# more than limits.SLOT_GRACE late is dropped. The schedule fires by the NATS server's clock and
# lateness is judged by the worker's: a grace of a second would void every slot of a worker whose
# clock ran a second ahead, and its jobs, sent to the back of the queue each time they came back,
# could wait until they expired. Half a minute bounds a burst to half a minute of the site's rate.
CARRIED_SLOT_GRACE = 30.0
# A job pinned to a source of another host is handed back this many times at most, each after
# this delay; with N hosts sharing a pool each offer reaches the right one with chance 1/N, so
# 32 offers miss with 4% at N = 10. After that it goes from a source here: mail before caps.
_PINNED_OFFERS = 32
_PINNED_RETRY = 0.25


# A job pinned by the router's warm-up was counted against its source's cap for one UTC day.
WARMUP_DAY_OVER = Reply(451, "4.4.5", "Warm-up counted this for a day that is over; will retry", "QUEUE")


def counted_for_a_day_over(env: Envelope, now: float) -> bool:
    """Whether warm-up counted the job for a UTC day before `now`'s. A day ahead of ours (the
    router's clock ahead of this host's) is no reason to wait; a job pinned without a day (by a
    previous release) goes as before."""
    day = env.meta.get(META_WARMUP_DAY, "")
    return bool(day) and day < datetime.fromtimestamp(now, UTC).date().isoformat()


class DeliveryService:
    def __init__(self, config: Config, bus: Bus, *, shaping: Shaping | None = None) -> None:
        self._config = config
        self._bus = bus
        self._stop = asyncio.Event()  # run()'s: set once the worker drains
        self._bodies = BodyStore(
            bus.js, config.nats.inline_body_max, bus, purges=config.nats.declare_topology
        )
        self._held = HeldBodies(config.delivery.max_buffered_bytes)
        self._resolver = make_resolver(config.dns)
        d = config.delivery
        self._settings = SessionSettings(
            port=d.smtp_port,
            connect_timeout=d.connect_timeout,
            command_timeout=d.command_timeout,
            data_done_timeout=d.data_done_timeout,
            starttls=d.starttls,
            tls_verify=d.tls_verify,
            tls_ca_file=d.tls_ca_file,
        )
        self._mailbox = Path(d.capture_dir)
        self.shaping = shaping or load_shaping(d.shaping_file)
        self.health = SourceHealth()
        self.limits = SharedLimits(bus.js)
        self.control = DeliveryControl(bus.js)
        self.connections = ConnectionPool(
            self.limits, self._settings, idle_timeout=d.idle_timeout, lease_wait=min(5.0, d.max_shaping_wait)
        )
        self.attempts = 0  # SMTP attempts made by this worker (tests, benchmarks, metrics)
        self.postponed: Counter[str] = Counter()  # re-scheduled jobs by reason
        self.pin_missed = 0  # jobs pinned to another host's source that went from one here
        self.settled_before = 0  # redelivered jobs whose attempt was settled: not sent again
        self.postponed_before = 0  # redelivered jobs that were postponed: left to their schedule
        self.pushbacks: Counter[tuple[str, str]] = Counter()  # (site, rule) back-offs started
        self.possible_duplicates: Counter[tuple[str, str]] = Counter()  # (pool, site): maybe_taken
        gauges.DELIVERY.track(self)
        # delivery.public_mx_only: MX hosts and MTA-STS policy hosts only on public addresses.
        self._address_check = why_not_public if d.public_mx_only else None
        self._sts = MtaSts(
            self._resolver,
            url_template=d.mta_sts_url,
            context=client_tls_context(True, d.tls_ca_file),
            timeout=d.connect_timeout,
            address_check=self._address_check,
        )

    def serving(self) -> list[str]:
        """The configured pools this host can send for: at least one source address binds here."""
        pools = self._config.served_pools()
        if self._config.delivery.mode == "capture":
            return pools
        self.health.probe(self._config, pools)
        usable = [p for p in pools if self.health.usable(pool_sources(self._config, p))]
        for pool in sorted(set(pools) - set(usable)):
            log.warning("not serving pool %s: none of its source addresses can be bound on this host", pool)
        return usable

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        pools = self.serving()
        await self.control.start(stop)
        self.connections.start()
        per_pool = max(1, self._config.delivery.concurrency // max(1, len(pools)))
        if not pools:
            log.error("no pool can be served from this host yet; looking again every minute")
        consuming = {pool: self._consume(pool, per_pool, stop) for pool in pools}
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                done, _ = await asyncio.wait(
                    {stopped, *consuming.values()},
                    timeout=RECHECK_SECONDS,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for pool, task in list(consuming.items()):
                    if task in done:
                        del consuming[pool]
                        task.result()  # a consumer that failed takes the worker down, as before
                # A pool none of whose addresses bound at start (an IP that fails over to this
                # host later) is served once one of them does.
                for pool in self._config.served_pools():
                    if pool not in consuming and self.health.usable(pool_sources(self._config, pool)):
                        log.info("serving pool %s: one of its source addresses binds here now", pool)
                        consuming[pool] = self._consume(pool, per_pool, stop)
            await asyncio.gather(*consuming.values())
        finally:
            stopped.cancel()
            for task in consuming.values():
                task.cancel()
            await self.connections.close()
            await self.control.stop()

    def _consume(self, pool: str, concurrency: int, stop: asyncio.Event) -> asyncio.Task[None]:
        return asyncio.create_task(
            transport.consume_declared(
                self._bus,
                self._config,
                delivery_binding(pool),
                self.handle,
                concurrency=concurrency,
                stop=stop,
                confirm_acks=True,
            )
        )

    async def handle(self, msg: Msg) -> None:
        try:
            env = Envelope.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.undecodable(exc) from exc
        if not env.pool:
            env = replace(env, pool=pool_of_deliver_subject(msg.subject))
        self._hand_back_if_pinned_elsewhere(env, msg)
        attrs = {
            "relais.message_id": env.id,
            "relais.job_id": env.job_id,
            "relais.pool": env.pool,
            "relais.site": env.site,
            "relais.attempt": env.attempt_count + 1,
        }
        with consumer_span(msg.subject, msg.headers, attrs) as span:
            stored = await self._stored_outcome(env, msg)
            if stored.postponed:
                span.set_attribute("relais.outcome", "postponed")
                self._leave_to_postponement(env)
                return
            if stored.complete:
                span.set_attribute("relais.outcome", "settled")
                self._finish_settled(env)
                return
            kept: list[Deferred] = []
            if stored.partly:
                left = await left_to_send(self._bus, env, stored)
                if left is None:
                    span.set_attribute("relais.outcome", "deferred")
                    return
                env, kept = left
            # Held from the fetch to the attempt's end: the settling needs no body.
            async with self._held.holding_body(env.body):
                try:
                    body = await self._bodies.get(env.body)
                except BodyMissing:
                    # Redelivered after its final outcome, or its body outlived by a long wait.
                    await settle_missing_body(self._bus, self._bodies, self._config, env)
                    return
                # DKIM-Signature field(s) the router computed once per message (services/router/dkim.py).
                body = env.meta.get(META_DKIM, "").encode() + body
                started = time.monotonic()
                result = await self._attempt(env, body, msg.metadata.sequence.stream)
                del body
            if result is None:
                span.set_attribute("relais.outcome", "postponed")
                return
            duration_ms = int((time.monotonic() - started) * 1000)
            metrics.observe_attempt(env.pool, duration_ms / 1000)
            span.set_attribute("relais.mx_host", result.mx_host)
            span.set_attribute("relais.source_ip", result.source_ip)
            span.set_attribute("relais.duration_ms", duration_ms)
            if result.tls_version:
                span.set_attribute("tls.protocol.version", result.tls_version)
            outcomes = [self.shaping.rewrite(o) for o in result.outcomes]
            if kept and any(isinstance(o, Deferred) for o in outcomes):
                # This retry schedule replaces the stored one of the attempt: it keeps its recipients.
                outcomes += kept
            span.set_attribute("relais.outcome", ",".join(sorted({o.kind for o in outcomes})))
            if outcomes:  # the attempt's reply, also when it only leads to a bounce notice
                record_reply(outcomes[0].reply.code, outcomes[0].reply.enhanced_status)
            await settle(
                self._bus,
                self._bodies,
                self._config.retry,
                unmarked(_without_slot(env)),
                outcomes,
                mx_host=result.mx_host,
                source_ip=result.source_ip,
                facts={
                    "mx_address": result.address,
                    "tls_version": result.tls_version,
                    "tls_cipher": result.tls_cipher,
                    "duration_ms": duration_ms,
                },
                # The attempt's stored retry, still waiting, needs the body: not released here.
                retry_stored=stored.retry is not None,
                notice_stored=stored.notice,
                # A full store holds the job here, not sent again by the next worker.
                stop=self._stop,
            )

    async def _stored_outcome(self, env: Envelope, msg: Msg) -> Stored:
        """What was stored of this attempt, or of this job's postponement, before the job came
        back (`redelivery`): only a redelivered job asks, so a first delivery costs no round trip
        more."""
        redelivered = msg.metadata.num_delivered > 1
        if not redelivered and PARTLY_SETTLED_META not in env.meta:
            return NOTHING
        try:
            if redelivered and await postponed(self._bus, env, msg.metadata.sequence.stream):
                return POSTPONED
            return await stored_outcome(self._bus, env)
        except BrokerUnavailable as exc:
            # Sending without knowing could send the mail a second time: ask again later.
            raise transport.Retry(f"cannot tell whether job {env.key} was settled: {exc}") from exc

    def _finish_settled(self, env: Envelope) -> None:
        """A job whose attempt was settled before its ack was lost: acked without sending.

        Settle's last step, the body's release when every recipient was delivered, is not
        made again: which recipients the stored `delivered` event names is not known here, and
        releasing while a retry still needs the body would lose it. A worker that died in the
        moment between that event and the release leaves the body to its TTL (`body_ttl`)."""
        self.settled_before += 1
        log.info(
            "job %s came back after its attempt %d was settled; not sending it again",
            env.key,
            env.attempt_count + 1,
        )

    def _leave_to_postponement(self, env: Envelope) -> None:
        """A job postponed before its ack was lost: acked without acting. Its schedule, or the
        copy the schedule brought back, is the job's one live copy."""
        self.postponed_before += 1
        log.info("job %s came back after it was postponed; its schedule carries it on", env.key)

    def _hand_back_if_pinned_elsewhere(self, env: Envelope, msg: Msg) -> None:
        """Raises transport.Retry for a job pinned to a source this host cannot bind, so that
        the pool's workers get it again, until one that has the address takes it."""
        pinned = env.meta.get(META_SOURCE, "")
        if pinned in self.health.unhealthy and msg.metadata.num_delivered < _PINNED_OFFERS:
            # Warm-up counted this job against `pinned`, an address of another host (one per
            # node in Kubernetes): a worker there must send it, or the cap means nothing. The
            # pool's workers all pull one consumer, so the job goes back to them.
            raise transport.Retry(f"pinned source {pinned} is not on this host", delay=_PINNED_RETRY)

    async def _attempt(self, env: Envelope, body: bytes, job_seq: int) -> AttemptResult | None:
        """One delivery attempt, or None when the job (stream message `job_seq`) was re-scheduled
        instead (paused, shaped)."""
        if self._config.delivery.mode == "capture":
            outcomes = await asyncio.to_thread(capture, self._mailbox, env, body)
            return AttemptResult(outcomes, mx_host=LOCAL_MAILBOX)
        d = self._config.delivery
        if self._stop.is_set():
            # Draining: another worker takes it at once, rather than this one starting an
            # attempt the grace period before the kill was not sized for.
            await self._postpone(env, job_seq, time.time(), "stopping")
            return None
        if self.control.paused("pool", env.pool) or self.control.paused("site", env.site):
            await self._postpone(env, job_seq, time.time() + d.pause_recheck, "paused")
            return None
        site = self.shaping.site_for(env.site, env.domain, env.mx_hosts[0] if env.mx_hosts else "")
        if site != env.site and self.control.paused("site", site):
            await self._postpone(env, job_seq, time.time() + d.pause_recheck, "paused")
            return None
        candidates = [
            (s, w)
            for s, w in self.health.usable(pool_sources(self._config, env.pool))
            if not self.control.paused("source", s.address)
        ]
        pinned = env.meta.get(META_SOURCE, "")
        slot = _parse_slot(
            env.meta.get(SLOT_META, ""), env.meta.get(SLOT_INTERVAL_META, ""), env.meta.get(SLOT_DUE_META, "")
        )
        source = choose_source(candidates, slot.source or pinned)
        if pinned and source is not None and source.address != pinned:
            self.pin_missed += 1
            log.warning(
                "job %s pinned to %s goes from %s: none of its hosts took it",
                env.key,
                pinned,
                source.address,
            )
        if source is None:
            await self._postpone(env, job_seq, time.time() + d.pause_recheck, "no usable source")
            return None
        limits = self.shaping.limits(site, source.address)
        used = await self._message_slot(env, job_seq, source, site, limits, slot)
        if used is None:
            return None
        if self._paused_meanwhile(env, site, source.address):
            # Paused while the job waited here for its slot: it has not begun sending, and a
            # pause holds all such mail. It keeps the slot, for a pause lifted within its grace.
            await self._postpone(env, job_seq, time.time() + d.pause_recheck, "paused", used)
            return None
        if counted_for_a_day_over(env, time.time()):
            # Warm-up counted this job against a UTC day that has ended while shaping held it:
            # sent now, it would come on top of today's count, up to twice the source's cap.
            # Its retry is routed again, and counted for the day it goes out.
            return AttemptResult([Deferred(rcpt, WARMUP_DAY_OVER) for rcpt in env.recipients])
        sts = await self._sts.policy(env.domain) if d.mta_sts and env.domain else None
        policy = tls_policy(site_requires=limits.require_tls, verify_always=d.tls_verify, sts=sts)
        self.attempts += 1
        try:
            result = await send_job(
                self.connections,
                self._resolver,
                env.mx_hosts,
                sender=return_path(self._config.bounce, env),
                recipients=env.recipients,
                body=body,
                source=source,
                site=site,
                limits=limits,
                policy=policy,
                address_check=self._address_check,
                stopping=self._stop.is_set,
                smtputf8=env.meta.get("smtputf8") == "1",
            )
        except Saturated as exc:
            # The slot this attempt took stays the job's: re-reserving would send it to the back
            # of the site's queue (hours on a busy site) and leave the slot's rate unused.
            await self._postpone(env, job_seq, time.time() + exc.retry_after, "connection limit", used)
            return None
        except Stopping as exc:
            log.info("job %s handed to another worker: %s", env.key, exc)
            await self._postpone(env, job_seq, time.time(), "stopping")
            return None
        if result.bind_failed:
            self.health.mark_unhealthy(source.address, "bind failed on connect")
        if result.maybe_taken:
            self.possible_duplicates[(env.pool, metrics.SITES.label(site))] += 1
        try:
            await self._push_back(source, site, result)
        except Exception as exc:
            # The attempt happened: its outcomes must be settled whatever KV says now, or a
            # redelivery would send the accepted recipients a second copy.
            log.warning("recording push-back from %s failed: %r", site, exc)
        return result

    def _paused_meanwhile(self, env: Envelope, site: str, source: str) -> bool:
        """Whether the job's pool, site or chosen source is paused now (checked before the
        job's slot, and again after waiting for it)."""
        paused = self.control.paused
        return (
            paused("pool", env.pool)
            or paused("site", env.site)
            or paused("site", site)
            or paused("source", source)
        )

    async def _message_slot(
        self, env: Envelope, job_seq: int, source: Source, site: str, limits: Limits, slot: _Slot
    ) -> _Slot | None:
        """The message slot of (source, site) this attempt goes in, once waited for (`_NO_SLOT`
        for a site without a rate now); None when the job was re-scheduled instead."""
        backoff = self.control.backoff(source.address, site)
        base = limits.message_interval()
        interval = max(base, backoff.interval() if backoff else 0.0)
        if interval <= 0:
            return _NO_SLOT
        if slot.interval is None:  # reserved by the previous release, at the site's own rate
            slot = replace(slot, interval=base)
        now = time.time()
        if slot.holds(source.address, site, interval, now, base):
            # Back for the slot it reserved: reserving again would push every waiting job
            # further out for ever once the queue is longer than max_shaping_wait.
            return slot
        if slot.ours(source.address, site, interval, now, base):
            # Back before its slot (the schedule fired by a clock ahead of ours, or an admin
            # requeue): it keeps its place rather than going to the back of the queue.
            used = slot
        else:
            # While pushed back, no slot past the push-back's end: slots reserved at its slow
            # rate would outlive it by as long as the queue is (days for a big send).
            until = backoff.until if backoff is not None and backoff.interval() > base else None
            at = await self.limits.reserve("msg", source.address, site, interval, latest=until)
            if until is not None and at > until:
                await self._postpone(env, job_seq, until, "shaping")
                return None
            used = _Slot(source.address, site, at, interval)
        wait = used.at - time.time()
        if wait > self._config.delivery.max_shaping_wait:
            await self._postpone(env, job_seq, used.at, "shaping", used)
            return None
        if wait > 0:
            await asyncio.sleep(wait)
            pushed = self.control.backoff(source.address, site)
            if pushed is not None and pushed.interval() > (used.interval or base) + 0.001:
                # Pushed back while it waited (by its own site, here or on another worker): this
                # slot is at the rate the provider just refused. It takes one at the new rate.
                return await self._message_slot(env, job_seq, source, site, limits, _NO_SLOT)
        return used

    async def _push_back(self, source: Source, site: str, result: AttemptResult) -> None:
        for reply in result.remote_replies:
            if not reply.is_transient:
                continue
            rule = self.shaping.pushback_for(reply, site)
            if rule is not None:
                # Capped like relais_recipients_total's site: one series per long-tail domain
                # would grow without bound (and this counter with it).
                self.pushbacks[(metrics.SITES.label(site), rule.name)] += 1
                state = await self.control.push_back(source.address, site, rule, reply)
                # Consume one slot at the reduced rate now, so the next message waits its turn
                # (none past the push-back's end, as for any slot taken during it).
                await self.limits.reserve("msg", source.address, site, state.interval(), latest=state.until)
                return

    async def _postpone(
        self, env: Envelope, job_seq: int, at: float, reason: str, slot: _Slot | None = None
    ) -> None:
        """Come back at `at` on the pool's own subject, carrying `slot` if any; the attempt count
        does not change.

        The schedule is stored under a msg id of the job's stream message (`job_seq`): when the
        ack that follows is lost, the job comes back, finds it (`redelivery.postponed`) and is
        left to it, rather than going on beside the schedule's copy. Re-publishing the same
        schedule subject replaces the schedule, so the copy from the schedule, postponed again,
        leaves a single one as well.
        """
        expires = env.received_at + self._config.retry.max_age
        if time.time() > expires:
            # Paused or throttled past the maximum queue age: it expires like any undeliverable job.
            reply = env.attempts[-1].reply if env.attempts else NO_ROUTE
            deferred = [Deferred(r, reply) for r in env.recipients]
            await settle(self._bus, self._bodies, self._config.retry, env, deferred)
            return
        # Back by its expiry at the latest, to end there: a slot beyond it (a long queue at a slow
        # rate) would send it after max_age, or drop it unsent once its body's TTL (max_age + 2
        # days) had run out. On the whole second, when the schedule fires (services.core.schedule):
        # that is when a carried slot is due.
        at = math.ceil(max(min(at, expires), time.time() + 1.0))
        again = _without_slot(env)
        if slot is not None:
            again = replace(again, meta={**again.meta, **replace(slot, due=at).meta()})
        log.debug("job %s postponed (%s) until %.0f", env.key, reason, at)
        self.postponed[reason] += 1
        headers = {Header.MSG_ID: postponement_id(env.key, job_seq)}
        if env.trace_context:
            headers["traceparent"] = env.trace_context
        await publish_at(
            self._bus,
            schedule_subject=deliver_retry_subject(env.key, env.attempt_count),
            target_subject=deliver_subject(env.pool),
            payload=again.to_msgpack(),
            at=at,
            headers=headers,
            attributes={"relais.message_id": env.id, "relais.postponed": reason},
        )


@dataclass(frozen=True, slots=True)
class _Slot:
    """A message slot reserved for a job, carried in its meta until the attempt that uses it."""

    source: str = ""
    site: str = ""
    at: float = math.inf
    interval: float | None = None  # None: reserved by a release that did not record it
    due: float | None = None  # when the job's schedule brings it back; None: at `at`

    def holds(self, source: str, site: str, interval: float, now: float, base: float) -> bool:
        """Whether this attempt may go in this slot now: it is `ours` and its time has come."""
        return self.ours(source, site, interval, now, base) and self.at <= now + 1.0

    def ours(self, source: str, site: str, interval: float, now: float, base: float) -> bool:
        """Whether this attempt may use this slot: same source and site, reserved at no faster
        a rate than the one that applies now (`interval`), and not `late`. A slot without its
        interval was reserved at the site's own rate (`base`)."""
        reserved = base if self.interval is None else self.interval
        reserved_slower = reserved + 0.001 >= interval  # written to the millisecond
        return self.source == source and self.site == site and reserved_slower and not self.late(now)

    def late(self, now: float) -> bool:
        """Whether the job came back too long after it was due for this slot to be used.

        Lateness counts from when the job was due back, not from the slot: a job that found
        every connection busy keeps its slot for its return a few seconds later, and those
        returns stay as far apart as their slots were. Jobs held up past their time (an outage,
        a backlog) come back bunched, and going in their old slots would be a burst. Without
        `due` (carried by the previous release), the schedule brought it back on the whole
        second after the slot."""
        if math.isinf(self.at):
            return False  # no slot at all
        return now > max(math.ceil(self.at), self.due or 0.0) + CARRIED_SLOT_GRACE

    def meta(self) -> dict[str, str]:
        """The envelope meta that carries this slot to the job's next attempt; none for `_NO_SLOT`."""
        if math.isinf(self.at):
            return {}
        meta = {
            SLOT_META: f"{self.source}|{self.site}|{self.at:.3f}",
            SLOT_INTERVAL_META: f"{self.interval or 0.0:.3f}",
        }
        if self.due is not None:
            meta[SLOT_DUE_META] = f"{self.due:.3f}"
        return meta


_NO_SLOT = _Slot()  # an attempt to a site without a message rate takes no slot


def _parse_slot(value: str, interval: str, due: str = "") -> _Slot:
    parts = value.split("|")
    try:
        return _Slot(
            parts[0],
            parts[1],
            float(parts[2]),
            float(interval) if interval else None,
            float(due) if due else None,
        )
    except (IndexError, ValueError):
        return _Slot()


def _without_slot(env: Envelope) -> Envelope:
    if not any(k in env.meta for k in _SLOT_METAS):
        return env
    return replace(env, meta={k: v for k, v in env.meta.items() if k not in _SLOT_METAS})
