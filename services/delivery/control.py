"""What every delivery worker must know at once: pauses and provider push-back back-offs.

Both live in the `relais-delivery-control` KV bucket. Each worker keeps a local copy current
through a KV watch, so checking them costs nothing per message; setting one is a KV write that
every other worker sees within a moment. A push-back is merged into the one stored for its
(source, site) by compare-and-set (`stricter`), so a weaker one never lifts a stricter one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, replace

import msgpack
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from services.core.bus import CAS_ATTEMPTS, BrokerUnavailable, cas_won, is_kv_delete, leader_last
from services.core.kv_watch import REMOVALS, follow
from services.core.outcome import Reply
from services.core.pause import PauseError, pause_key
from services.core.topology import DELIVERY_CONTROL_BUCKET, kv_stream, kv_subject
from services.delivery.shaping import Pushback

log = logging.getLogger(__name__)

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def backoff_key(source: str, site: str) -> str:
    return f"backoff.{_KEY_SAFE.sub('_', source.lower()) or '_'}.{_KEY_SAFE.sub('_', site.lower()) or '_'}"


@dataclass(frozen=True, slots=True)
class Backoff:
    """(source, site) pushed back: at most `messages_per_minute` until `until`."""

    until: float
    messages_per_minute: float
    rule: str
    reply: str

    def interval(self) -> float:
        return 60.0 / self.messages_per_minute if self.messages_per_minute > 0 else 60.0

    def to_bytes(self) -> bytes:
        return msgpack.packb([self.until, self.messages_per_minute, self.rule, self.reply])

    @classmethod
    def from_bytes(cls, data: bytes) -> Backoff:
        until, rate, rule, reply = msgpack.unpackb(data)
        return cls(float(until), float(rate), str(rule), str(reply))


def stricter(stored: Backoff | None, new: Backoff, now: float) -> Backoff:
    """The back-off to keep when `new` is recorded over `stored`: the slower rate of the two
    (its rule and reply; the new one's at equal rates) until the later end of the two. Pure.

    A provider's "10/min for an hour" must survive a generic 421 ("60/min for 5 minutes") a
    moment later, or the throttle lifts early. KumoMTA keeps each rule's throttle with its own
    expiry, a rule triggered again extending its own; merging both into one record keeps the
    record's format (workers of the previous release read it) and errs on the careful side:
    a short strict back-off met by a long weak one holds the strict rate until the later end.
    The merge is order-independent, so concurrent writers reach the same record whichever
    lands first.
    """
    if stored is None or stored.until <= now:
        return new
    slowest = new if new.interval() >= stored.interval() else stored
    return replace(slowest, until=max(stored.until, new.until))


class DeliveryControl:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None
        self._values: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self, stop: asyncio.Event, report_every: float = 10.0) -> None:
        """Returns once the pauses and back-offs in KV were read, or `stop` is set: a worker
        that took jobs before would send the mail of a paused pool or site."""
        self._kv = await self._js.key_value(DELIVERY_CONTROL_BUCKET)
        self._task = asyncio.create_task(self._watch())
        ready, stopped = asyncio.create_task(self._ready.wait()), asyncio.create_task(stop.wait())
        try:
            while not (ready.done() or stopped.done()):
                await asyncio.wait(
                    {ready, stopped}, timeout=report_every, return_when=asyncio.FIRST_COMPLETED
                )
                if not (ready.done() or stopped.done()):
                    log.warning("pause state not read from KV yet: taking no jobs until it is")
        finally:
            ready.cancel()
            stopped.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                async with contextlib.aclosing(follow(self._js, DELIVERY_CONTROL_BUCKET)) as entries:
                    async for entry in entries:
                        if entry is None:
                            self._ready.set()
                            continue
                        if entry.operation in REMOVALS or not entry.value:
                            self._values.pop(entry.key, None)
                        else:
                            self._values[entry.key] = entry.value
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS away: keep the last known state and watch again (the watch replays it all).
                log.warning("delivery control watch failed, restarting: %r", exc)
                await asyncio.sleep(1.0)

    def paused(self, kind: str, name: str) -> bool:
        try:
            return bool(name) and pause_key(kind, name) in self._values
        except PauseError:
            return False  # a name that cannot be paused is not paused

    def backoff(self, source: str, site: str, now: float | None = None) -> Backoff | None:
        raw = self._values.get(backoff_key(source, site))
        if not raw:
            return None
        try:
            state = Backoff.from_bytes(raw)
        except Exception:
            return None
        return state if state.until > (time.time() if now is None else now) else None

    async def push_back(self, source: str, site: str, rule: Pushback, reply: Reply) -> Backoff:
        """Record a push-back for every worker, kept with the one stored if that is stricter
        (`stricter`); returns the back-off now in force, also effective here at once."""
        now = time.time()
        new = Backoff(now + rule.duration, rule.messages_per_minute, rule.name, str(reply))
        key = backoff_key(source, site)
        state = await self._merge(key, new)
        self._values[key] = state.to_bytes()
        log.warning(
            "push-back from %s for source %s: %s; backing off for %.0fs at %g/min (rule %s)",
            site,
            source or "-",
            reply,
            state.until - now,
            state.messages_per_minute,
            state.rule,
        )
        return state

    async def _merge(self, key: str, new: Backoff) -> Backoff:
        """Write `stricter(stored, new)` by compare-and-set on the key's revision, reading again
        when another worker wrote in between: a plain put would let the last writer win."""
        assert self._kv is not None
        stream, subject = kv_stream(DELIVERY_CONTROL_BUCKET), kv_subject(DELIVERY_CONTROL_BUCKET, key)
        for _ in range(CAS_ATTEMPTS):
            # From the leader: a replica behind the latest write would give an old revision.
            msg = await leader_last(self._js, stream, subject)
            revision = (msg.seq or 0) if msg is not None else 0
            stored = None if msg is None or is_kv_delete(msg) or not msg.data else _decoded(msg.data)
            state = stricter(stored, new, time.time())
            if state == stored:
                return state  # the stored one is stricter and outlasts this one: nothing to write
            if await cas_won(self._kv.update(key, state.to_bytes(), last=revision)):
                return state
        raise BrokerUnavailable(f"push-back {key}: too much contention")


def _decoded(data: bytes) -> Backoff | None:
    """A stored back-off; None for a record this release cannot read, which the new one replaces."""
    try:
        return Backoff.from_bytes(data)
    except Exception:
        return None
