"""The bounce service holds no whole large original it does not return, and holds the ones it
does within `bounce.max_buffered_bytes`.

A DSN returning headers (RET=HDRS, the default, and RET=FULL of a message over MAX_RETURNED)
reads only the first chunks of a stored original, up to its header block. Whole stored bodies
(a RET=FULL original small enough to go back, an inbound report) wait for room in the process's
budget, as the router's and delivery's do: a campaign of large messages refused at once must not
have the bounce pod killed for memory, its notices redelivered, and killed again.

Notices are published as delivery publishes them, to a bounce service running alone; its DSNs
are read from the router's queue, where they wait (no router runs)."""

from __future__ import annotations

import asyncio
import email
import time
from typing import Any

import nats
import pytest

from services.bounce.dsn import MAX_RETURNED
from services.core import held_bodies
from services.core.bodies import CHUNK_SIZE, BodyStore
from services.core.bus import Bus, connect
from services.core.envelope import BounceNotice, Envelope, new_message_id
from services.core.outcome import Bounced, Reply
from services.core.topology import (
    BODY_BUCKET,
    INBOUND_CONSUMER,
    INBOUND_STREAM,
    SUBMIT_STREAM,
    bounce_subject,
    inbound_subject,
    object_chunk_subject,
)
from tests.integration.bounce.conftest import RETURN_DOMAIN, VERP, wait_consumed
from tests.support.relais import an_envelope, stored_bodies

INLINE_MAX = 1024  # so that originals MAX_RETURNED may return whole are stored, not inline
HEADER_MAX = 8 * 1024
LINE = b"x" * 76 + b"\r\n"
LARGE = 600 * 1024  # five Object Store chunks
SMALL = 40_000  # stored, and not over MAX_RETURNED: a RET=FULL DSN returns it whole
BUDGET = 150_000
REJECT = Reply(552, "5.3.4", "Message size exceeds fixed limit")


def _original(name: str, size: int) -> bytes:
    head = f"From: news@relais.test\r\nTo: r@alpha.test\r\nSubject: {name}\r\n\r\n".encode()
    marker = f"body of {name}\r\n".encode()
    return head + marker + LINE * ((size - len(head) - len(marker)) // len(LINE))


async def _notify(bus: Bus, bodies: BodyStore, name: str, data: bytes, ret: str) -> Envelope:
    env = an_envelope("r@alpha.test", body=await bodies.put(name, data), dsn_ret=ret)
    failure = Bounced("r@alpha.test", REJECT, mx_host="mx.alpha.test")
    notice = BounceNotice(env, (failure,), releases_body=False)
    await bus.publish(bounce_subject(), notice.to_msgpack(), msg_id=f"notice-{name}")
    return env


async def _dsns(bus: Bus, bodies: BodyStore, count: int, timeout: float = 60.0) -> dict[str, bytes]:  # noqa: ASYNC109
    """The DSNs bounce submitted, by the id of the message each reports on."""
    deadline = time.monotonic() + timeout
    while (await bus.js.stream_info(SUBMIT_STREAM)).state.messages < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} DSNs after {timeout}s")
        await asyncio.sleep(0.1)
    found = {}
    for seq in range(1, count + 1):
        dsn = Envelope.from_msgpack((await bus.js.get_msg(SUBMIT_STREAM, seq)).data)
        found[dsn.meta["dsn_for"]] = await bodies.get(dsn.body)
    return found


def _parts(raw: bytes) -> dict[str, Any]:
    return {p.get_content_type(): p for p in email.message_from_bytes(raw).walk()}


