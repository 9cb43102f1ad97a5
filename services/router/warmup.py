"""IP warm-up and daily caps: which source of a pool may take a job today.

A source may carry a permanent daily cap and/or a warm-up schedule (caps for day 1, 2, ...,
optionally per site). Counters live in NATS KV (bucket relais-warmup, one key per UTC day,
source and scope) and are updated with compare-and-set, so a cap holds across router replicas.

The router picks the source only for pools where some source is capped today, and pins it in
`Envelope.meta["source"]`; elsewhere delivery picks by weight as usual. The pick is a weighted
random order of the pool's sources: the first with room wins. A warming source that is full
either overflows (the next source in that order with room takes the job) or, with
`overflow = "defer"`, the job waits: it is deferred and comes back through the normal retries.
Counting is per recipient and per attempt: a retried job counts again, as the receiving
provider also sees it again.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.core.bus import BrokerUnavailable
from services.core.config import Config, SourceConfig
from services.core.outcome import Reply
from services.core.topology import WARMUP_BUCKET

WARMUP_DEFERRED = Reply(451, "4.4.5", "Sending IP daily volume cap reached (warm-up); will retry", "QUEUE")

ALL_SCOPE = "_all"  # the permanent daily cap counts every site
OTHER_SCOPE = "_other"  # a schedule's `daily` caps the sites without their own list


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str
    cap: int


@dataclass(frozen=True, slots=True)
class Candidate:
    address: str
    limits: tuple[Limit, ...]
    warming: bool
    overflow: str  # "warm" | "defer"


@dataclass(frozen=True, slots=True)
class Pick:
    """The warm-up verdict for one job: a pinned source, no opinion (""), or defer."""

    source: str = ""
    defer: bool = False


def utc_day(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


def limits_for(config: Config, source: SourceConfig, site: str, today: date) -> Candidate:
    limits: list[Limit] = []
    warming = False
    overflow = "warm"
    if source.daily_cap:
        limits.append(Limit(ALL_SCOPE, source.daily_cap))
    schedule = config.warmup.get(source.warmup) if source.warmup else None
    if schedule is not None:
        overflow = schedule.overflow
        day = max(0, (today - date.fromisoformat(source.warmup_start)).days)
        per_site = schedule.sites.get(site)
        caps, scope = (per_site, site) if per_site else (schedule.daily, OTHER_SCOPE)
        if day < len(caps):
            limits.append(Limit(scope, caps[day]))
            warming = True
    return Candidate(source.address, tuple(limits), warming, overflow)


def weighted_order(sources: Sequence[SourceConfig], rng: random.Random) -> list[SourceConfig]:
    """A random order in which each source comes first with probability weight / total."""
    # Efraimidis-Spirakis: sort by u ** (1 / w); a single draw per source.
    return sorted(sources, key=lambda s: rng.random() ** (1.0 / s.weight), reverse=True)


def counter_key(day: date, address: str, scope: str) -> str:
    """KV key of one counter; IPv6 colons are not allowed in keys."""
    return f"{day:%Y%m%d}.{address.replace(':', '_')}.{scope}"


class Counters(Protocol):
    async def add(self, key: str, count: int, cap: int | None) -> bool: ...


class WarmupCounters:
    """Daily counters in NATS KV, reserved with compare-and-set."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(WARMUP_BUCKET)
        return self._kv

    async def value(self, key: str) -> int:
        try:
            entry = await (await self._bucket()).get(key)
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def add(self, key: str, count: int, cap: int | None) -> bool:
        """Add `count` if the counter is below `cap` (None: unconditionally). False when full.

        Below-cap rather than "fits": a job bigger than the remaining room still goes, so a
        cap smaller than a job's recipient count cannot block that job for ever.
        """
        kv = await self._bucket()
        for _ in range(100):
            try:
                entry = await kv.get(key)
                current, revision = int(entry.value or b"0"), entry.revision
            except KeyNotFoundError:
                current, revision = 0, None
            if cap is not None and current >= cap:
                return False
            new = str(max(0, current + count)).encode()
            try:
                if revision is None:
                    await kv.create(key, new)
                else:
                    await kv.update(key, new, last=revision)
                return True
            except KeyWrongLastSequenceError:
                continue  # another replica counted at the same moment; re-read
        raise BrokerUnavailable(f"warm-up counter {key}: too much contention")


async def pick_source(
    config: Config,
    counters: Counters,
    pool: str,
    site: str,
    recipients: int,
    *,
    now: float,
    rng: random.Random,
) -> Pick:
    """Choose (and count) the source for a job when the pool has capped sources today."""
    spec = config.pools.get(pool)
    if spec is None or not spec.sources:
        return Pick()
    today = utc_day(now)
    candidates = {s.address: limits_for(config, s, site, today) for s in spec.sources}
    if not any(c.limits for c in candidates.values()):
        return Pick()  # nothing capped today: delivery's weighted choice is all it takes
    for source in weighted_order(spec.sources, rng):
        candidate = candidates[source.address]
        if await _reserve(counters, candidate, today, recipients):
            return Pick(source=candidate.address)
        if candidate.warming and candidate.overflow == "defer":
            return Pick(defer=True)
    return Pick(defer=True)


async def _reserve(counters: Counters, candidate: Candidate, today: date, recipients: int) -> bool:
    taken: list[str] = []
    for limit in candidate.limits:
        key = counter_key(today, candidate.address, limit.scope)
        if not await counters.add(key, recipients, limit.cap):
            for done in taken:  # give back what this attempt counted on the other scope
                await counters.add(done, -recipients, None)
            return False
        taken.append(key)
    return True
