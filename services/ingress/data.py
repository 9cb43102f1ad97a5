"""The DATA phase, read in chunks rather than line by line, with aiosmtpd's exact outcomes.

aiosmtpd reads a message one `readuntil(b"\\r\\n")` at a time and joins the lines in Python:
about half of the ingress' CPU for a 50 KB message (~600 lines). Here the stream is searched for
the end-of-data line (`<CRLF>.<CRLF>`) in whatever the socket delivered, and the line rules are
checked on whole blocks in C (`split`, `max`), walking lines one by one only when a block
breaks a rule. The number of reads follows the number of blocks the socket delivered, never the
number of lines or octets. What the client sees is unchanged (unit-tested against aiosmtpd's own
loop):

- the end is a line that is exactly "." between CRLFs; bare CR or LF never end or split a line;
- a line longer than `line_limit` octets (with its CRLF) makes the message "too long", more than
  `size_limit` octets in all makes it "too much", whichever happens first in the stream, with
  aiosmtpd's order within one line; either way the rest is read (and dropped) up to the end;
- dot-stuffing is undone (RFC 5321 4.5.2).

With `ingress.bare_line_endings = "normalise"` the reader also turns every bare CR and LF into
CRLF, before undoing dot-stuffing: a line they begin is unstuffed like any other ("a\\n..b" is
"a", ".b"). They still never end the data.

One outcome is the ingress' own: a message whose octets the process's DATA budget cannot hold
(`budget.py`) is "no room", read to its end and dropped like the others.
"""

from __future__ import annotations

import asyncio
import enum
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from services.ingress.budget import Reservation

_CRLF = b"\r\n"
_END = b"\r\n.\r\n"
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# The period that begins a line of more than that period, in CRLF-only text (RFC 5321 4.5.2).
_STUFFED = re.compile(rb"(?:^|(?<=\r\n))\.(?!\r\n)")


