"""`BodyStore.get_head`: a body's header block without reading the rest of a stored body, the
same for direct gets, the Object Store's own read and inline bodies."""

from __future__ import annotations

import pytest

from services.core.bodies import CHUNK_SIZE, BodyMissing, BodyStore, head_octets
from services.core.bus import Bus
from services.core.envelope import BodyRef

BODY = b"body line\r\n" * 40_000  # several chunks


def _message(head_size: int) -> tuple[bytes, bytes]:
    """(a message whose header block is about `head_size` octets, that header block)."""
    fields = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"f" * 60) for i in range(head_size // 80))
    head = b"Subject: head\r\n" + fields + b"\r\n"
    return head + BODY, head


@pytest.mark.parametrize(
    "head_size", [100, CHUNK_SIZE - 40, CHUNK_SIZE + 500], ids=["small", "across-a-chunk", "second-chunk"]
)
async def test_the_header_block_and_nothing_more(topology_bus: Bus, head_size: int) -> None:
    data, head = _message(head_size)
    writer = BodyStore(topology_bus.js, inline_max=0)
    ref = await writer.put("m-head", data)
    for store in (BodyStore(topology_bus.js, 0, topology_bus), BodyStore(topology_bus.js, 0)):
        assert await store.get_head(ref, 0) == head
        assert await store.get_head(ref, 256 * 1024) == head
    assert await writer.get_head(BodyRef(size=len(data), inline=data), 0) == head


async def test_a_header_block_over_the_limit_is_cut_at_a_line_end(topology_bus: Bus) -> None:
    data, head = _message(3 * CHUNK_SIZE)
    ref = await BodyStore(topology_bus.js, inline_max=0).put("m-long", data)
    cut = await BodyStore(topology_bus.js, 0, topology_bus).get_head(ref, 10_000)
    assert head.startswith(cut) and cut.endswith(b"\r\n") and 9_900 < len(cut) <= 10_000
    assert head_octets(ref, 10_000) == CHUNK_SIZE and head_octets(ref, 0) == len(data)


async def test_no_header_block_end_reads_the_body_to_its_end(topology_bus: Bus) -> None:
    data = b"Subject: no body\r\n" * 20_000  # no empty line: all of it is headers
    ref = await BodyStore(topology_bus.js, inline_max=0).put("m-nobody", data)
    assert await BodyStore(topology_bus.js, 0, topology_bus).get_head(ref, 0) == data


async def test_a_body_gone_is_missing(topology_bus: Bus) -> None:
    store = BodyStore(topology_bus.js, 0, topology_bus)
    ref = await store.put("m-gone", b"Subject: x\r\n\r\n" + BODY)
    await store.discard(ref)
    with pytest.raises(BodyMissing):
        await store.get_head(ref, 0)
