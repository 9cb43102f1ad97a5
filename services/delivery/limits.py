"""Shaping limits that hold across every delivery worker: rate slots and connection leases in NATS KV.

Why KV rather than partitioning (one worker owning each source IP): any number of workers may
serve the same source, a worker can die at any moment without its IPs going silent, and the
router needs no knowledge of worker placement. The cost is one KV compare-and-set per block of
rate slots for a rate-limited (source, site) (see below), and two per connection for a
concurrency cap; unlimited sites cost nothing.

Rates use GCRA (a virtual scheduling token bucket with no burst): one key per (kind, source,
site) holds the "theoretical arrival time" of the next free slot. Taking slots is a CAS that
moves it forward, so two workers can never both take the same slot, and messages are spread
evenly (N per minute means one every 60/N seconds, never a burst of N).

Slots are reserved in blocks: when several of a worker's jobs wait for the same (source, site),
one CAS moves the clock on by one slot per waiting job (at most `BLOCK_HORIZON` seconds' worth)
and the slots are handed out locally, in order, each job sleeping until its own. The CAS is
sent against the revision this worker last wrote, without reading first; only when another
worker wrote in between does it read and try again. So a busy fast site costs one round trip
per block instead of two per message, and the guarantee is unchanged: every slot is unique
cluster-wide and slots are one interval apart. A held slot is never used more than
`SLOT_GRACE` late (it is dropped: rate left unused, never a burst). A site whose interval is
longer than the horizon gets one slot per CAS.

Connection caps use one lease record per (source, site): {worker: [connections held, until,
wanting until]}, changed by CAS. A worker gets a connection when the cap has room and it is below
its fair share among the workers that hold or want connections, so a busy worker cannot starve
another one by re-using everything it once took; a crashed worker's entry lapses (LEASE_TTL).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.core.bus import CAS_ATTEMPTS, BrokerUnavailable
from services.core.topology import SHAPING_BUCKET

log = logging.getLogger(__name__)

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")
# A crashed worker's connections stay counted against the cap until its entry lapses, and its
# replacement may find the whole cap held by the dead entry: keep that stall short. Each worker
# renews once per (source, site) it holds connections to, LEASE_RENEW_BEFORE before its entry
# would lapse (every ~8 s), which leaves a NATS hiccup of about 10 s before a lapse.
LEASE_TTL = 20.0
LEASE_RENEW_BEFORE = 12.0
WANT_TTL = 2.0
# A block of rate slots spans at most this many seconds (and MAX_BLOCK slots): enough to take
# one CAS per several messages on busy fast sites, short enough that a worker never holds slots
# others could have used for long.
BLOCK_HORIZON = 1.0
MAX_BLOCK = 16
# How late a held slot may still be used: about what the first slot of any reservation is late
# by (the CAS round trip), so blocks add no burst that single slots did not already have.
SLOT_GRACE = 0.05


def _part(value: str) -> str:
    # Dots separate key tokens; IPs and host names keep their shape with '_' instead.
    return _KEY_SAFE.sub("_", value.lower()) or "_"


def slot_key(kind: str, source: str, site: str) -> str:
    """Key of one GCRA clock: kind "msg" (messages) or "conn" (new connections)."""
    return f"{kind}.{_part(source)}.{_part(site)}"


def lease_key(source: str, site: str) -> str:
    """Key of the connection-cap record of one (source, site)."""
    return f"lease.{_part(source)}.{_part(site)}"


def next_slot(tat: float, now: float, interval: float, count: int = 1) -> tuple[float, float]:
    """GCRA step: (when the first of `count` slots is, the clock after taking them). Pure."""
    start = max(tat, now)
    return start, start + interval * count


def block_size(interval: float, waiting: int) -> int:
    """Slots to reserve in one CAS: one per job waiting here, within the horizon. Pure."""
    return max(1, min(waiting, MAX_BLOCK, int(BLOCK_HORIZON / interval)))


@dataclass
class _Clock:
    """This worker's view of one GCRA key: its last write and the slots it holds unused."""

    interval: float = 0.0
    revision: int = 0
    tat: float = 0.0
    slots: deque[float] = field(default_factory=deque)
    waiting: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def take(self, now: float) -> float | None:
        """The next held slot still usable at `now`; stale ones are dropped."""
        while self.slots:
            slot = self.slots.popleft()
            if slot >= now - SLOT_GRACE:
                return slot
        return None


