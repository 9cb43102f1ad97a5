"""The message header block as bytes: find, strip and add fields without re-encoding anything.

The body and every header Relais does not touch stay byte-for-byte what the sender wrote (DKIM
signatures of the sender survive: RFC 6376 5.4.1 keeps Bcc and Return-Path out of them).

The header ends where Postfix's cleanup ends it (`mime_state.c`), at the first line that is no
field and continues none; everything the ingress checks, strips or adds is in that part, and the
message it queues has an empty line there, so a mail reader's header is the same part.
"""

from __future__ import annotations

import datetime
import email.utils
import re

# Control headers a sender may set; read by the ingress, never delivered.
CAMPAIGN_HEADER = "X-Relais-Campaign"
POOL_HEADER = "X-Relais-Pool"
CONTROL_HEADERS = (CAMPAIGN_HEADER, POOL_HEADER)
# Removed from submitted mail, as by Postfix's cleanup (`message_drop_headers`): Bcc: would show
# the To: and Cc: recipients the blind ones; Return-Path: is written at final delivery from the
# envelope (RFC 5321 4.4: an originating system SHOULD NOT send one), and a stale one sits above
# it; Content-Length: can truncate the message in an mbox.
DROPPED_HEADERS = ("Bcc", "Resent-Bcc", "Return-Path", "Content-Length")
# RFC 5322 3.6's table: the fields a message carries at most once. Gmail and Amazon SES refuse a
# message with two of one. Bcc: is in the table too, but left out here: it is dropped (above), so
# no reader or provider ever sees how many there were.
SINGLE_FIELDS = (
    "Date",
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Subject",
)

# A field's name, as Postfix's is_header reads a field's start: a name, white space, a colon.
# Possessive, so that a name is not tried again shorter (these run on every message: 2 µs, not 30).
_NAME = rb"[!-9;-~]++"
_FIELD_NAME = re.compile(rb"^(" + _NAME + rb")[ \t]*:")
# A line after the first that neither begins a field nor continues one (white space).
_STRAY_LINE = re.compile(rb"\n(?!" + _NAME + rb"[ \t]*:|[ \t])")
# RFC 5322 obs-optional: `Subject : hi`. A field to Postfix and to this module, the end of the
# header to Python's email parser; Postfix writes it `Subject: hi` so that all read it alike.
_SPACE_BEFORE_COLON = re.compile(rb"(\n" + _NAME + rb")[ \t]+:")


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its final CRLF, rest starting at the empty line).

    The header block ends, as in Postfix's cleanup and in mail readers, at the first line that
    is no field and does not continue one: `rest` then starts with that line, and there is no
    empty line before it (`join` puts one there).
    """
    if data.startswith(b"\r\n"):
        return b"", data
    end = data.find(b"\r\n\r\n")
    end = len(data) if end < 0 else end + 2
    # A first line starting with white space continues the Received: the ingress writes above it.
    if data[:1] not in (b" ", b"\t") and not _FIELD_NAME.match(data):
        return b"", data
    # Up to the last line's CR: a match at its LF would look at what follows the header.
    stray = _STRAY_LINE.search(data, 0, end - 1)
    if stray:
        end = stray.start() + 1
    return data[:end], data[end:]


def join(head: bytes, added: bytes, rest: bytes) -> bytes:
    """The message from the sender's header block (after `split_message`), the fields Relais
    adds to it, and the rest.

    When the sender's header ended at a line that is no field, an empty line goes before that
    line, as Postfix's cleanup puts it: some readers would read on past such a line (Python's
    parser past `From ...` or `: x`), and show as header fields what the ingress neither
    checked nor stripped as such. A field written `Name :` becomes `Name:`, as in Postfix.
    """
    separator = b"" if not rest or rest.startswith(b"\r\n") else b"\r\n"
    head = _SPACE_BEFORE_COLON.sub(rb"\1:", b"\n" + head)[1:]
    return head + added + separator + rest


def fields(header_block: bytes) -> list[tuple[str, bytes]]:
    """Each header field as (lower-case name, raw bytes including folded lines and CRLF)."""
    out: list[tuple[str, bytes]] = []
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + line)
            continue
        match = _FIELD_NAME.match(line)
        out.append((match.group(1).decode("ascii").lower() if match else "", line))
    return out


def value_of(raw_field: bytes) -> str:
    """The unfolded, stripped value of one raw field."""
    _, _, value = raw_field.partition(b":")
    return re.sub(rb"\r\n[ \t]+", b" ", value).strip().decode("utf-8", "replace")


class HeaderBlock:
    """A header block parsed once. The ingress asks several questions of every message's header
    (From:, the control headers, Message-ID:, Date:); each used to parse the block again."""

    __slots__ = ("fields", "names", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.fields = fields(raw)
        self.names = frozenset(name for name, _ in self.fields)

    def first(self, name: str) -> str | None:
        """The unfolded value of the first field called `name`, or None."""
        name = name.lower()
        if name not in self.names:
            return None
        return next(value_of(raw) for field_name, raw in self.fields if field_name == name)

    def every(self, name: str) -> list[str]:
        """The unfolded values of every field called `name`, in order."""
        name = name.lower()
        if name not in self.names:
            return []
        return [value_of(raw) for field_name, raw in self.fields if field_name == name]

    def has(self, name: str) -> bool:
        return name.lower() in self.names

    def repeated(self, names: frozenset[str]) -> str | None:
        """The first of `names` (lower case) that a second field repeats, or None."""
        if len(self.fields) == len(self.names):
            return None  # no name repeats at all: most submitted mail, answered without a loop
        seen: set[str] = set()
        for name, _ in self.fields:
            if name in names:
                if name in seen:
                    return name
                seen.add(name)
        return None

    def without(self, names: tuple[str, ...]) -> bytes:
        """The raw block minus every field called one of `names`."""
        drop = {n.lower() for n in names}
        if drop.isdisjoint(self.names):
            return self.raw
        return b"".join(raw for name, raw in self.fields if name not in drop)


def first_value(header_block: bytes, name: str) -> str | None:
    return HeaderBlock(header_block).first(name)


def strip_fields(header_block: bytes, names: tuple[str, ...]) -> bytes:
    return HeaderBlock(header_block).without(names)


def has_field(header_block: bytes, name: str) -> bool:
    return HeaderBlock(header_block).has(name)


def missing_fields(block: HeaderBlock, *, message_id: str, hostname: str, now: float) -> bytes:
    """Message-ID: and Date: when the sender left them out (RFC 6409 8.2, 8.3), to append."""
    added = b""
    if not block.has("message-id"):
        added += f"Message-ID: <{message_id}@{hostname}>\r\n".encode()
    if not block.has("date"):
        date = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
        added += f"Date: {date}\r\n".encode()
    return added


def submission_fixups(header_block: bytes, *, message_id: str, hostname: str, now: float) -> bytes:
    """Add Message-ID: and Date: when the sender left them out (RFC 6409 8.2, 8.3)."""
    return header_block + missing_fields(
        HeaderBlock(header_block), message_id=message_id, hostname=hostname, now=now
    )
