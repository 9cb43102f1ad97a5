"""Message bodies: inline when small, one Object Store write when large, removed when done.

A large body is written once at the ingress and referenced by every per-domain job and every
retry. The router records which jobs still need it (KV bucket `relais-body-refs`); each job's
final outcome releases its reference, and the last release deletes the object.

"Gone" is only ever concluded from the stream leader. Direct gets, which any replica may answer,
are the fast path, but a follower that has not yet applied the ingress's write answers "no such
body" for a moment, and a body taken for gone ends its message without an outcome.

No service's NATS user may purge the bodies' stream (deploy/k8s/base/nats.conf): a purge names
its filter in the request's body, so a user allowed to purge one body's chunks may purge every
queued body. Nor may anyone roll it up: the stream refuses `Nats-Rollup` (topology), since
`Nats-Rollup: all` on any subject a user may publish to empties the whole stream. So:

- A body is written here, not with nats-py's `ObjectStore.put` (which looks for an object of
  the same name, purges the chunks it replaces and rolls up the meta): chunks, then one meta
  message, in the Object Store's format. A name is a message id, written once.
- Deleting one publishes a meta message saying it is deleted, which names that body alone.
  Its chunks are then purged by whoever may purge: the service itself where its user declares
  the topology (`nats.declare_topology`, every right), else the topology keeper's sweep
  (`relais topology apply --serve`, as `admin`: `sweep_deleted_bodies`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from datetime import UTC, datetime

import msgpack
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMetaOptions, RawStreamMsg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from nats.nuid import NUID

from services.core.bus import BrokerUnavailable, Bus, is_kv_delete, is_store_full, leader_last
from services.core.envelope import BodyRef
from services.core.topology import (
    BODY_BUCKET,
    BODY_REFS_BUCKET,
    kv_stream,
    kv_subject,
    object_chunk_subject,
    object_meta_subject,
    object_stream,
)

log = logging.getLogger(__name__)

# The Object Store's chunk size, as nats-py and the other clients write it.
CHUNK_SIZE = 128 * 1024
# Meta messages per request while the sweep looks for deleted bodies (the server caps a batch).
_SWEEP_BATCH = 256


def _meta_subject(name: str) -> str:
    return object_meta_subject(BODY_BUCKET, base64.urlsafe_b64encode(name.encode()).decode())


def _live_object(meta: bytes | None) -> ObjectInfo | None:
    """The object a meta message describes, None when there is none or it was deleted."""
    if not meta:
        return None
    info = ObjectInfo.from_response(json.loads(meta))
    return None if info.deleted else info


def _meta_info(meta: bytes | None) -> ObjectInfo | None:
    """What a meta message says, None when it says nothing readable (so that one written by
    something else than an Object Store client cannot stop the sweep)."""
    try:
        return ObjectInfo.from_response(json.loads(meta or b""))
    except (ValueError, TypeError, AttributeError, KeyError):
        return None


def head_octets(ref: BodyRef, limit: int) -> int:
    """The most octets of a stored body `BodyStore.get_head` reads: whole chunks up to `limit`
    (0: the whole body)."""
    if not limit:
        return ref.size
    return min(ref.size, -(-limit // CHUNK_SIZE) * CHUNK_SIZE)


def _head(data: bytes, limit: int) -> bytes:
    """`data` through its header block; without its end within `limit` octets, those up to
    their last line end (the ingress stores CRLF lines; a bare LF still ends one)."""
    end = _header_end(data)
    if end >= 0 and (not limit or end <= limit):
        return data[:end]
    if not limit or len(data) <= limit:
        return data
    return data[: data.rfind(b"\n", 0, limit) + 1]


def _header_end(data: bytes) -> int:
    """Where the empty line that ends the header block ends; -1 when it is not in `data`."""
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


class BodyMissing(Exception):
    """The referenced body is gone: its job already reached its final outcome, or it waited
    past the body's TTL (`disposition.settle_missing_body` tells the two apart)."""


