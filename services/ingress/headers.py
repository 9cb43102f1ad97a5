"""The message header block as bytes: find, strip and add fields without re-encoding anything.

The body and every header Relais does not touch stay byte-for-byte what the sender wrote (DKIM
signatures of the sender survive: RFC 6376 5.4.1 keeps Bcc and Return-Path out of them).
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

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its final CRLF, rest starting at the empty line)."""
    if data.startswith(b"\r\n"):
        return b"", data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 2], data[end + 2 :]


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
