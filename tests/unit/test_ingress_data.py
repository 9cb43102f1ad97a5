"""The chunked DATA reader gives exactly what aiosmtpd's line-by-line loop gives.

Every case runs through aiosmtpd's own `SMTP.smtp_DATA` and through `read_data`, with the same
octets arriving in the same pieces: the same end, the same message (or the same refusal), and
the same octets left unread for the next command.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from services.ingress.data import DataState, read_data

TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH = "552 Error: Too much mail data"
NEXT = b"QUIT\r\n"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


class _Sink:
    def __init__(self) -> None:
        self.content: bytes | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.content = envelope.original_content
        return "250 OK"


async def _feed(reader: asyncio.StreamReader, pieces: list[bytes]) -> None:
    for piece in pieces:
        reader.feed_data(piece)
        await asyncio.sleep(0)


async def aiosmtpd_outcome(pieces: list[bytes], size_limit: int | None, line_limit: int) -> tuple[str, bytes]:
    """(reply or "250 OK", message) from aiosmtpd's own DATA loop; the reader is left for a look."""

    class Reference(SMTP):
        line_length_limit = line_limit

    sink = _Sink()
    conn = Reference(sink, data_size_limit=size_limit, hostname="relais.test", decode_data=False)
    reader = asyncio.StreamReader(limit=line_limit)
    conn._reader, conn._writer = reader, _Writer()  # type: ignore[assignment]
    conn.transport = object()  # type: ignore[assignment]
    conn.session = Session(asyncio.get_running_loop())
    conn.session.host_name = "client.test"
    conn.envelope = Envelope()
    conn.envelope.rcpt_tos = ["r@alpha.test"]
    feeder = asyncio.create_task(_feed(reader, pieces))
    await asyncio.wait_for(SMTP.smtp_DATA(conn, ""), 5)
    await feeder
    reply = conn._writer.lines[-1].decode().rstrip()  # type: ignore[attr-defined]
    rest = bytes(reader._buffer)
    return reply, (sink.content or b"") + b"|" + rest


async def our_outcome(pieces: list[bytes], size_limit: int | None, line_limit: int) -> tuple[str, bytes]:
    reader = asyncio.StreamReader(limit=line_limit)
    feeder = asyncio.create_task(_feed(reader, pieces))
    state, message, seen = await asyncio.wait_for(
        read_data(reader, size_limit=size_limit, line_limit=line_limit), 5
    )
    await feeder
    if state is DataState.NOMINAL:
        # The longest line as sent bounds every line of the message, however it is split, and
        # the CRLFs counted are the message's.
        lines = message.replace(b"\r", b"\n").split(b"\n")
        assert max(map(len, lines)) <= seen.longest
        assert seen.crlf == message.count(b"\r\n")
    reply = {DataState.NOMINAL: "250 OK", DataState.TOO_LONG: TOO_LONG, DataState.TOO_MUCH: TOO_MUCH}[state]
    return reply, message + b"|" + bytes(reader._buffer)