class BodyStore:
    """With a `bus`, a stored body is read with two direct gets (its meta, then all its chunks
    in one batch) instead of nats-py's `ObjectStore.get`, which creates an ordered consumer
    for every read (a consumer created and deleted per delivery attempt: on replicated streams a
    clustered operation each time)."""

    def __init__(
        self, js: JetStreamContext, inline_max: int, bus: Bus | None = None, *, purges: bool = True
    ) -> None:
        """`purges`: whether this process purges a deleted body's chunks itself (its NATS user
        may: it declares the topology), or leaves them to the topology keeper's sweep."""
        self._js = js
        self._inline_max = inline_max
        self._bus = bus
        self._purges = purges
        self._nuid = NUID()
        self._objects: ObjectStore | None = None
        self._refs: KeyValue | None = None

    async def _store(self) -> ObjectStore:
        if self._objects is None:
            self._objects = await self._js.object_store(BODY_BUCKET)
        return self._objects

    async def _kv(self) -> KeyValue:
        if self._refs is None:
            self._refs = await self._js.key_value(BODY_REFS_BUCKET)
        return self._refs

    async def put(self, message_id: str, data: bytes) -> BodyRef:
        if len(data) <= self._inline_max:
            return BodyRef(size=len(data), inline=data)
        nuid = self._nuid.next().decode()
        try:
            await self._write(message_id, nuid, data)
        except Exception as exc:
            # The ingress answers 451: whatever chunks were stored are never read. The meta
            # naming them is for the purge that removes them (a failure to write it leaves them
            # to the stream's TTL).
            await self._delete_object(message_id, nuid)
            raise BrokerUnavailable(
                f"storing body of {message_id} failed: {exc!r}", store_full=is_store_full(exc)
            ) from exc
        return BodyRef(size=len(data), object_name=message_id)

    async def _write(self, name: str, nuid: str, data: bytes) -> None:
        """The chunks, then the meta that makes them an object, as the Object Store lays them
        out (`ObjectStore.get`, `get_info` and `list` read them), but with no look-up of an
        earlier object, no purge and no roll-up: nothing is replaced, as a name is written once."""
        chunk_subject = object_chunk_subject(BODY_BUCKET, nuid)
        chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
        for chunk in chunks:
            await self._js.publish(chunk_subject, chunk)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        info = ObjectInfo(
            name=name,
            bucket=BODY_BUCKET,
            nuid=nuid,
            size=len(data),
            chunks=len(chunks),
            digest=f"SHA-256={digest}",
            mtime=datetime.now(UTC).isoformat(),
            options=ObjectMetaOptions(max_chunk_size=CHUNK_SIZE),
        )
        await self._js.publish(_meta_subject(name), json.dumps(info.as_dict()).encode())

    async def get(self, ref: BodyRef) -> bytes:
        if ref.inline is not None:
            return ref.inline
        if self._bus is not None:
            return await self._get_direct(self._bus, ref.object_name)
        store = await self._store()
        try:
            result = await store.get(ref.object_name)
        except (ObjectNotFoundError, NotFoundError) as exc:
            raise BodyMissing(ref.object_name) from exc
        if result.data is None:
            raise BodyMissing(ref.object_name)
        return bytes(result.data)

    async def get_head(self, ref: BodyRef, limit: int) -> bytes:
        """The start of a body through its header block (the empty line included), for a reader
        that needs no more (a DSN returning headers): a stored body is read a chunk at a time
        and no further than that. Without an empty line in the first `limit` octets (0: no
        limit), those up to their last line end. At most `head_octets(ref, limit)` are read."""
        if ref.inline is not None:
            return _head(ref.inline, limit)
        if self._bus is None:
            return _head(await self.get(ref), limit)
        bus, stream = self._bus, object_stream(BODY_BUCKET)
        info = await self._live_info(bus, ref.object_name)
        data = bytearray()
        after = 0
        for _ in range(info.chunks or 0):
            batch = await bus.get_next(stream, object_chunk_subject(BODY_BUCKET, info.nuid), 1, after=after)
            if not batch:
                raise BrokerUnavailable(f"body {ref.object_name}: chunks missing after {len(data)} bytes")
            data += batch[0].data
            after = int((batch[0].headers or {}).get("Nats-Sequence", after))
            if _header_end(data) >= 0 or (limit and len(data) >= limit):
                break
        else:
            if len(data) != info.size:
                raise BrokerUnavailable(f"body {ref.object_name}: {len(data)} of {info.size} bytes")
        return _head(bytes(data), limit)

    async def _get_direct(self, bus: Bus, name: str) -> bytes:
        stream = object_stream(BODY_BUCKET)
        info = await self._live_info(bus, name)
        chunks: list[bytes] = []
        after = 0
        while len(chunks) < (info.chunks or 0):
            batch = await bus.get_next(
                stream, object_chunk_subject(BODY_BUCKET, info.nuid), info.chunks - len(chunks), after=after
            )
            if not batch:
                break
            chunks.extend(m.data for m in batch)
            after = int((batch[-1].headers or {}).get("Nats-Sequence", after))
        data = b"".join(chunks)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        if len(data) != info.size or digest.rstrip("=") != (info.digest or "").partition("=")[2].rstrip("="):
            # Chunks missing or changed under us: a read to retry, never a body to send.
            raise BrokerUnavailable(f"body {name}: {len(data)} of {info.size} bytes, digest {digest}")
        return data

    async def _live_info(self, bus: Bus, name: str) -> ObjectInfo:
        """What the meta of a stored body says, or BodyMissing."""
        stream = object_stream(BODY_BUCKET)
        meta = _meta_subject(name)
        found = (await bus.get_last(stream, [meta])).get(meta)
        info = _live_object(found.data if found is not None else None)
        if info is None:
            # Perhaps a replica behind the ingress's write: ask the leader before believing it.
            latest = await self._leader_last(stream, meta)
            info = _live_object(latest.data if latest is not None else None)
        if info is None:
            raise BodyMissing(name)
        return info

    async def _leader_last(self, stream: str, subject: str) -> RawStreamMsg | None:
        """`bus.leader_last`, with a KV delete marker taken as nothing stored."""
        try:
            msg = await leader_last(self._js, stream, subject)
        except Exception as exc:
            raise BrokerUnavailable(f"reading {subject} from the leader failed: {exc!r}") from exc
        return None if msg is None or is_kv_delete(msg) else msg

    async def discard(self, ref: BodyRef) -> None:
        """Delete a body: one never queued (the ingress answered 451), or one no job needs."""
        if ref.inline is not None:
            return
        await self._delete_object(ref.object_name)

    async def _delete_object(self, name: str, nuid: str = "") -> None:
        """Mark the object deleted (readers take it for gone from then on), then purge it
        where this process may. Marked again, one deleted already (a release finishing what
        a killed replica began) is purged again: nothing is left to remove."""
        tombstone = ObjectInfo(name=name, bucket=BODY_BUCKET, nuid=nuid, deleted=True)
        try:
            await self._js.publish(_meta_subject(name), json.dumps(tombstone.as_dict()).encode())
            if self._purges:
                await purge_deleted_body(self._js, _meta_subject(name))
        except Exception as exc:
            log.warning("could not delete body %s (it expires by TTL): %r", name, exc)

    async def hold(self, ref: BodyRef, job_ids: list[str]) -> None:
        """Record the jobs that still need a stored body. Idempotent across router redeliveries:
        an existing record is left alone, because some of its jobs may have finished already."""
        if ref.inline is not None:
            return
        kv = await self._kv()
        try:
            await kv.create(ref.object_name, msgpack.packb(sorted(job_ids)))
        except KeyWrongLastSequenceError:
            pass

    async def _references(self, ref: BodyRef) -> tuple[list[str], int]:
        """The jobs holding a stored body, and their record's revision (none: [], 0). From the
        leader: a lagging replica's "no record" would leave the body stored."""
        subject = kv_subject(BODY_REFS_BUCKET, ref.object_name)
        stored = await self._leader_last(kv_stream(BODY_REFS_BUCKET), subject)
        if stored is None:
            return [], 0
        return msgpack.unpackb(stored.data or b"\x90"), stored.seq or 0

    async def add_holder(self, ref: BodyRef, holder: str, *, beside: str) -> None:
        """Add `holder` to the references of a stored body that `beside` (a job) still holds, so
        that the body outlives whichever of the two releases last. Idempotent. A record without
        `beside` means the job finished meanwhile; nothing is added then."""
        if ref.inline is not None:
            return
        kv = await self._kv()
        for _ in range(50):
            jobs, revision = await self._references(ref)
            if holder in jobs or beside not in jobs:
                return
            try:
                await kv.update(ref.object_name, msgpack.packb([*jobs, holder]), last=revision)
                return
            except KeyWrongLastSequenceError:
                continue  # another job released or held concurrently; re-read and retry
        raise BrokerUnavailable(f"could not hold body {ref.object_name}: too much contention")

    async def release(self, ref: BodyRef, job_id: str) -> None:
        """A job reached its final outcome; delete the body when no job needs it any more."""
        if ref.inline is not None:
            return
        kv = await self._kv()
        for _ in range(50):
            jobs, revision = await self._references(ref)
            if job_id not in jobs:
                if revision and not jobs:
                    # An emptied record: the last release stopped before deleting the body (its
                    # replica died). Nothing can hold it again, so this one finishes the job.
                    await self._delete(ref, kv)
                return
            jobs.remove(job_id)
            if jobs:
                try:
                    await kv.update(ref.object_name, msgpack.packb(jobs), last=revision)
                    return
                except KeyWrongLastSequenceError:
                    continue  # another job released concurrently; re-read and retry
            try:
                await kv.update(ref.object_name, msgpack.packb([]), last=revision)
            except KeyWrongLastSequenceError:
                continue
            await self._delete(ref, kv)
            return
        raise BrokerUnavailable(f"could not release body {ref.object_name}: too much contention")

    async def _delete(self, ref: BodyRef, kv: KeyValue) -> None:
        """Delete a body whose reference record was emptied, then the record. Emptied first,
        the record keeps the deletion to finish should this stop half-way: `add_holder` never
        adds to a record without its job, and `hold` never writes over a record."""
        await self.discard(ref)
        await kv.delete(ref.object_name)


