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

A routing pass repeated for the same attempt (its router died before the ack, a job routed
again after a sibling failed, two replicas on one redelivered message) counts nothing more: the
attempt's verdict is stored under a key of its own (`verdict_key`, beside the counters) in the
same atomic batch as the counts it made, and a repeated pass that finds it takes that verdict.
Counts and verdict are stored together or not at all, so no crash between them can count a job
twice, nor leave a job counted without its verdict.

The day counted is the day the job is routed, and it travels with the pin
(`Envelope.meta["warmup_day"]`): delivery's shaping can hold a job for hours, and one it would
send after that day is over is deferred instead (services/delivery/service.py), its retry routed
and counted again. So what a source sends in a UTC day was counted against that day.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Protocol

import nats
from nats.js.api import Header

from services.core.bus import CAS_ATTEMPTS, WRONG_LAST_SEQUENCE, BrokerUnavailable, Bus, is_kv_delete
from services.core.config import Config, SourceConfig
from services.core.outcome import Reply
from services.core.topology import WARMUP_BUCKET, kv_stream, kv_subject

WARMUP_DEFERRED = Reply(451, "4.4.5", "Sending IP daily volume cap reached (warm-up); will retry", "QUEUE")

ALL_SCOPE = "_all"  # the permanent daily cap counts every site
OTHER_SCOPE = "_other"  # a schedule's `daily` caps the sites without their own list

# The server refused a batch for load, not for its content (JSAtomicPublishTooManyInflight, and
# JSAtomicPublishIncompleteBatchErr when a message of it was dropped on the way): nothing of it
# was stored, so it is tried again after a pause, like a lost compare-and-set.
_BATCH_PRESSURE = frozenset({10210, 10176})
_PRESSURE_PAUSE = 0.02


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
    """The warm-up verdict for one job: a pinned source and the UTC day (YYYY-MM-DD) it was
    counted for, no opinion (""), or defer."""

    source: str = ""
    defer: bool = False
    day: str = ""


@dataclass(frozen=True, slots=True)
class Stored:
    """A key as read: its value (None once deleted) and the revision a compare-and-set expects."""

    value: bytes | None
    revision: int


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


def verdict_key(job_attempt: str) -> str:
    """KV key of the warm-up verdict on one job attempt (`envelope.job_msg_id`: job id and
    attempt, both made of subject-token characters). It lives as long as the bucket keeps
    anything (three days), far longer than a crashed pass takes to come back."""
    return f"job.{job_attempt}"


def choose(
    order: Sequence[Candidate], today: date, recipients: int, counts: Mapping[str, int]
) -> tuple[Pick, dict[str, int]]:
    """The verdict from the counters as read, and the counters it raises: the first source in
    `order` below each of its caps takes the job.

    Below the cap rather than "fits": a job bigger than the remaining room still goes, so a cap
    smaller than a job's recipient count cannot block that job for ever.
    """
    for candidate in order:
        keys = [counter_key(today, candidate.address, limit.scope) for limit in candidate.limits]
        caps = [limit.cap for limit in candidate.limits]
        if all(counts.get(key, 0) < cap for key, cap in zip(keys, caps, strict=True)):
            raised = {key: counts.get(key, 0) + recipients for key in keys}
            # A source without a cap today counted nothing: no day binds when it may send.
            return Pick(source=candidate.address, day=today.isoformat() if keys else ""), raised
        if candidate.warming and candidate.overflow == "defer":
            return Pick(defer=True), {}
    return Pick(defer=True), {}


class Counters(Protocol):
    async def read(self, keys: Sequence[str]) -> Mapping[str, Stored]:
        """The keys that exist (or were deleted), each with its revision."""
        ...

    async def write_all(self, writes: Mapping[str, tuple[bytes, int]]) -> bool:
        """Store every `key: (value, revision expected)` (0: the key must not exist) or none;
        False when some key is no longer at the revision expected."""
        ...


