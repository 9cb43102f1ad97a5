"""How a transaction's envelope goes on the wire: MAIL parameters and each address as sent.

RFC 6531 needs SMTPUTF8 only for what has no ASCII form: a non-ASCII local part, or header
fields in UTF-8 (RFC 6532) of a message its sender submitted with SMTPUTF8. A server that offers
SMTPUTF8 gets the addresses as given; one that does not gets internationalised domains as
A-labels (IDNA), as Postfix sends them, and a message with UTF-8 header fields is not sent
there (Postfix bounces it too, when its sender asked for SMTPUTF8). The recipient as given
stays the identity of outcomes, events and DSNs; only the bytes on the wire change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from services.core.addresses import domain_key
from services.core.outcome import Reply
from services.delivery.message_data import size_limit

# RFC 6531 3.2: a message whose envelope needs SMTPUTF8 cannot be downgraded in transit, so a
# server that does not offer it is a permanent failure for that message (Postfix does the same).
SMTPUTF8_NOT_OFFERED = Reply(
    553, "5.6.7", "The destination does not offer SMTPUTF8, required for a non-ASCII local part", "MAIL"
)
SMTPUTF8_HEADERS_NOT_OFFERED = Reply(
    553, "5.6.7", "The destination does not offer SMTPUTF8, required for UTF-8 header fields", "MAIL"
)


@dataclass(frozen=True, slots=True)
class WireEnvelope:
    sender: str
    # Parallel to the transaction's recipients: each one as it goes into RCPT TO.
    recipients: tuple[str, ...]
    options: list[str]
    encoding: str


def ascii_form(address: str) -> str | None:
    """The address with an internationalised domain in A-labels; None when it has no ASCII
    form (a non-ASCII local part, or a domain IDNA refuses)."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    converted = f"{local}@{domain_key(domain)}"
    return converted if converted.isascii() else None


def size_exceeded(size: int, limit: int, server: str) -> Reply:
    """RFC 1870 6.1: a message over the server's declared limit is not sent there. Postfix
    bounces it (not deferred, and no other MX tried), in these words; `server` is host[address]."""
    return Reply(552, "5.3.4", f"message size {size} exceeds size limit {limit} of server {server}", "MAIL")


def mail_parameters(
    smtp: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    *,
    size: int,
    server: str,
    smtputf8: bool = False,
) -> WireEnvelope | Reply:
    """The envelope as this server is to get it, or the reply that refuses the transaction:
    SIZE=`size` (the message's octets, RFC 1870) when the server offers SIZE, refused when that
    is over its non-zero limit; SMTPUTF8 when the server offers it and an address is non-ASCII,
    or the sender submitted with SMTPUTF8 (`smtputf8`) and a header field is, A-label domains
    when it does not; BODY=8BITMIME when the body has 8-bit octets and the server offers it
    (without it the body goes as it is, as Postfix does with MIME conversion off; the ingress
    only takes 8-bit mail declared as such)."""
    options: list[str] = []
    limit = size_limit(smtp)
    if limit is not None:
        if 0 < limit < size:
            return size_exceeded(size, limit, server)
        options.append(f"SIZE={size}")
    if not body.isascii() and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    utf8_header = smtputf8 and not _header(body).isascii()
    if sender.isascii() and all(r.isascii() for r in recipients) and not utf8_header:
        return WireEnvelope(sender, tuple(recipients), options, "ascii")
    if smtp.supports_extension("smtputf8"):
        return WireEnvelope(sender, tuple(recipients), ["SMTPUTF8", *options], "utf-8")
    if utf8_header:
        return SMTPUTF8_HEADERS_NOT_OFFERED
    wire_sender = ascii_form(sender)
    wire_recipients = [ascii_form(r) for r in recipients]
    if wire_sender is None or None in wire_recipients:
        return SMTPUTF8_NOT_OFFERED
    return WireEnvelope(wire_sender, tuple(r for r in wire_recipients if r is not None), options, "ascii")


def _header(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end]
