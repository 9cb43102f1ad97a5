"""The message header block as bytes: find, strip and add fields without re-encoding anything.

The body and every header Relais does not touch stay byte-for-byte what the sender wrote (DKIM
signatures of the sender survive).
"""

from __future__ import annotations

import datetime
import email.utils
import re

# Control headers a sender may set; read by the ingress, never delivered.
CAMPAIGN_HEADER = "X-Relais-Campaign"
POOL_HEADER = "X-Relais-Pool"
CONTROL_HEADERS = (CAMPAIGN_HEADER, POOL_HEADER)

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


def first_value(header_block: bytes, name: str) -> str | None:
    name = name.lower()
    for field_name, raw in fields(header_block):
        if field_name == name:
            return value_of(raw)
    return None


def strip_fields(header_block: bytes, names: tuple[str, ...]) -> bytes:
    drop = {n.lower() for n in names}
    return b"".join(raw for name, raw in fields(header_block) if name not in drop)


def has_field(header_block: bytes, name: str) -> bool:
    return any(field_name == name.lower() for field_name, _ in fields(header_block))


def submission_fixups(header_block: bytes, *, message_id: str, hostname: str, now: float) -> bytes:
    """Add Message-ID: and Date: when the sender left them out (RFC 6409 8.2, 8.3)."""
    added = b""
    if not has_field(header_block, "message-id"):
        added += f"Message-ID: <{message_id}@{hostname}>\r\n".encode()
    if not has_field(header_block, "date"):
        date = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
        added += f"Date: {date}\r\n".encode()
    return header_block + added
