"""KV watches with a dependable end of the stored values, that end when they lose track.

nats-py's watcher puts None after the last stored value, so that a reader knows its view is
complete. But it decides to put that marker first from the consumer's info: "nothing pending,
nothing received yet". On a loaded machine the server may have sent the stored values already
while they have not reached the client, and the info then counts nothing pending: the marker
comes first and the records follow it as if they were changes (nats-io/nats.py#842). A reader
trusting it sees an empty bucket as complete: an ingress refusing every login for a moment, a
delivery worker sending from a paused source, `relais account list` showing no accounts.

So here the end of the stored values is the entry with delta 0 (the last one stored), as in the
Go client, and a marker that comes before any entry is believed only when the watched keys hold
nothing, which one request to the stream tells.

nats-py also resumes a watch by itself when NATS reconnects or the watch's consumer is lost (a
server restart, a new stream leader): from the stream sequence after the last one it saw. What
went meanwhile without leaving a message is never told that way (a delete marker whose TTL ran
out), and a bucket declared anew starts again at sequence 1, below that one: what it holds is
missed. A reader keeping a copy would keep what is gone for good, and lack what is there. So
`follow` ends with `WatchRestarted` instead, and its reader watches again and rebuilds its copy
from the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue, StopIterSentinel

from services.core.topology import kv_stream, kv_subject

log = logging.getLogger(__name__)

# What a KV entry's operation is when it removes the key (None for a value).
REMOVALS = ("DEL", "PURGE")
# How often a watch asks whether it still has its consumer: nats-py itself notices a lost one
# after two missed heartbeats (10 s).
CHECK_EVERY = 5.0
# Reads of `stored` before a watch that keeps losing track is reported.
_READS = 3


class WatchRestarted(Exception):
    """The watch lost track of the bucket (NATS reconnected, its consumer was lost): what was
    removed meanwhile may never come. Watch again, and rebuild any copy from its replay."""


async def follow(js: JetStreamContext, bucket: str, keys: str = ">") -> AsyncIterator[KeyValue.Entry | None]:
    """Every entry of `keys` in `bucket`: the stored ones, then None once, then each change as it
    comes. Removals come as entries too (operation in `REMOVALS`). Raises `WatchRestarted` once
    the watch lost track (checked every `CHECK_EVERY` seconds). The watch stops when the
    iteration does (close the generator, e.g. with `contextlib.aclosing`)."""
    kv = await js.key_value(bucket)
    reconnects = _reconnects(js)
    watcher = await kv.watch(keys)
    lost = asyncio.create_task(_lost_track(js, watcher, reconnects))
    try:
        replayed = seen = False
        while True:
            entry = await _next(watcher, lost)
            if isinstance(entry, StopIterSentinel):
                return  # stopped
            if entry is None:
                if replayed or (not seen and await _holds(js, bucket, keys)):
                    continue  # a marker repeated, or come before the records it should follow
                replayed = True
                yield None
                continue
            seen = True
            yield entry
            if not replayed and entry.delta == 0:
                replayed = True
                yield None
    finally:
        lost.cancel()
        with contextlib.suppress(Exception):
            await watcher.stop()


async def stored(js: JetStreamContext, bucket: str, keys: str = ">") -> list[KeyValue.Entry]:
    """The stored values of `keys` in `bucket` (removed keys left out), read to their end; read
    again when the watch lost track meanwhile (`WatchRestarted` after a few tries)."""
    for _ in range(_READS - 1):
        with contextlib.suppress(WatchRestarted):
            return await _read(js, bucket, keys)
    return await _read(js, bucket, keys)


async def _read(js: JetStreamContext, bucket: str, keys: str) -> list[KeyValue.Entry]:
    out: dict[str, KeyValue.Entry] = {}
    async with contextlib.aclosing(follow(js, bucket, keys)) as entries:
        async for entry in entries:
            if entry is None:
                break
            if entry.operation in REMOVALS or not entry.value:
                out.pop(entry.key, None)
            else:
                out[entry.key] = entry
    return list(out.values())


async def _next(
    watcher: KeyValue.KeyWatcher, lost: asyncio.Task[str]
) -> KeyValue.Entry | StopIterSentinel | None:
    """The watcher's next update (an entry, None, or the sentinel of a stopped one); raises
    `WatchRestarted` as soon as `lost` says why the watch lost track, even while none comes."""
    update = asyncio.ensure_future(watcher.updates(timeout=None))
    try:
        await asyncio.wait({update, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not update.done():
            update.cancel()
    if update.done() and not update.cancelled():
        return update.result()  # one that came with the news still counts
    raise WatchRestarted(lost.result())


async def _lost_track(js: JetStreamContext, watcher: KeyValue.KeyWatcher, reconnects: int) -> str:
    """Why the watch lost track, once it has: NATS reconnected (deliveries to the old connection
    are gone, and the consumer may have moved on past removals since), or its consumer is gone
    or was replaced (nats-py resumed it from the next sequence). Runs until then."""
    sub = watcher._sub  # nats-py's own KeyValue.keys() asks it for the consumer's info too
    name = ""
    while True:
        if _reconnects(js) != reconnects:
            return "reconnected to NATS"
        try:
            info = await sub.consumer_info()
        except NotFoundError:
            return "its consumer is gone"
        except Exception as exc:  # NATS away or slow: a reconnect, if it comes to that, tells
            log.debug("watch check failed, trying again: %r", exc)
        else:
            if name and info.name != name:
                return f"its consumer {name} was replaced by {info.name}"
            name = info.name
        await asyncio.sleep(CHECK_EVERY)


def _reconnects(js: JetStreamContext) -> int:
    """How often the connection under `js` reconnected (nats-py keeps no public link to it)."""
    return js._nc.stats["reconnects"]


async def _holds(js: JetStreamContext, bucket: str, keys: str) -> bool:
    """Whether the stream holds any message of `keys` (a value or a removal marker: the watch
    replays both, so either will come with delta 0 last)."""
    try:
        await js.get_msg(kv_stream(bucket), seq=1, subject=kv_subject(bucket, keys), next=True)
    except NotFoundError:
        return False
    return True
