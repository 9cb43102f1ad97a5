"""KV watches with a dependable end of the stored values.

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
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from services.core.topology import kv_stream, kv_subject

# What a KV entry's operation is when it removes the key (None for a value).
REMOVALS = ("DEL", "PURGE")


async def follow(js: JetStreamContext, bucket: str, keys: str = ">") -> AsyncIterator[KeyValue.Entry | None]:
    """Every entry of `keys` in `bucket`: the stored ones, then None once, then each change as it
    comes. Removals come as entries too (operation in `REMOVALS`). The watch stops when the
    iteration does (close the generator, e.g. with `contextlib.aclosing`)."""
    kv = await js.key_value(bucket)
    watcher = await kv.watch(keys)
    try:
        replayed = seen = False
        async for entry in watcher:
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
        with contextlib.suppress(Exception):
            await watcher.stop()


async def stored(js: JetStreamContext, bucket: str, keys: str = ">") -> list[KeyValue.Entry]:
    """The stored values of `keys` in `bucket` (removed keys left out), read to their end."""
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


async def _holds(js: JetStreamContext, bucket: str, keys: str) -> bool:
    """Whether the stream holds any message of `keys` (a value or a removal marker: the watch
    replays both, so either will come with delta 0 last)."""
    try:
        await js.get_msg(kv_stream(bucket), seq=1, subject=kv_subject(bucket, keys), next=True)
    except NotFoundError:
        return False
    return True