class DataState(enum.Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too long"  # aiosmtpd: "500 Line too long (see RFC5321 4.5.3.1.6)"
    TOO_MUCH = "too much"  # aiosmtpd: "552 Error: Too much mail data"
    NO_ROOM = "no room"  # the DATA budget is spent: 452 4.3.1


@dataclass(frozen=True, slots=True)
class LineStats:
    """What the reader saw of a message's lines, so content checks need not scan for them again.

    Counted on the CRLF-delimited lines as sent: splitting them further at bare CR/LF, or
    undoing dot-stuffing, only makes lines shorter, and neither changes the number of CRLFs.
    """

    longest: int = 0  # octets without CRLF, dot-stuffing included
    crlf: int = 0  # CRLF line ends in the message


class _Rules:
    """aiosmtpd's state machine over the message's lines, fed in blocks of any size.

    aiosmtpd's StreamReader has `limit=line_limit`: a line whose text (without CRLF) is longer
    than that raises LimitOverrunError before it is counted (-> too long); any other line is
    counted first (-> too much once over `size_limit`) and then checked with its CRLF against
    `line_limit` (-> too long).
    """

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.state = DataState.NOMINAL
        self._size_limit = size_limit or 0
        self._line_limit = line_limit
        self._size = 0
        self._tail = b""  # the current line so far: at most line_limit + 1 octets
        self.longest = 0  # see LineStats
        self.crlf = 0

    def feed(self, block: bytes) -> None:
        if self.state is not DataState.NOMINAL:
            return
        text = self._tail + block if self._tail else block
        end = text.rfind(_CRLF) + 2
        if end >= 2:
            self._lines(text[:end])
            if self.state is not DataState.NOMINAL:
                return
            text = text[end:]
        self._tail = text
        # line_limit + 2 octets and still no CRLF: the line's text is longer than line_limit.
        if len(text) >= self._line_limit + 2:
            self.state = DataState.TOO_LONG

    def _lines(self, block: bytes) -> None:
        """`block` is whole lines, each ending with CRLF."""
        lines = block.split(_CRLF)
        del lines[-1]  # the empty string after the last CRLF
        fits = not self._size_limit or self._size + len(block) <= self._size_limit
        longest = max(map(len, lines))
        if fits and longest + 2 <= self._line_limit:
            self._size += len(block)
            self.longest = max(self.longest, longest)
            self.crlf += len(lines)
            return
        for line in lines:  # something breaks a rule: which one comes first, line by line
            if len(line) > self._line_limit:
                self.state = DataState.TOO_LONG
                return
            self._size += len(line) + 2
            if self._size_limit and self._size > self._size_limit:
                self.state = DataState.TOO_MUCH
                return
            if len(line) + 2 > self._line_limit:
                self.state = DataState.TOO_LONG
                return


# More than a StreamReader ever buffers (it stops reading at twice its limit, plus one socket
# read): `read(_EVERYTHING)` takes the whole buffer, which `_give_back` relies on.
_EVERYTHING = sys.maxsize


async def read_data(
    reader: asyncio.StreamReader,
    *,
    size_limit: int | None,
    line_limit: int,
    reservation: Reservation | None = None,
    arrived: Callable[[int], None] | None = None,
    normalise: bool = False,
) -> tuple[DataState, bytes, LineStats]:
    """Read from just after `354` through the end-of-data line; (state, unstuffed message,
    what was seen of its lines).

    Each block read is searched for the end-of-data line together with the last four octets
    before it, so the end is found wherever the socket split it, and the cost is a few C-level
    passes per block, whatever the lines look like. The message is empty unless the state is
    NOMINAL (what aiosmtpd keeps of a refused one). Its octets are reserved in `reservation` as
    they arrive (NO_ROOM when that fails); a refused message gives its reservation back at once.
    What followed the end-of-data line (pipelined commands) is left in `reader`. `arrived` is
    told the size of every block read (the session's timeout follows the transfer's progress).
    `normalise`: bare CR and LF become CRLF, and the lines they begin are unstuffed too.
    """
    rules = _Rules(size_limit, line_limit)
    # One buffer, not a list of the blocks read: a client sending tiny packets would make each
    # a bytes object of its own, ~40 octets of overhead for a few octets the budget counts.
    held = bytearray()

    def keep(block: bytes) -> None:
        rules.feed(block)
        if rules.state is DataState.NOMINAL and reservation is not None and not reservation.grow(len(block)):
            rules.state = DataState.NO_ROOM
        if rules.state is DataState.NOMINAL:
            held.extend(block)
            return
        del held[:]  # refused: do not hold the rest in memory
        if reservation is not None:
            reservation.release()

    # The CRLF that ended the DATA command counts: the message may be empty (".\r\n" at once).
    # `carry` is what the next block is searched with: its first `virtual` octets are that CRLF,
    # the rest are message octets not kept yet (they may begin the end-of-data line).
    carry, virtual = _CRLF, 2
    while True:
        block = await reader.read(_EVERYTHING)
        if not block:
            raise asyncio.IncompleteReadError(carry[virtual:], None)
        if arrived is not None:
            arrived(len(block))
        text = carry + block
        end = text.find(_END)
        if end >= 0:
            keep(text[virtual : end + 2])  # the CRLF before "." ends the last line
            _give_back(reader, text[end + len(_END) :])
            return _finish(rules, held, normalise)
        carry = text[-(len(_END) - 1) :]
        kept = len(text) - len(carry)
        if kept > virtual:
            keep(text[virtual:kept])
        virtual = max(0, virtual - kept)


def _give_back(reader: asyncio.StreamReader, rest: bytes) -> None:
    """Return what followed the end-of-data line to `reader`, for the command loop.

    `read(_EVERYTHING)` left the buffer empty and nothing ran since (no await), so appending is
    putting back in front. A client that has shut its side still has those commands answered
    (`RelaisSMTP.eof_received`), but the reader refuses `feed_data` after its EOF: they go
    straight back into its buffer then.
    """
    if not rest:
        return
    if reader.at_eof():
        reader._buffer.extend(rest)  # type: ignore[attr-defined]
    else:
        reader.feed_data(rest)


def normalise_line_endings(data: bytes) -> bytes:
    """Every bare CR and bare LF made a CRLF."""
    return _LINE_ENDING.sub(_CRLF, data)


def _finish(rules: _Rules, held: bytearray, normalise: bool) -> tuple[DataState, bytes, LineStats]:
    if rules.state is not DataState.NOMINAL:
        return rules.state, b"", LineStats()
    message = bytes(held)
    del held[:]
    return DataState.NOMINAL, _unstuff(message, normalise), LineStats(rules.longest, rules.crlf)


def _unstuff(message: bytes, normalise: bool) -> bytes:
    """Undo dot-stuffing (RFC 5321 4.5.2): the first "." of every line is dropped."""
    if normalise:
        # Normalised first: unstuffed after, a line begun by a bare LF would keep its dot. A
        # line of a lone "." can only sit beside a bare line ending here (between CRLFs it
        # would have ended the data): it ended nothing and is no stuffed line, so it stays.
        return _STUFFED.sub(b"", normalise_line_endings(message))
    if message.startswith(b"."):
        message = message[1:]
    return message.replace(b"\r\n.", _CRLF)
