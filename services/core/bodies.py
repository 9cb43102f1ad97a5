"""Message bodies: inline when small, one Object Store write when large, removed when done.

A large body is written once at the ingress and referenced by every per-domain job and every
retry. The router records which jobs still need it (KV bucket `relais-body-refs`); each job's
final outcome releases its reference, and the last release deletes the object.

"Gone" is only ever concluded from the stream leader. Direct gets, which any replica may answer,
are the fast path, but a follower that has not yet applied the ingress's write answers "no such
body" for a moment, and a body taken for gone ends its message without an outcome.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging

import msgpack
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, RawStreamMsg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services.core.bus import BrokerUnavailable, Bus, is_kv_delete, leader_last
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


def _live_object(meta: bytes | None) -> ObjectInfo | None:
    """The object a meta message describes, None when there is none or it was deleted."""
    if not meta:
        return None
    info = ObjectInfo.from_response(json.loads(meta))
    return None if info.deleted else info


class BodyMissing(Exception):
    """The referenced body is gone: its job already reached its final outcome, or it waited
    past the body's TTL (`disposition.settle_missing_body` tells the two apart)."""


class BodyStore:
    """With a `bus`, a stored body is read with two direct gets (its meta, then all its chunks
    in one batch) instead of nats-py's `ObjectStore.get`, which creates an ordered consumer
    for every read (a consumer created and deleted per delivery attempt: on replicated streams a
    clustered operation each time)."""

    def __init__(self, js: JetStreamContext, inline_max: int, bus: Bus | None = None) -> None:
        self._js = js
        self._inline_max = inline_max
        self._bus = bus
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
        try:
            store = await self._store()
            await store.put(message_id, data)
        except Exception as exc:
            raise BrokerUnavailable(f"storing body of {message_id} failed: {exc!r}") from exc
        return BodyRef(size=len(data), object_name=message_id)

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

    async def _get_direct(self, bus: Bus, name: str) -> bytes:
        stream = object_stream(BODY_BUCKET)
        meta = object_meta_subject(BODY_BUCKET, base64.urlsafe_b64encode(name.encode()).decode())
        found = (await bus.get_last(stream, [meta])).get(meta)
        info = _live_object(found.data if found is not None else None)
        if info is None:
            # Perhaps a replica behind the ingress's write: ask the leader before believing it.
            latest = await self._leader_last(stream, meta)
            info = _live_object(latest.data if latest is not None else None)
        if info is None:
            raise BodyMissing(name)
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

    async def _leader_last(self, stream: str, subject: str) -> RawStreamMsg | None:
        """`bus.leader_last`, with a KV delete marker taken as nothing stored."""
        try:
            msg = await leader_last(self._js, stream, subject)
        except Exception as exc:
            raise BrokerUnavailable(f"reading {subject} from the leader failed: {exc!r}") from exc
        return None if msg is None or is_kv_delete(msg) else msg

    async def discard(self, ref: BodyRef) -> None:
        """Drop a body that was stored but never queued (the ingress answered 451)."""
        if ref.inline is not None:
            return
        try:
            await (await self._store()).delete(ref.object_name)
        except ObjectNotFoundError:
            pass  # deleted already (a release finishing what a killed replica began)
        except Exception as exc:
            log.warning("could not discard orphan body %s (it expires by TTL): %r", ref.object_name, exc)

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
