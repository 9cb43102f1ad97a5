"""What every delivery worker must know at once: pauses and provider push-back back-offs.

Both live in the `relais-delivery-control` KV bucket. Each worker keeps a local copy current
through a KV watch, so checking them costs nothing per message; setting one is a KV write that
every other worker sees within a moment. A push-back is merged into the one stored for its
(source, site) by compare-and-set (`stricter`), so a weaker one never lifts a stricter one.

A back-off is stored with a per-message TTL (ADR-43) that ends no earlier than it does: JetStream
removes it then, and the marker it writes in its place (itself gone after
`DELIVERY_CONTROL_MARKER_TTL`) removes it from every worker's copy. Without that, every
(source, site) ever pushed back stayed in the bucket, in each worker's memory and in the replay
each starting worker reads. Back-offs left without a TTL, by a release before this one, are
purged by the workers once they ended (`forget_ended`). Pauses have no TTL: they stay until
resumed, and the marker of a resume expires as an ended back-off's does (`purge_marker`).

A worker whose watch lost track (NATS reconnected, its consumer lost: `WatchRestarted`) reads the
bucket anew and puts that copy in place of its own once complete: a marker gone meanwhile would
otherwise never tell it, and the pause it ended would hold mail until the worker restarts.
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
from nats.js.api import Header
from nats.js.errors import APIError

from services.core.bus import (
    CAS_ATTEMPTS,
    WRONG_LAST_SEQUENCE,
    BrokerUnavailable,
    cas_won,
    is_kv_delete,
    leader_last,
)
from services.core.kv_watch import REMOVALS, WatchRestarted, follow
from services.core.outcome import Reply
from services.core.pause import PauseError, pause_key, purge_marker, ttl_header
from services.core.topology import (
    DELIVERY_CONTROL_BUCKET,
    kv_stream,
    kv_subject,
)
from services.delivery.shaping import Pushback

log = logging.getLogger(__name__)

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_BACKOFF_PREFIX = "backoff."
# How often each worker looks for ended back-offs JetStream did not expire itself.
SWEEP_EVERY = 60.0
# How long after its end a back-off must still be there to be purged by a worker: JetStream
# expires one stored with a TTL within a second or so, and a purge is not needed for those.
LEFT_BEHIND = 60.0


def backoff_key(source: str, site: str) -> str:
    return f"{_BACKOFF_PREFIX}{_key_token(source)}.{_key_token(site)}"


def _key_token(name: str) -> str:
    return _KEY_SAFE.sub("_", name.lower()) or "_"


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
        # key -> (value, revision): the revision is what a purge of an ended back-off expects.
        self._entries: dict[str, tuple[bytes, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()

    async def start(
        self, stop: asyncio.Event, report_every: float = 10.0, sweep_every: float = SWEEP_EVERY
    ) -> None:
        """Returns once the pauses and back-offs in KV were read, or `stop` is set: a worker
        that took jobs before would send the mail of a paused pool or site."""
        await self._js.key_value(DELIVERY_CONTROL_BUCKET)  # raises at once if the bucket is missing
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._sweep(sweep_every))]
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
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _watch(self) -> None:
        while True:
            # Each watch replays the bucket into a copy of its own, put in place of the one in
            # force once complete: what left the bucket while no watch ran (a resume whose marker
            # expired, a bucket declared anew) leaves this worker's copy too, and until then the
            # copy in force keeps every pause it had: none is dropped, even for a moment.
            replay: dict[str, tuple[bytes, int]] | None = {}
            try:
                async with contextlib.aclosing(follow(self._js, DELIVERY_CONTROL_BUCKET)) as entries:
                    async for entry in entries:
                        if entry is None:
                            self._entries, replay = replay, None
                            self._ready.set()
                            continue
                        target = self._entries if replay is None else replay
                        if entry.operation in REMOVALS or not entry.value:
                            target.pop(entry.key, None)
                        else:
                            target[entry.key] = (entry.value, entry.revision or 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS away: keep the last known state and watch again (the watch replays it all).
                if isinstance(exc, WatchRestarted):
                    log.info("delivery control watch lost track (%s): reading the bucket anew", exc)
                else:
                    log.warning("delivery control watch failed, restarting: %r", exc)
                await asyncio.sleep(1.0)

    def held_keys(self) -> frozenset[str]:
        """The keys of this worker's copy of the bucket: its pauses and back-offs."""
        return frozenset(self._entries)

    def paused(self, kind: str, name: str) -> bool:
        try:
            return bool(name) and pause_key(kind, name) in self._entries
        except PauseError:
            return False  # a name that cannot be paused is not paused

    def backoff(self, source: str, site: str, now: float | None = None) -> Backoff | None:
        raw, _ = self._entries.get(backoff_key(source, site), (b"", 0))
        state = _decoded(raw) if raw else None
        return state if state is not None and state.until > (time.time() if now is None else now) else None

    async def push_back(self, source: str, site: str, rule: Pushback, reply: Reply) -> Backoff:
        """Record a push-back for every worker, kept with the one stored if that is stricter
        (`stricter`); returns the back-off now in force, also effective here at once."""
        now = time.time()
        new = Backoff(now + rule.duration, rule.messages_per_minute, rule.name, str(reply))
        key = backoff_key(source, site)
        state, revision = await self._merge(key, new)
        if revision > self._entries.get(key, (b"", 0))[1]:  # the watch may have brought a later one
            self._entries[key] = (state.to_bytes(), revision)
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

    async def _sweep(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.forget_ended()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("clearing ended back-offs failed, trying again later: %r", exc)

    async def forget_ended(self, now: float | None = None) -> int:
        """Purge the back-offs in this worker's copy that ended `LEFT_BEHIND` ago or more, and
        forget them here; returns how many were purged. JetStream expires those stored with a
        TTL itself, so what is left was written without one (by an earlier release), or expired
        where no marker told (a bucket without expiry markers: the purge then finds it gone).

        Each purge expects the revision seen here, so a push-back written since is kept; a record
        this release cannot read is kept too (a later release's, whose end it cannot tell)."""
        before = (time.time() if now is None else now) - LEFT_BEHIND
        ended = [
            (key, revision)
            for key, (raw, revision) in self._entries.items()
            if key.startswith(_BACKOFF_PREFIX) and _ended_before(raw, before)
        ]
        purged = 0
        for key, revision in ended:
            purged += await purge_ended(self._js, key, revision)
            if self._entries.get(key, (b"", 0))[1] == revision:  # nothing newer came meanwhile
                del self._entries[key]
        return purged

    async def _merge(self, key: str, new: Backoff) -> tuple[Backoff, int]:
        """Write `stricter(stored, new)` by compare-and-set on the key's revision, reading again
        when another worker wrote in between: a plain put would let the last writer win.
        Returns the back-off in force and its revision."""
        stream, subject = kv_stream(DELIVERY_CONTROL_BUCKET), kv_subject(DELIVERY_CONTROL_BUCKET, key)
        for _ in range(CAS_ATTEMPTS):
            # From the leader: a replica behind the latest write would give an old revision.
            msg = await leader_last(self._js, stream, subject)
            revision = (msg.seq or 0) if msg is not None else 0
            # No data: a purge, or the marker JetStream left where a back-off expired.
            stored = None if msg is None or is_kv_delete(msg) or not msg.data else _decoded(msg.data)
            state = stricter(stored, new, time.time())
            if state == stored:
                return state, revision  # the stored one is stricter and outlasts this one
            headers = {
                Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(revision),
                # Counted from now, before the server stores it: it cannot expire before `until`.
                Header.MSG_TTL.value: ttl_header(state.until - time.time()),
            }
            try:
                ack = await self._js.publish(subject, state.to_bytes(), headers=headers)
            except APIError as exc:
                if exc.err_code not in WRONG_LAST_SEQUENCE:
                    raise
                continue  # another worker wrote in between: merge with theirs
            return state, ack.seq
        raise BrokerUnavailable(f"push-back {key}: too much contention")


async def purge_ended(js: JetStreamContext, key: str, revision: int) -> bool:
    """Remove the back-off stored under `key` at `revision`, with its history; False when the key
    is no longer at that revision (a push-back written since, which stays, or already removed).
    The same purge marker as `PauseState.resume` writes, which goes too."""
    marker = purge_marker(revision)
    return await cas_won(js.publish(kv_subject(DELIVERY_CONTROL_BUCKET, key), b"", headers=marker))


def _ended_before(raw: bytes, moment: float) -> bool:
    state = _decoded(raw)
    return state is not None and state.until <= moment


def _decoded(data: bytes) -> Backoff | None:
    """A stored back-off; None for a record this release cannot read, which the new one replaces."""
    try:
        return Backoff.from_bytes(data)
    except Exception:
        return None