@dataclass
class Lease:
    """One connection's share of a (source, site) connection cap."""

    key: str
    until: float


def fair_share(limit: int, contenders: int) -> int:
    """Connections one worker may hold while `contenders` workers hold or want some."""
    return max(1, -(-limit // max(1, contenders)))


def grant(
    holders: dict[str, list[float]], owner: str, limit: int, now: float, held: int | None = None
) -> tuple[dict[str, list[float]], bool]:
    """Pure lease decision on the shared record {owner: [held, held_until, wanting_until]}.

    Granted when the cap has room and this worker is below its fair share among the workers
    holding or wanting connections; otherwise the worker is recorded as wanting, which keeps
    the others from re-taking what they release beyond their own share.
    """
    live = {
        o: [h if until >= now else 0, until, want]
        for o, (h, until, want) in holders.items()
        if (h > 0 and until >= now) or want >= now or o == owner
    }
    mine = live.setdefault(owner, [0, 0.0, 0.0])
    if held is not None:
        # What this worker really holds: its entry may have lapsed while those connections
        # stayed open (NATS away past the renewal), or be one too high after a release failed.
        mine[0] = held
    contenders = sum(1 for o, (h, _, want) in live.items() if h > 0 or want >= now or o == owner)
    total = sum(h for h, _, _ in live.values())
    if total < limit and mine[0] < fair_share(limit, contenders):
        live[owner] = [mine[0] + 1, now + LEASE_TTL, 0.0]
        return live, True
    live[owner] = [mine[0], mine[1], now + WANT_TTL]
    return live, False


class SharedLimits:
    """Rate slots and connection leases for (source, site), shared by every worker through KV."""

    def __init__(self, js: JetStreamContext, owner: str | None = None) -> None:
        self._js = js
        self._kv: KeyValue | None = None
        self.owner = owner or secrets.token_hex(6)
        self._clocks: dict[str, _Clock] = {}

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(SHAPING_BUCKET)
        return self._kv

    async def reserve(
        self,
        kind: str,
        source: str,
        site: str,
        interval: float,
        now: float | None = None,
        *,
        latest: float | None = None,
    ) -> float:
        """Take the next free slot; returns its time (<= now means go ahead right away).

        With `latest`, a slot after that time is only looked at, not taken: a caller that will
        not wait for it must not push every later slot out (a connection that gives up and
        comes back at its slot's time would find it taken by the waiters it pushed, and the
        site would never get a connection again)."""
        if interval <= 0:
            return now if now is not None else time.time()
        key = slot_key(kind, source, site)
        clock = self._clocks.setdefault(key, _Clock())
        clock.waiting += 1
        try:
            async with clock.lock:
                moment = time.time() if now is None else now
                if clock.interval != interval:
                    # Push-back changed the rate: slots held at the old spacing would break the new one.
                    clock.slots.clear()
                    clock.interval = interval
                slot = clock.take(moment)
                if slot is not None:
                    return slot
                return await self._reserve_block(key, clock, interval, now, latest)
        finally:
            clock.waiting -= 1

    async def _reserve_block(
        self, key: str, clock: _Clock, interval: float, now: float | None, latest: float | None
    ) -> float:
        kv = await self._bucket()
        count = block_size(interval, clock.waiting)
        # Our own last write is the likeliest current value: try it before reading.
        revision, tat = clock.revision, clock.tat
        for _ in range(CAS_ATTEMPTS):
            moment = time.time() if now is None else now
            first, after = next_slot(tat, moment, interval, count)
            if latest is not None and first > latest:
                # Clocks only move forward, so the stored one is at least this far: too far to
                # wait for, and left for those who will.
                return first
            try:
                if revision:
                    revision = await kv.update(key, msgpack.packb(after), last=revision)
                else:
                    revision = await kv.create(key, msgpack.packb(after))
            except KeyWrongLastSequenceError:
                revision, tat = await self._read_clock(kv, key)  # another worker took slots
                continue
            except Exception as exc:
                # nats-py reports a lost create race as a generic API error on some versions.
                if "wrong last sequence" in str(exc).lower():
                    revision, tat = await self._read_clock(kv, key)
                    continue
                raise
            clock.revision, clock.tat = revision, after
            clock.slots.extend(first + interval * i for i in range(1, count))
            return first
        raise BrokerUnavailable(f"shaping slot {key}: too much contention")

    @staticmethod
    async def _read_clock(kv: KeyValue, key: str) -> tuple[int, float]:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return 0, 0.0
        return entry.revision, float(msgpack.unpackb(entry.value)) if entry.value else 0.0

    async def _change(self, key: str, change) -> bool:  # type: ignore[no-untyped-def]
        """Read-modify-CAS the lease record of one (source, site); `change` returns (record, ok)."""
        kv = await self._bucket()
        for _ in range(CAS_ATTEMPTS):
            try:
                entry = await kv.get(key)
                record = msgpack.unpackb(entry.value) if entry.value else {}
                revision = entry.revision
            except KeyNotFoundError:
                record, revision = {}, 0
            record, ok = change(record, time.time())
            try:
                if revision:
                    await kv.update(key, msgpack.packb(record), last=revision)
                else:
                    await kv.create(key, msgpack.packb(record))
                return ok
            except KeyWrongLastSequenceError:
                continue
            except Exception as exc:
                if "wrong last sequence" in str(exc).lower() or "key exists" in str(exc).lower():
                    continue
                raise
        raise BrokerUnavailable(f"connection lease {key}: too much contention")

    async def acquire_lease(
        self, source: str, site: str, limit: int, held: int | None = None
    ) -> Lease | None:
        """A share of the (source, site) connection cap for one connection, or None (wait).
        `held`: the leases this worker holds on that key now, written over its recorded count."""
        key = lease_key(source, site)
        ok = await self._change(key, lambda rec, now: grant(rec, self.owner, limit, now, held))
        return Lease(key, time.time() + LEASE_TTL) if ok else None

    async def renew(self, key: str, held: int) -> None:
        """Keep this worker's `held` connections on `key` counted (one write per worker and key).

        A live entry is only extended: grants and releases keep its count, and a count taken
        here could be one behind a grant or release racing this write. A lapsed or missing
        entry (NATS was away past the renewal, and another worker's grant dropped it) is
        stated again, because those connections are still open and must count.
        """

        def extend(rec: dict[str, list[float]], now: float) -> tuple[dict[str, list[float]], bool]:
            mine = rec.get(self.owner)
            if mine is not None and mine[1] >= now:
                mine[1] = now + LEASE_TTL
            else:
                rec[self.owner] = [held, now + LEASE_TTL, mine[2] if mine else 0.0]
            return rec, True

        await self._change(key, extend)

    async def release(self, lease: Lease) -> None:
        def drop(rec: dict[str, list[float]], now: float) -> tuple[dict[str, list[float]], bool]:
            mine = rec.get(self.owner)
            if mine is not None:
                mine[0] = max(0, mine[0] - 1)
                if mine[0] == 0 and mine[2] < now:
                    del rec[self.owner]
            return rec, True

        try:
            await self._change(lease.key, drop)
        except Exception as exc:
            # NATS away: our entry lapses LEASE_TTL after the last renewal.
            log.warning("releasing connection lease %s failed: %r", lease.key, exc)
