"""Shaping limits that hold across every delivery worker: rate slots and connection leases in NATS KV.

Why KV rather than partitioning (one worker owning each source IP): any number of workers may
serve the same source, a worker can die at any moment without its IPs going silent, and the
router needs no knowledge of worker placement. The cost is one KV compare-and-set per message
for a rate-limited (source, site), and two per connection for a concurrency cap; unlimited
sites cost nothing.

Rates use GCRA (a virtual scheduling token bucket with no burst): one key per (kind, source,
site) holds the "theoretical arrival time" of the next free slot. Taking a slot is a CAS that
moves it forward by one interval, so two workers can never both take the same slot, and
messages are spread evenly (N per minute means one every 60/N seconds, never a burst of N).

Connection caps use leases: `connections` keys per (source, site), each held by at most one
connection at a time with an expiry the holder renews; a crashed worker's leases lapse.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from dataclasses import dataclass

import msgpack
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.core.bus import BrokerUnavailable
from services.core.topology import SHAPING_BUCKET

log = logging.getLogger(__name__)

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_CAS_ATTEMPTS = 50
LEASE_TTL = 60.0


def _part(value: str) -> str:
    # Dots separate key tokens; IPs and host names keep their shape with '_' instead.
    return _KEY_SAFE.sub("_", value.lower()) or "_"


def slot_key(kind: str, source: str, site: str) -> str:
    """Key of one GCRA clock: kind "msg" (messages) or "conn" (new connections)."""
    return f"{kind}.{_part(source)}.{_part(site)}"


def lease_key(source: str, site: str, index: int) -> str:
    return f"lease.{_part(source)}.{_part(site)}.{index}"


def next_slot(tat: float, now: float, interval: float) -> tuple[float, float]:
    """GCRA step: (when this slot is, the clock after taking it). Pure, for unit tests."""
    start = max(tat, now)
    return start, start + interval


@dataclass
class Lease:
    key: str
    revision: int
    until: float


class SharedLimits:
    """Rate slots and connection leases for (source, site), shared by every worker through KV."""

    def __init__(self, js: JetStreamContext, owner: str | None = None) -> None:
        self._js = js
        self._kv: KeyValue | None = None
        self.owner = owner or secrets.token_hex(6)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(SHAPING_BUCKET)
        return self._kv

    async def reserve(
        self, kind: str, source: str, site: str, interval: float, now: float | None = None
    ) -> float:
        """Take the next free slot; returns its time (<= now means go ahead right away)."""
        if interval <= 0:
            return now if now is not None else time.time()
        kv = await self._bucket()
        key = slot_key(kind, source, site)
        for _ in range(_CAS_ATTEMPTS):
            moment = time.time() if now is None else now
            try:
                entry = await kv.get(key)
                tat = float(msgpack.unpackb(entry.value)) if entry.value else 0.0
                revision = entry.revision
            except KeyNotFoundError:
                tat, revision = 0.0, 0
            slot, after = next_slot(tat, moment, interval)
            try:
                if revision:
                    await kv.update(key, msgpack.packb(after), last=revision)
                else:
                    await kv.create(key, msgpack.packb(after))
                return slot
            except KeyWrongLastSequenceError:
                continue  # another worker took a slot meanwhile: read again
            except Exception as exc:
                # nats-py reports a lost create race as a generic API error on some versions.
                if "wrong last sequence" in str(exc).lower():
                    continue
                raise
        raise BrokerUnavailable(f"shaping slot {key}: too much contention")

    async def acquire_lease(self, source: str, site: str, limit: int) -> Lease | None:
        """One of `limit` connection leases for (source, site), or None when all are held."""
        kv = await self._bucket()
        start = random.randrange(limit)
        for offset in range(limit):
            key = lease_key(source, site, (start + offset) % limit)
            now = time.time()
            value = msgpack.packb([self.owner, now + LEASE_TTL])
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                entry = None
            try:
                if entry is None or not entry.value:
                    revision = (
                        await kv.create(key, value)
                        if entry is None
                        else await kv.update(key, value, last=entry.revision)
                    )
                    return Lease(key, revision, now + LEASE_TTL)
                _, until = msgpack.unpackb(entry.value)
                if until < now:  # its holder stopped renewing: crashed or partitioned
                    revision = await kv.update(key, value, last=entry.revision)
                    return Lease(key, revision, now + LEASE_TTL)
            except KeyWrongLastSequenceError:
                continue
            except Exception as exc:
                if "wrong last sequence" in str(exc).lower() or "key exists" in str(exc).lower():
                    continue
                raise
        return None

    async def renew(self, lease: Lease) -> bool:
        """Extend a lease; False when it was lost (taken over after it lapsed)."""
        kv = await self._bucket()
        until = time.time() + LEASE_TTL
        try:
            lease.revision = await kv.update(
                lease.key, msgpack.packb([self.owner, until]), last=lease.revision
            )
        except Exception as exc:
            log.warning("connection lease %s lost: %r", lease.key, exc)
            return False
        lease.until = until
        return True

    async def release(self, lease: Lease) -> None:
        kv = await self._bucket()
        try:
            await kv.update(lease.key, b"", last=lease.revision)
        except Exception as exc:
            # Someone else holds it now, or NATS is away: the lease lapses on its own.
            log.debug("releasing lease %s: %r", lease.key, exc)