def pieces_of(stream: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


CASES = [
    b".\r\n",  # empty message
    b"\r\n.\r\n",  # one empty line
    b"\r\n\r\n\r\n.\r\n",
    b"Subject: x\r\n\r\nbody\r\n.\r\n",
    b"..\r\n.\r\n",  # a dot-stuffed "." line
    b"..x\r\n...\r\n.\r\n",
    b".x\r\na\r\n..\r\n.\r\n",
    b"a\n.\nb\r\n.\r\n",  # bare LF around a dot: not an end
    b"a\r.\r\nb\r\n.\r\n",  # bare CR before a dot: not an end
    b"a\r\n.\n\r\n.\r\n",
    b"\r\r\n.\r\n",
    b"\r\r\r\n..\r\n.\r\n",
    b"\r.\r\n.\r\n",
    b"x" * 19 + b"\r\n.\r\n",  # line_limit 20 in the parametrisation below: fits with CRLF? no
    b"x" * 18 + b"\r\n.\r\n",
    b"x" * 20 + b"\r\n.\r\n",
    b"x" * 21 + b"\r\n.\r\n",
    b"x" * 45 + b"\r\nshort\r\n.\r\n",
    b"." + b"x" * 40 + b"\r\n.\r\n",
    b"ok\r\n" * 30 + b".\r\n",  # over a small size limit
    b"ok\r\n" * 5 + b"y" * 30 + b"\r\n" + b"ok\r\n" * 30 + b".\r\n",
]


@pytest.mark.parametrize("size_limit", [None, 0, 16, 60, 130])
@pytest.mark.parametrize("case", CASES)
async def test_known_cases_match_aiosmtpd(case: bytes, size_limit: int | None) -> None:
    stream = case + NEXT
    rng = random.Random(len(case))
    for pieces in ([stream], [bytes([b]) for b in stream], pieces_of(stream, rng), pieces_of(stream, rng)):
        assert await our_outcome(pieces, size_limit, 20) == await aiosmtpd_outcome(pieces, size_limit, 20), (
            case,
            pieces,
        )


async def test_random_streams_match_aiosmtpd() -> None:
    rng = random.Random(5321)
    atoms = [b"a", b"b", b".", b"\r", b"\n", b"\r\n", b"..", b"\r\n.", b"x" * 9, b"y" * 25]
    for _ in range(1500):
        body = b"".join(rng.choices(atoms, k=rng.randint(0, 30)))
        stream = body + b"\r\n.\r\n" + NEXT
        size_limit = rng.choice([None, 10, 40, 100, 400])
        line_limit = rng.choice([8, 20, 1001])
        pieces = pieces_of(stream, rng)
        ours = await our_outcome(pieces, size_limit, line_limit)
        theirs = await aiosmtpd_outcome(pieces, size_limit, line_limit)
        assert ours == theirs, (stream, pieces, size_limit, line_limit)


async def test_a_large_message_in_network_sized_pieces() -> None:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor inc.\r\n"
    message = b"Subject: big\r\n\r\n" + line * 2000 + b".leading dot\r\n" + line
    stream = message.replace(b"\r\n.", b"\r\n..") + b".\r\n" + NEXT
    pieces = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    for size_limit in (None, len(message), len(message) - 1):
        ours = await our_outcome(pieces, size_limit, 1001)
        assert ours == await aiosmtpd_outcome(pieces, size_limit, 1001)
    assert await our_outcome(pieces, None, 1001) == ("250 OK", message + b"|" + NEXT)


class _CountingReader(asyncio.StreamReader):
    """A StreamReader that counts the reads made of it, whatever the method."""

    calls = 0

    async def read(self, n: int = -1) -> bytes:
        self.calls += 1
        return await super().read(n)

    async def readexactly(self, n: int) -> bytes:
        self.calls += 1
        return await super().readexactly(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        self.calls += 1
        return await super().readuntil(separator)


@pytest.mark.parametrize(
    "body",
    [
        b"\r\n" * 20_000,  # a message that starts with (and is) a long run of empty lines
        b"\r" * 40_000 + b"\r\n",  # bare CRs: each could begin the end-of-data line
        b"\r\n.\r" * 10_000 + b"\r\n",  # almost the end-of-data line, again and again
        b"a.\r\n\r\n" * 7_000,
        b"Subject: x\r\n\r\n" + b"\r\n" * 20_000 + b"body\r\n",
    ],
)
async def test_reads_follow_the_blocks_not_the_lines(body: bytes) -> None:
    """However the lines look, the message is read a block at a time: at most one read per
    block the socket delivered (and one more), never one per line or octet; with the outcome
    aiosmtpd's own loop gives."""
    stream = body + b".\r\n" + NEXT
    pieces = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    reader = _CountingReader(limit=1001)
    feeder = asyncio.create_task(_feed(reader, pieces))
    state, message, _ = await asyncio.wait_for(read_data(reader, size_limit=None, line_limit=1001), 5)
    await feeder
    assert reader.calls <= len(pieces) + 1, reader.calls
    reply = {DataState.NOMINAL: "250 OK", DataState.TOO_LONG: TOO_LONG}[state]
    assert (reply, message + b"|" + bytes(reader._buffer)) == await aiosmtpd_outcome(pieces, None, 1001)