class WarmupCounters:
    """Daily counters and job verdicts in NATS KV: read in one batched direct get, written in
    one atomic batch (ADR-50) whose every message is a compare-and-set."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._prefix = kv_subject(WARMUP_BUCKET, "")

    async def read(self, keys: Sequence[str]) -> dict[str, Stored]:
        found = await self._bus.get_last(kv_stream(WARMUP_BUCKET), [self._prefix + key for key in keys])
        return {
            subject.removeprefix(self._prefix): Stored(
                None if is_kv_delete(msg) else msg.data,
                int((msg.headers or {})["Nats-Sequence"]),
            )
            for subject, msg in found.items()
        }

    async def write_all(self, writes: Mapping[str, tuple[bytes, int]]) -> bool:
        nc = self._bus.nc
        if not nc.is_connected:
            # nats-py would buffer the batch and send it after we gave up: refuse at once.
            raise BrokerUnavailable("warm-up counters: not connected to NATS")
        batch = secrets.token_hex(8)
        items = list(writes.items())
        try:
            for seq, (key, (value, revision)) in enumerate(items, start=1):
                headers = {
                    Header.BATCH_ID: batch,
                    Header.BATCH_SEQUENCE: str(seq),
                    Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision),
                }
                if seq < len(items):
                    await nc.publish(self._prefix + key, value, headers=headers)
                    continue
                headers[Header.BATCH_COMMIT] = "1"
                reply = await nc.request(
                    self._prefix + key, value, headers=headers, timeout=self._bus.publish_timeout
                )
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # Maybe stored: the pass fails, and the one repeating it finds the verdict if it was.
            raise BrokerUnavailable(f"warm-up counters: batch failed: {exc!r}", maybe_stored=True) from exc
        error = json.loads(reply.data).get("error")
        if error is None:
            return True
        if error.get("err_code") in WRONG_LAST_SEQUENCE:
            return False
        if error.get("err_code") in _BATCH_PRESSURE:
            await asyncio.sleep(_PRESSURE_PAUSE * (1 + random.random()))
            return False
        raise BrokerUnavailable(f"warm-up counters: batch refused: {error.get('description')}")


async def pick_source(
    config: Config,
    counters: Counters,
    pool: str,
    site: str,
    recipients: int,
    *,
    job: str,
    now: float,
    rng: random.Random,
) -> Pick:
    """Choose (and count) the source for attempt `job` (its `job_msg_id`) when the pool has
    capped sources today; a verdict already stored for that attempt is taken as it is."""
    spec = config.pools.get(pool)
    if spec is None or not spec.sources:
        return Pick()
    today = utc_day(now)
    candidates = {s.address: limits_for(config, s, site, today) for s in spec.sources}
    if not any(c.limits for c in candidates.values()):
        return Pick()  # nothing capped today: delivery's weighted choice is all it takes
    order = [candidates[s.address] for s in weighted_order(spec.sources, rng)]
    verdict = verdict_key(job)
    counter_keys = dict.fromkeys(counter_key(today, c.address, lim.scope) for c in order for lim in c.limits)
    for _ in range(CAS_ATTEMPTS):
        stored = await counters.read([verdict, *counter_keys])
        decided = stored.get(verdict)
        if decided is not None and decided.value is not None:
            return _pick_of(decided.value)  # a pass before this one decided and counted
        counts = {key: int(entry.value or b"0") for key, entry in stored.items() if key != verdict}
        pick, raised = choose(order, today, recipients, counts)
        if await counters.write_all(_writes(stored, raised, verdict, pick)):
            return pick
        # Another replica counted meanwhile, or decided this very job: read again.
    raise BrokerUnavailable(f"warm-up counters of pool {pool}: too much contention")


def _writes(
    stored: Mapping[str, Stored], raised: Mapping[str, int], verdict: str, pick: Pick
) -> dict[str, tuple[bytes, int]]:
    """The raised counters and the verdict, each expected at the revision it was read at."""

    def revision(key: str) -> int:
        return stored[key].revision if key in stored else 0

    writes = {key: (str(count).encode(), revision(key)) for key, count in raised.items()}
    writes[verdict] = (_verdict_value(pick), revision(verdict))
    return writes


def _verdict_value(pick: Pick) -> bytes:
    return json.dumps({"source": pick.source, "defer": pick.defer, "day": pick.day}).encode()


def _pick_of(value: bytes) -> Pick:
    verdict = json.loads(value)
    return Pick(source=verdict["source"], defer=verdict["defer"], day=verdict["day"])
