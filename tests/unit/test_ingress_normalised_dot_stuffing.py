"""`read_data(normalise=True)`: lines begun by a bare CR or LF are dot-unstuffed like any other,
wherever the socket split the stream (the bare line ending last in one read, the dots first in
the next); a lone "." beside a bare line ending ends nothing and stays."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from services.ingress.data import DataState, read_data
from tests.unit.test_ingress_data import NEXT, _feed

CASES = [
    (b"a\n..b\r\n", b"a\r\n.b\r\n"),
    (b"a\r..b\r\n", b"a\r\n.b\r\n"),
    (b"a\n...\r\n", b"a\r\n..\r\n"),
    (b"a\n..b\n..c\r\n", b"a\r\n.b\r\n.c\r\n"),
    (b"..a\n..b\r\n", b".a\r\n.b\r\n"),  # the first line too
    (b"\n..b\r\n", b"\r\n.b\r\n"),  # a bare LF first
    (b"a\r\r\n..b\r\n", b"a\r\n\r\n.b\r\n"),  # CR CR LF: a bare CR, then a CRLF
    (b"a\n.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),  # lone dots: not an end, kept
    (b"a\r\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),
    (b"a\r.\rb\r\n", b"a\r\n.\r\nb\r\n"),
    (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),  # CRLF lines as ever
]


async def _read(pieces: list[bytes], normalise: bool) -> tuple[DataState, bytes, bytes]:
    reader = asyncio.StreamReader(limit=1000)
    feeder = asyncio.create_task(_feed(reader, pieces))
    state, message, _ = await asyncio.wait_for(
        read_data(reader, size_limit=None, line_limit=1000, normalise=normalise), 5
    )
    await feeder
    return state, message, bytes(reader._buffer)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("sent", "stored"), CASES, ids=repr)
async def test_unstuffed_after_bare_line_endings_split_everywhere(sent: bytes, stored: bytes) -> None:
    stream = sent + b".\r\n" + NEXT
    offsets = range(1, len(stream))
    for cuts in itertools.chain([()], itertools.combinations(offsets, 1), itertools.combinations(offsets, 2)):
        bounds = [0, *cuts, len(stream)]
        pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        assert await _read(pieces, normalise=True) == (DataState.NOMINAL, stored, NEXT), cuts


async def test_without_normalise_the_reader_is_unchanged() -> None:
    # reject mode refuses bare line endings afterwards; the reader keeps aiosmtpd's outcome.
    assert await _read([b"a\n..b\r\n.\r\n"], normalise=False) == (DataState.NOMINAL, b"a\n..b\r\n", b"")
