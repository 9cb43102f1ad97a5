"""Bounce notices held for one DSN per message and window (`bounce.dsn_window`).

The router splits a message into one delivery job per recipient domain, and every job that
fails sends its own BounceNotice. So that the sender gets one DSN per message and moment rather
than one per domain, a notice that is due a DSN is held in the KV bucket `relais-bounce-hold`
and joins its message's open window of its kind (failures and delay warnings are different
reports and never share one). The notice that opens a window schedules its end (ADR-51,
`relais.bounce.window.<msg>.<win>` firing `relais.bounce.flush`); the flush closes the window,
sends one DSN for its members, releases their bodies and drops them.

Keys, per message:

    w.<message id>               the message's unfinished windows (JSON, `Windows`). Changed only
                                 by compare-and-set, so joining and closing are linearised: a
                                 notice either joined before the close (that flush reports it) or
                                 finds the window closed and opens the next one.
    n.<message id>.<notice id>   one held notice (its msgpack), written before it joins.
    d.<message id>               who sent the message's one delay warning (the DSN's msg id),
                                 claimed by compare-and-set before it goes: each domain job sends
                                 a warning of its own, minutes apart, and the sender gets one.

Nothing lives in a replica's memory. A replica killed at any step leaves its input unacked and
every step is safe to repeat; a held notice whose key was deleted (the delete marker stays for
the bucket's TTL) has been reported, so a late redelivery of it is not held a second time.

Reads go to the stream leader, not to the direct-get path the bucket allows: a follower that
lags could answer "no such window" to a flush, which would then end without its DSN.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.core.bus import CAS_ATTEMPTS, BrokerUnavailable, cas_won, is_kv_delete, leader_last
from services.core.topology import BOUNCE_HOLD_BUCKET, kv_stream, kv_subject

FAILED = "failed"
DELAYED = "delayed"
_SCHEMA = 1

T = TypeVar("T")


def notice_id(job_key: str, round_no: int, delayed: bool) -> str:
    """The identity of one notice: a job's failures of one round, or its one delay warning.
    The same job can send both in the same round (some recipients failed, others deferred)."""
    return f"{job_key}-{round_no}-{'d' if delayed else 'f'}"


def windows_key(message_id: str) -> str:
    return f"w.{message_id}"


def notice_key(message_id: str, notice: str) -> str:
    return f"n.{message_id}.{notice}"


def warned_key(message_id: str) -> str:
    return f"d.{message_id}"


@dataclass(frozen=True, slots=True)
class Window:
    """Notices of one kind that go into one DSN, whose id is the window id."""

    kind: str
    flush_at: float
    members: tuple[str, ...] = ()
    closed: bool = False
    sent: bool = False


@dataclass(frozen=True, slots=True)
class _Stored:
    """The last message of a key: its value (None when absent or deleted) and revision (0: never
    written), which a compare-and-set names as the expected last one."""

    value: bytes | None
    revision: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Joined:
    window_id: str
    flush_at: float
    # True when this notice must (re-)publish the window's schedule: it opened the window, or it
    # is a redelivery of a member of a window still open (its opener may have died before).
    schedule: bool


@dataclass(frozen=True, slots=True)
class Windows:
    """The unfinished windows of one message, by window id. Pure: every change returns a copy."""

    by_id: Mapping[str, Window] = field(default_factory=dict)

    def containing(self, notice: str) -> str | None:
        return next((wid for wid, w in self.by_id.items() if notice in w.members), None)

    def open_of(self, kind: str) -> str | None:
        return next((wid for wid, w in self.by_id.items() if w.kind == kind and not w.closed), None)

    def join(self, notice: str, kind: str, *, new_id: str, flush_at: float) -> tuple[Windows, Joined]:
        """Add a notice to the open window of its kind, opening one (`new_id`) if there is none."""
        known = self.containing(notice)
        if known is not None:
            window = self.by_id[known]
            return self, Joined(known, window.flush_at, schedule=not window.closed)
        wid = self.open_of(kind)
        if wid is None:
            opened = Window(kind=kind, flush_at=flush_at, members=(notice,))
            return self._with(new_id, opened), Joined(new_id, flush_at, schedule=True)
        window = self.by_id[wid]
        joined = replace(window, members=(*window.members, notice))
        return self._with(wid, joined), Joined(wid, window.flush_at, schedule=False)

    def close(self, wid: str) -> tuple[Windows, Window | None]:
        """No notice joins this window any more; returns it (None: finished or never existed)."""
        window = self.by_id.get(wid)
        if window is None or window.closed:
            return self, window
        closed = replace(window, closed=True)
        return self._with(wid, closed), closed

    def mark_sent(self, wid: str) -> tuple[Windows, None]:
        window = self.by_id.get(wid)
        if window is None or window.sent:
            return self, None
        return self._with(wid, replace(window, sent=True)), None

    def finish(self, wid: str) -> tuple[Windows, None]:
        return Windows({k: w for k, w in self.by_id.items() if k != wid}), None

    def _with(self, wid: str, window: Window) -> Windows:
        return Windows({**self.by_id, wid: window})

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": _SCHEMA,
                "windows": {
                    wid: {
                        "kind": w.kind,
                        "at": w.flush_at,
                        "members": list(w.members),
                        "closed": w.closed,
                        "sent": w.sent,
                    }
                    for wid, w in self.by_id.items()
                },
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Windows:
        wire = json.loads(data)
        if wire.get("v") != _SCHEMA:
            raise ValueError(f"unsupported hold record version {wire.get('v')!r}")
        return cls(
            {
                wid: Window(
                    kind=w["kind"],
                    flush_at=float(w["at"]),
                    members=tuple(w["members"]),
                    closed=bool(w["closed"]),
                    sent=bool(w["sent"]),
                )
                for wid, w in wire["windows"].items()
            }
        )


class NewerFlushRequest(ValueError):
    """A flush request of a later release (see `bus.undecodable`)."""

    later_release = True


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """The payload of a window's schedule, i.e. of the flush it fires. Only the bounce service
    produces and consumes it, so its codec lives here rather than in services.core.envelope."""

    message_id: str
    window_id: str

    def to_json(self) -> bytes:
        return json.dumps({"v": _SCHEMA, "message_id": self.message_id, "window": self.window_id}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FlushRequest:
        try:
            wire: dict[str, Any] = json.loads(data)
            version = wire.get("v")
            if isinstance(version, int) and version > _SCHEMA:
                raise NewerFlushRequest(f"flush request version {version}, this release reads {_SCHEMA}")
            if version != _SCHEMA:
                raise ValueError(f"unsupported flush request version {version!r}")
            return cls(str(wire["message_id"]), str(wire["window"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed flush request: {exc!r}") from exc


class HoldStore:
    """The I/O half: held notices and window records in the hold bucket."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(BOUNCE_HOLD_BUCKET)
        return self._kv

    async def _read(self, key: str) -> _Stored:
        msg = await leader_last(self._js, kv_stream(BOUNCE_HOLD_BUCKET), kv_subject(BOUNCE_HOLD_BUCKET, key))
        if msg is None:
            return _Stored(None, 0)
        if is_kv_delete(msg):
            return _Stored(None, msg.seq or 0, deleted=True)
        return _Stored(msg.data or b"", msg.seq or 0)

    async def put(self, message_id: str, notice: str, payload: bytes) -> bool:
        """Hold a notice. False when it was held before and a flush has reported it already."""
        kv = await self._bucket()
        key = notice_key(message_id, notice)
        for _ in range(3):
            try:
                # Expected last sequence 0: fails on a live key *and* on a delete marker.
                await kv.update(key, payload, last=0)
                return True
            except KeyWrongLastSequenceError:
                pass
            stored = await self._read(key)
            if stored.deleted:
                return False  # deleted by the flush that reported it
            if stored.value is not None:
                return True  # held by an earlier delivery of this notice, not flushed yet
            # The marker expired between the two calls: try again.
        raise BrokerUnavailable(f"could not hold notice {key}")

    async def holds(self, message_id: str, notice: str) -> bool:
        """Whether the notice is held now, waiting for its window's flush."""
        return (await self._read(notice_key(message_id, notice))).value is not None

    async def join(self, message_id: str, notice: str, kind: str, *, new_id: str, flush_at: float) -> Joined:
        return await self._change(
            message_id, lambda ws: ws.join(notice, kind, new_id=new_id, flush_at=flush_at)
        )

    async def close(self, message_id: str, wid: str) -> Window | None:
        return await self._change(message_id, lambda ws: ws.close(wid))

    async def mark_sent(self, message_id: str, wid: str) -> None:
        await self._change(message_id, lambda ws: ws.mark_sent(wid))

    async def finish(self, message_id: str, wid: str) -> None:
        await self._change(message_id, lambda ws: ws.finish(wid))

    async def claim_delay_warning(self, message_id: str, owner: str) -> bool:
        """Make `owner` the message's one delay warning. True when it is: the first to claim it,
        or the same owner again (a redelivered flush); False once another warned the sender."""
        kv = await self._bucket()
        key = warned_key(message_id)
        for _ in range(CAS_ATTEMPTS):
            stored = await self._read(key)
            if stored.value is not None:
                return stored.value == owner.encode()
            if await cas_won(kv.update(key, owner.encode(), last=stored.revision)):
                return True
        raise BrokerUnavailable(f"delay warning record {key}: too much contention")

    async def notices(self, message_id: str, members: Iterable[str]) -> list[tuple[str, bytes]]:
        """The held payloads of these members that still exist (in member order)."""
        out = []
        for notice in members:
            stored = await self._read(notice_key(message_id, notice))
            if stored.value:
                out.append((notice, stored.value))
        return out

    async def drop(self, message_id: str, members: Iterable[str]) -> None:
        kv = await self._bucket()
        for notice in members:
            await kv.delete(notice_key(message_id, notice))

    async def _change(self, message_id: str, change: Callable[[Windows], tuple[Windows, T]]) -> T:
        """Read-modify-write of the message's windows by compare-and-set on the key's revision."""
        kv = await self._bucket()
        key = windows_key(message_id)
        for _ in range(CAS_ATTEMPTS):
            stored = await self._read(key)
            current = Windows.from_json(stored.value) if stored.value else Windows()
            updated, result = change(current)
            if updated == current:
                return result
            # After a delete the marker is the last message, so its revision is expected.
            if updated.by_id:
                write = kv.update(key, updated.to_json(), last=stored.revision)
            else:
                write = kv.delete(key, last=stored.revision)
            if await cas_won(write):
                return result
        raise BrokerUnavailable(f"hold record {key}: too much contention")
