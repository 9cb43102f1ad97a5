"""read_data against aiosmtpd's own DATA loop on adversarial streams (harness from
test_ingress_data)."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.ingress.budget import ByteBudget
from services.ingress.data import DataState, read_data
from tests.unit.test_ingress_data import NEXT, _feed, aiosmtpd_outcome, our_outcome

IMITATIONS = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\n.\r",
    b".\r\n",
    b"\r\n..",
]


@pytest.mark.parametrize("imitation", IMITATIONS, ids=repr)
async def test_end_imitations_split_everywhere(imitation: bytes) -> None:
    stream = b"a" + imitation + b"MAIL FROM:<x@y>\r\n" + b"\r\n.\r\n" + NEXT + b"MAIL FROM:<z@y>\r\n"
    for a in range(1, len(stream)):
        for pieces in ([stream[:a], stream[a:]], [stream[:a], stream[a : a + 1], stream[a + 1 :]]):
            pieces = [p for p in pieces if p]
            for size_limit, line_limit in ((None, 1001), (12, 1001), (None, 8)):
                ours = await our_outcome(pieces, size_limit, line_limit)
                theirs = await aiosmtpd_outcome(pieces, size_limit, line_limit)
                assert ours == theirs, (pieces, size_limit, line_limit)


async def test_end_line_split_at_every_offset_after_every_prefix() -> None:
    prefixes = [b"", b"\r", b"\n", b"\r\n", b".", b"..", b"\r\r\r", b"x\r\n.", b"x\r\n\r", b"\r\n.\r"]
    for prefix in prefixes:
        stream = prefix + b"\r\n.\r\n" + NEXT
        for a in range(1, len(stream)):
            for b in range(a + 1, len(stream)):
                pieces = [stream[:a], stream[a:b], stream[b:]]
                ours = await our_outcome(pieces, None, 1001)
                assert ours == await aiosmtpd_outcome(pieces, None, 1001), pieces


async def test_huge_runs_of_cr_and_dots_on_block_boundaries() -> None:
    for body in (b"\r" * 100_000, b"\r\n." * 30_000, b".\r\n" * 30_000, b"\r\r\n" * 30_000, b"\n" * 70_000):
        stream = body + b"\r\n.\r\n" + NEXT + b"after\r\n"
        for size in (1, 2, 3, 4, 5, 4096, 65536):
            if size < 5 and len(stream) > 20_000:
                stream_ = stream[:20_000] + b"\r\n.\r\n" + NEXT
            else:
                stream_ = stream
            pieces = [stream_[i : i + size] for i in range(0, len(stream_), size)]
            ours = await our_outcome(pieces, None, 1001)
            assert ours == await aiosmtpd_outcome(pieces, None, 1001), (body[:10], size)


async def test_random_adversarial_streams() -> None:
    rng = random.Random(8086)
    atoms = [b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"a", b"\x00", b"x" * 7]
    for _ in range(3000):
        stream = b"".join(rng.choices(atoms, k=rng.randint(0, 25)))
        if b"\r\n.\r\n" not in b"\r\n" + stream:
            stream += b"\r\n.\r\n"
        stream += b"".join(rng.choices(atoms, k=rng.randint(0, 6))) + NEXT
        cuts = sorted(set(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8)))))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        size_limit = rng.choice([None, 5, 20, 100])
        line_limit = rng.choice([6, 20, 1001])
        ours = await our_outcome(pieces, size_limit, line_limit)
        assert ours == await aiosmtpd_outcome(pieces, size_limit, line_limit), (
            pieces,
            size_limit,
            line_limit,
        )


async def test_no_room_gives_everything_back_and_reads_to_the_end() -> None:
    budget = ByteBudget(100)
    other = budget.reservation()
    assert other.grow(60)
    reader = asyncio.StreamReader(limit=1001)
    stream = b"y" * 30 + b"\r\n" + b"z" * 30 + b"\r\n.\r\n" + NEXT
    feeder = asyncio.create_task(_feed(reader, [stream[:35], stream[35:]]))
    mine = budget.reservation()
    state, message, _ = await read_data(reader, size_limit=100, line_limit=1001, reservation=mine)
    await feeder
    assert (state, message, bytes(reader._buffer)) == (DataState.NO_ROOM, b"", NEXT)
    assert mine.held == 0 and budget.used == 60