async def purge_deleted_body(js: JetStreamContext, meta_subject: str) -> bool:
    """Purge the chunks of every object a meta subject has named and then the subject, if its
    last meta says deleted (read through the stream leader); False if not. Only for a user
    that may purge the stream: a service that declares the topology, or `admin`."""
    stream = object_stream(BODY_BUCKET)
    nuids: set[str] = set()
    last: ObjectInfo | None = None
    seq = 0
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq + 1, subject=meta_subject, next=True)
        except NotFoundError:
            break
        seq = msg.seq or seq + 1
        last = _meta_info(msg.data)
        if last is not None and last.nuid:
            nuids.add(last.nuid)
    if last is None or not last.deleted:
        return False
    for nuid in sorted(nuids):
        await js.purge_stream(stream, subject=object_chunk_subject(BODY_BUCKET, nuid))
    # Only the metas read above: a purge bounded by the sequence after the last of them.
    await js.purge_stream(stream, subject=meta_subject, seq=seq + 1)
    return True


async def sweep_deleted_bodies(bus: Bus, *, after: int = 0) -> int:
    """Purge every body marked deleted in a meta stored after sequence `after`; returns the
    sequence to start from next time. Run by the topology keeper as `admin` (the services'
    users may not purge); started from 0, it goes through every meta still stored once."""
    stream = object_stream(BODY_BUCKET)
    every_meta = object_meta_subject(BODY_BUCKET, ">")
    swept = 0
    while True:
        batch = await bus.get_next(stream, every_meta, _SWEEP_BATCH, after=after)
        if not batch:
            break
        for msg in batch:
            headers = msg.headers or {}
            after = max(after, int(headers.get("Nats-Sequence", after)))
            info = _meta_info(msg.data)
            if info is not None and info.deleted:
                swept += await purge_deleted_body(bus.js, headers["Nats-Subject"])
    if swept:
        log.info("purged %d deleted bodies", swept)
    return after