@pytest.fixture
def chunks_read(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Octets of Object Store chunks read through direct gets, by chunk subject."""
    read: dict[str, int] = {}
    get_next = Bus.get_next

    async def counted(self: Bus, stream: str, subject: str, count: int, **kwargs: Any) -> Any:
        batch = await get_next(self, stream, subject, count, **kwargs)
        if subject.startswith(object_chunk_subject(BODY_BUCKET, "")):
            read[subject] = read.get(subject, 0) + sum(len(m.data) for m in batch)
        return batch

    monkeypatch.setattr(Bus, "get_next", counted)
    return read


async def _chunks_of(url: str, name: str) -> str:
    nc = await nats.connect(url)
    try:
        info = await (await nc.jetstream().object_store(BODY_BUCKET)).get_info(name)
        return object_chunk_subject(BODY_BUCKET, info.nuid)
    finally:
        await nc.close()


async def test_a_headers_only_dsn_reads_only_the_header_block(make_stack, chunks_read) -> None:
    stack = await make_stack(
        services=("bounce",),
        nats={"inline_body_max": INLINE_MAX},
        ingress={"max_header_size": HEADER_MAX},
        bounce={"dsn_window": 0},
    )
    bus = await connect(stack.config.nats, "test-notices")
    try:
        bodies = BodyStore(bus.js, INLINE_MAX, bus)
        originals = {
            "hdrs": (_original("hdrs", LARGE), ""),
            "full-large": (_original("full-large", LARGE), "FULL"),
        }
        envs = {name: await _notify(bus, bodies, name, data, ret) for name, (data, ret) in originals.items()}
        dsns = await _dsns(bus, bodies, len(envs))
    finally:
        await bus.close()

    for name, env in envs.items():
        data = originals[name][0]
        raw = dsns[env.id]
        headers = _parts(raw)["text/rfc822-headers"].get_payload(decode=True)
        assert f"Subject: {name}".encode() in headers
        assert b"body of" not in raw and "message/rfc822" not in _parts(raw)
        read = chunks_read[await _chunks_of(stack.config.nats.url, name)]
        assert read <= CHUNK_SIZE < len(data), f"{read} octets of {len(data)} read for headers"
    # RET=FULL of a message over MAX_RETURNED: its headers, and the notification says why.
    assert f"larger than {MAX_RETURNED} octets".encode() in dsns[envs["full-large"].id]


@pytest.fixture
def peak(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the budgets' own counters said: the most octets held at once (of which, with a
    whole original of a DSN just taken), how many holds waited, and the budgets' capacities."""
    peak: dict[str, Any] = {"used": 0, "wholes": 0, "waited": 0, "capacities": set()}
    acquire = held_bodies.HeldBodies._acquire

    async def watched(self: held_bodies.HeldBodies, need: int) -> None:
        if self._waiting or self.used + need > self.capacity:
            peak["waited"] += 1
        await acquire(self, need)
        peak["capacities"].add(self.capacity)
        peak["used"] = max(peak["used"], self.used)
        if need <= SMALL:  # a whole original, held beside what else is held
            peak["wholes"] = max(peak["wholes"], self.used)

    monkeypatch.setattr(held_bodies.HeldBodies, "_acquire", watched)
    return peak


async def test_whole_originals_wait_for_room_in_the_budget(make_stack, chunks_read, peak) -> None:
    stack = await make_stack(
        services=("bounce",),
        nats={"inline_body_max": INLINE_MAX},
        ingress={"max_header_size": HEADER_MAX},
        bounce={"dsn_window": 0, "max_buffered_bytes": BUDGET},
    )
    bus = await connect(stack.config.nats, "test-notices")
    try:
        bodies = BodyStore(bus.js, INLINE_MAX, bus)
        originals = {f"full-{i}": (_original(f"full-{i}", SMALL), "FULL") for i in range(8)}
        originals |= {f"hdrs-{i}": (_original(f"hdrs-{i}", LARGE), "HDRS") for i in range(4)}
        names = list(originals)
        envs = dict(
            zip(
                names,
                await asyncio.gather(*(_notify(bus, bodies, n, *originals[n]) for n in names)),
                strict=True,
            )
        )
        dsns = await _dsns(bus, bodies, len(envs))
    finally:
        await bus.close()

    assert peak["capacities"] == {BUDGET}
    assert peak["used"] <= BUDGET, f"{peak['used']} octets held at once, over {BUDGET}"
    assert peak["waited"] > 0, "no DSN waited for room: this test shows nothing"
    assert peak["wholes"] > SMALL, "whole originals were never held side by side"
    for name, env in envs.items():
        data, ret = originals[name]
        parts = _parts(dsns[env.id])
        if ret == "FULL":
            assert data in dsns[env.id], f"{name}: the whole original is not returned"
        else:
            assert "message/rfc822" not in parts and b"body of" not in dsns[env.id]
            assert f"Subject: {name}".encode() in parts["text/rfc822-headers"].get_payload(decode=True)
            read = chunks_read[await _chunks_of(stack.config.nats.url, name)]
            assert read <= CHUNK_SIZE, f"{name}: {read} octets read for its headers"


async def test_inbound_reports_wait_for_room_in_the_budget(make_stack, peak) -> None:
    """Two reports do not fit the budget together: each is read alone, and every one is read."""
    stack = await make_stack(
        services=("bounce",),
        nats={"inline_body_max": INLINE_MAX},
        bounce={**VERP, "max_buffered_bytes": BUDGET},
    )
    bus = await connect(stack.config.nats, "test-reports")
    try:
        bodies = BodyStore(bus.js, INLINE_MAX, bus)
        for i in range(4):
            name = new_message_id()
            env = Envelope(
                id=name,
                sender="",
                recipients=(f"postmaster@{RETURN_DOMAIN}",),
                account="",
                sender_domain="",
                body=await bodies.put(name, _original(f"report-{i}", 100_000)),
                kind="inbound",
            )
            await bus.publish(inbound_subject(), env.to_msgpack(), msg_id=env.id)
    finally:
        await bus.close()
    await wait_consumed(stack.config.nats.url, INBOUND_STREAM, INBOUND_CONSUMER, timeout=60)

    assert await stored_bodies(stack.config.nats.url) == 0, "a report was not read to its end"
    assert peak["capacities"] == {BUDGET}
    assert peak["waited"] > 0, "no report waited for room: this test shows nothing"
    assert peak["used"] <= BUDGET
