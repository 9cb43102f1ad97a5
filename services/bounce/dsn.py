"""RFC 3464 delivery status notifications, built as bytes with no I/O.

The DSN is written directly rather than through ``email.message`` so that every byte is under our
control: CRLF everywhere, no line over 998 octets, each delivery-status field but free text on
one line (as line-by-line bounce readers expect), and a 7-bit body that any next hop accepts
without 8BITMIME. The one exception is an envelope sender with a non-ASCII local part in ``To:``:
such a DSN can only be delivered over SMTPUTF8 (its RCPT TO has no ASCII form either), so the
header carries the UTF-8 address as RFC 6532 allows. A sender whose domain alone is non-ASCII
gets it in A-labels, as delivery sends its RCPT TO to an MX without SMTPUTF8.

Third part, in order of preference:

* ``original_message`` given (RET=FULL), 7-bit clean and at most ``MAX_RETURNED`` octets:
  ``message/rfc822``, verbatim.
* otherwise ``text/rfc822-headers``: 7bit when the header block is ASCII with short lines, else
  base64. ``message/rfc822`` may not be base64-encoded (RFC 2046 section 5.2.1), so an 8-bit
  original is returned as headers only, the same downgrade MTAs make for oversized returns; the
  notification text says so.
"""

import base64
import email.message
import hashlib
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from services.core.addresses import domain_key
from services.core.outcome import LOCAL_STAGES

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_DELIVERED = "Successful Mail Delivery Report"

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})

# Diagnostic-Code types (RFC 3464 section 2.3.6): "smtp" says an SMTP server gave the reply, so a
# reply Relais made itself (null MX, DNS, suppression, expiry) carries Relais' own type, as
# Postfix writes "X-Postfix" for its own.
DIAGNOSTIC_SMTP = "smtp"
DIAGNOSTIC_LOCAL = "x-relais"

_CRLF = b"\r\n"
_MAX_LINE = 998
_FOLD_WIDTH = 78
# The delivery-status fields folded to _FOLD_WIDTH: free text, whose continuation lines bounce
# processors join. The others (addresses, hosts, dates, the envelope id) are folded only past
# _MAX_LINE, as Postfix, Exim and Sendmail write them: readers that go line by line (Sisimai, the
# common open-source one) take "Final-Recipient: rfc822; <address>" from that one line, and a fold
# after "rfc822;" left them a DSN naming no recipient.
_FOLDED_FIELDS = frozenset({"Diagnostic-Code"})
_TEXT_WIDTH = 76
# The largest original a RET=FULL DSN returns whole (Postfix's bounce_size_limit): a larger one
# is returned as its headers, as Postfix does. A DSN is never bounced, so one the sender's MX
# refuses for its size is lost; and the largest message accepted would make a 50 MiB DSN.
MAX_RETURNED = 50_000
_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_DIAGNOSTIC_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
# "rfc822; bob@x", "dns;mx.example": the value already names its type (RFC 3464 section 2.1.2).
_TYPED_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*[ \t]*;")
_NEWLINE_RE = re.compile(rb"\r\n|\r|\n")
# utf-8-addr-xtext QCHARs (RFC 6533 section 3); anything else becomes \x{HEX}.
_QCHAR_RE = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """The outcome for one recipient, as reported in one per-recipient block."""

    final_recipient: str
    action: str
    status: str
    diagnostic_code: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    last_attempt: datetime | None = None
    will_retry_until: datetime | None = None
    diagnostic_type: str = DIAGNOSTIC_SMTP

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {sorted(ACTIONS)}, not {self.action!r}")
        if not _STATUS_RE.fullmatch(self.status):
            raise ValueError(f"status must be an enhanced status code like 5.1.1, not {self.status!r}")
        if self.will_retry_until is not None and self.action != "delayed":
            raise ValueError("will_retry_until only makes sense for action 'delayed'")
        if not _DIAGNOSTIC_TYPE_RE.fullmatch(self.diagnostic_type):
            raise ValueError(f"diagnostic_type must be an atom like 'smtp', not {self.diagnostic_type!r}")
        _single_line("final_recipient", self.final_recipient, required=True)
        _single_line("remote_mta", self.remote_mta)
        _single_line("original_recipient", self.original_recipient)
        for when in (self.last_attempt, self.will_retry_until):
            if when is not None:
                _date(when)


def diagnostic_type(command: str) -> str:
    """The Diagnostic-Code type of a reply drawn at `command` (`Reply.command`)."""
    return DIAGNOSTIC_LOCAL if command.upper() in LOCAL_STAGES else DIAGNOSTIC_SMTP


def build_dsn(
    *,
    reporting_mta: str,
    from_address: str,
    to_address: str,
    original_headers: bytes,
    recipients: Sequence[RecipientStatus],
    arrival_date: datetime,
    envelope_id: str | None = None,
    original_message: bytes | None = None,
    oversized_original: int = 0,
    message_id: str,
    date: datetime | None = None,
) -> bytes:
    """Return a complete multipart/report DSN, ready to submit with a null reverse-path.

    ``reporting_mta`` and each ``remote_mta`` are host names (or already typed "dns; host").
    ``original_headers`` may be the whole message: only the block before the first blank line
    is used. ``oversized_original``: the size of an original RET=FULL asked for, over
    ``MAX_RETURNED``, of which only the headers were read (a caller need not fetch a message
    that cannot go back whole); it is returned as its headers, as that ``original_message`` would
    be. Raises ValueError for input that would yield an invalid or injectable message.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    # A null reverse-path means "never bounce this" (RFC 5321 section 4.5.5).
    _single_line("to_address", to_address, required=True)
    if to_address.strip("<> ") == "":
        raise ValueError("no DSN may be sent to a null reverse-path")
    _single_line("reporting_mta", reporting_mta, required=True)
    _single_line("from_address", from_address, required=True)
    _single_line("envelope_id", envelope_id)
    _single_line("message_id", message_id, required=True)
    if not (message_id.startswith("<") and message_id.endswith(">")):
        raise ValueError("message_id must be enclosed in angle brackets")
    when = date if date is not None else datetime.now(UTC)

    headers_only = _why_headers_only(original_message, oversized_original)
    returned_full = original_message is not None and not headers_only
    # Nothing of the message is left when its body went by TTL: the third part is optional
    # (RFC 3464 section 2), and an empty one would claim headers that are not there.
    returned = original_message is not None or bool(_header_block(original_headers).strip())
    parts = [
        _part(
            ["Content-Description: Notification", "Content-Type: text/plain; charset=us-ascii"],
            _notification(
                reporting_mta, recipients, arrival_date, when, returned_full, headers_only, returned=returned
            ),
        ),
        _part(
            ["Content-Description: Delivery report", "Content-Type: message/delivery-status"],
            _delivery_status(reporting_mta, recipients, arrival_date, envelope_id),
        ),
    ]
    if returned:
        parts.append(_returned_part(original_headers, original_message if returned_full else None))
    boundary = _boundary(message_id, parts)

    headers = [
        f"From: Mail Delivery System <{from_address}>",
        f"To: {_header_address(to_address.strip('<>'))}",
        f"Subject: {_subject(recipients)}",
        f"Date: {_date(when)}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        # RFC 3834: keeps vacation responders and other robots from answering the DSN.
        "Auto-Submitted: auto-replied",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    out = bytearray(_lines(headers) + _CRLF)
    out += b"This is a MIME-encapsulated message." + _CRLF
    for part in parts:
        out += _CRLF + b"--" + boundary.encode() + _CRLF + part
    out += _CRLF + b"--" + boundary.encode() + b"--" + _CRLF
    return bytes(out)


def is_report(headers: Mapping[str, str] | email.message.Message) -> bool:
    """True when the message is itself a delivery status report (RFC 3464) or an MDN
    (report-type=disposition-notification): no DSN is sent about it (RFC 3461 section 6.2).

    Auto-Submitted does not count. RFC 3834 keeps automatic *responses* from answering it; a
    DSN is not one, and transactional mail marked auto-generated relies on DSNs to its return
    path. Loops are stopped by the null reverse-path, which every DSN has and which gets none.
    """
    if isinstance(headers, email.message.Message):
        msg = headers
    else:
        msg = email.message.Message()
        for name, value in headers.items():
            msg[name] = value
    if msg.get_content_type() != "multipart/report":
        return False
    report_type = msg.get_param("report-type", "", header="content-type")
    return str(report_type).lower() in {"delivery-status", "disposition-notification"}


def _subject(recipients: Sequence[RecipientStatus]) -> str:
    actions = {r.action for r in recipients}
    if "failed" in actions:
        return SUBJECT_FAILED
    if "delayed" in actions:
        return SUBJECT_DELAYED
    return SUBJECT_DELIVERED


def _notification(
    reporting_mta: str,
    recipients: Sequence[RecipientStatus],
    arrival_date: datetime,
    when: datetime,
    returned_full: bool,
    headers_only: str,
    *,
    returned: bool,
) -> bytes:
    host = _untyped(reporting_mta)
    actions = {r.action for r in recipients}
    paras = [f"This is the mail system at host {host}."]
    if "failed" in actions:
        if not returned:
            attached = "It is no longer held here, so none of it is attached."
        else:
            attached = "It's attached below." if returned_full else "Its headers are attached below."
        paras.append(
            "I'm sorry to have to inform you that your message could not be delivered to one or "
            f"more recipients. {attached}"
        )
        paras.append("For further assistance, please send mail to postmaster.")
        advice = "If you do so, please include this problem report."
        if returned:
            advice += " You can delete your own text from the attached returned message."
        paras.append(advice)
    elif "delayed" in actions:
        banner = "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #"
        paras.append("\n".join(["#" * len(banner), banner, "#" * len(banner)]))
        hours = max((when - arrival_date).total_seconds() / 3600, 0.0)
        paras.append(
            f"Your message could not be delivered for {hours:.1f} hours. It will be retried "
            "until the time shown for each recipient below."
        )
    else:
        paras.append("Your message was delivered to, or passed on for, the recipients listed below.")
    if headers_only:
        paras.append(headers_only)
    paras.append("The mail system".rjust(34))

    groups = (
        ("failed", "Delivery to the following recipients failed permanently:"),
        ("delayed", "Delivery to the following recipients has been delayed:"),
        ("delivered", "Delivery to the following recipients succeeded:"),
        ("relayed", "The following recipients were relayed to a system that does not send DSNs:"),
        ("expanded", "The following recipients were expanded to a list or alias:"),
    )
    text: list[str] = []
    for para in paras:
        text.extend(_wrap(para, indent=""))
        text.append("")
    for action, heading in groups:
        explained = [_explain(r) for r in recipients if r.action == action]
        if explained:
            text.extend([heading, ""])
            for line in explained:
                # Postfix's hanging indent: each recipient stands out from its wrapped reason.
                text.extend(_wrap(line, indent="    "))
                text.append("")
    return _lines(text[:-1])


def _why_headers_only(original_message: bytes | None, oversized: int = 0) -> str:
    """Why a RET=FULL original goes back as its headers only; '' when it goes whole (or no
    whole message was asked for)."""
    if original_message is None and not oversized:
        return ""
    if max(len(original_message or b""), oversized) > MAX_RETURNED:
        why = f"is larger than {MAX_RETURNED} octets"
    elif not _is_7bit(_normalise(original_message or b"")):
        why = "contains 8-bit data or over-long lines"
    else:
        return ""
    return f"The original message {why}, so only its headers are returned."


def _wrap(para: str, *, indent: str) -> list[str]:
    out: list[str] = []
    for line in _printable(para).split("\n"):
        if len(line) <= _TEXT_WIDTH:
            out.append(line)
        else:
            out.extend(textwrap.wrap(line, _TEXT_WIDTH, subsequent_indent=indent, break_on_hyphens=False))
    return out


def _explain(r: RecipientStatus) -> str:
    who = f"<{r.final_recipient}>"
    diag = _ascii(r.diagnostic_code) if r.diagnostic_code else None
    host = _untyped(r.remote_mta) if r.remote_mta else None
    if diag and host and r.diagnostic_type == DIAGNOSTIC_SMTP:
        why = f"host {host} said: {diag}"
    elif diag and host:
        # Relais' own verdict (an expiry): the host only gave the "last reply" inside it.
        why = f"{diag} (last tried: host {host})"
    elif diag:
        why = diag
    else:
        why = f"{r.action} (status {r.status})"
    if r.will_retry_until is not None:
        why += f" (will be retried until {_date(r.will_retry_until)})"
    return f"{who}: {why}"


def _delivery_status(
    reporting_mta: str,
    recipients: Sequence[RecipientStatus],
    arrival_date: datetime,
    envelope_id: str | None,
) -> bytes:
    # RFC 3464 section 2.2's order: original-envelope-id first, then reporting-mta.
    fields: list[tuple[str, str]] = []
    if envelope_id is not None:
        fields.append(("Original-Envelope-Id", _ascii(envelope_id)))
    fields.append(("Reporting-MTA", _typed(reporting_mta, "dns")))
    fields.append(("Arrival-Date", _date(arrival_date)))
    blocks = [fields]
    for r in recipients:
        block: list[tuple[str, str]] = []
        if r.original_recipient is not None:
            block.append(("Original-Recipient", _recipient(r.original_recipient)))
        block.append(("Final-Recipient", _recipient(r.final_recipient)))
        block.append(("Action", r.action))
        block.append(("Status", r.status))
        if r.remote_mta is not None:
            block.append(("Remote-MTA", _typed(r.remote_mta, "dns")))
        if r.diagnostic_code is not None:
            block.append(("Diagnostic-Code", f"{r.diagnostic_type}; {_ascii(r.diagnostic_code)}"))
        if r.last_attempt is not None:
            block.append(("Last-Attempt-Date", _date(r.last_attempt)))
        if r.will_retry_until is not None:
            block.append(("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append(block)
    # Blocks are separated by one blank line; the part ends after the last block's CRLF.
    return _CRLF.join(
        _lines(
            line
            for name, value in b
            for line in _fold(name, value, width=_FOLD_WIDTH if name in _FOLDED_FIELDS else _MAX_LINE)
        )
        for b in blocks
    )


def _returned_part(original_headers: bytes, full_message: bytes | None) -> bytes:
    if full_message is not None:
        return _part(
            ["Content-Description: Original message", "Content-Type: message/rfc822"],
            _with_final_crlf(_normalise(full_message)),
        )
    header_block = _header_block(original_headers)
    if _is_7bit(header_block):
        return _part(
            ["Content-Description: Original message headers", "Content-Type: text/rfc822-headers"],
            header_block,
        )
    try:
        header_block.decode("utf-8")
        content_type = 'Content-Type: text/rfc822-headers; charset="utf-8"'
    except UnicodeDecodeError:
        # Unlabelled 8-bit bytes: naming a charset we cannot know would be a lie, and
        # "unknown-8bit" makes Python's get_content() raise LookupError.
        content_type = "Content-Type: text/rfc822-headers"
    encoded = base64.encodebytes(header_block).replace(b"\n", _CRLF)
    return _part(
        ["Content-Description: Original message headers", content_type, "Content-Transfer-Encoding: base64"],
        encoded,
    )


def _part(headers: list[str], body: bytes) -> bytes:
    """One body part: its headers, a blank line, then the body (which ends in CRLF or is empty)."""
    return _lines(headers) + _CRLF + body


def _boundary(message_id: str, parts: Sequence[bytes]) -> str:
    # Derived from the content so output is reproducible; rehash in the (astronomically unlikely)
    # case the boundary occurs inside a part.
    seed = hashlib.sha256(message_id.encode("utf-8") + b"".join(parts))
    while True:
        boundary = f"relais-dsn-{seed.hexdigest()[:24]}"
        if not any(boundary.encode() in part for part in parts):
            return boundary
        seed.update(b"again")


def _header_block(raw: bytes) -> bytes:
    data = _normalise(raw)
    if data.startswith(_CRLF):
        return b""
    end = data.find(_CRLF + _CRLF)
    return _with_final_crlf(data if end < 0 else data[:end])


def _normalise(data: bytes) -> bytes:
    """Every line ending becomes CRLF: stray bare CR or LF must not reach the wire."""
    return _NEWLINE_RE.sub(_CRLF, data)


def _with_final_crlf(data: bytes) -> bytes:
    return data if not data or data.endswith(_CRLF) else data + _CRLF


def _is_7bit(data: bytes) -> bool:
    """RFC 2045 7bit: ASCII, no NUL, lines of at most 998 octets (CRLF already normalised)."""
    if not data.isascii() or b"\0" in data:
        return False
    return all(len(line) <= _MAX_LINE for line in data.split(_CRLF))


def _header_address(address: str) -> str:
    """The address for ``To:``: an internationalised domain in A-labels when the local part is
    ASCII, since delivery may then send the DSN without SMTPUTF8, where a UTF-8 field must not go
    (RFC 6532). A non-ASCII local part stays: its RCPT TO needs SMTPUTF8 anyway."""
    local, at, domain = address.rpartition("@")
    if address.isascii() or not at or not local.isascii():
        return address
    return f"{local}@{domain_key(domain)}"


def _recipient(address: str) -> str:
    if _TYPED_RE.match(address):
        addr_type, _, addr = address.partition(";")
        addr_type, addr = addr_type.strip(), addr.strip()
    else:
        addr_type, addr = ("rfc822", address) if address.isascii() else ("utf-8", address)
    return f"{addr_type}; {addr if addr.isascii() else _xtext(addr)}"


def _xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: an ASCII-only spelling of a non-ASCII address."""
    return "".join(ch if _QCHAR_RE.fullmatch(ch) else f"\\x{{{ord(ch):X}}}" for ch in address)


def _typed(value: str, default_type: str) -> str:
    if _TYPED_RE.match(value):
        addr_type, _, rest = value.partition(";")
        return f"{addr_type.strip()}; {_ascii(rest.strip())}"
    return f"{default_type}; {_ascii(value)}"


def _untyped(value: str) -> str:
    return value.partition(";")[2].strip() if _TYPED_RE.match(value) else value


def _ascii(text: str) -> str:
    """One line of printable ASCII: multi-line SMTP replies are joined with single spaces, as
    Postfix does, and anything else non-printable is escaped so nothing is silently lost."""
    return _printable(" ".join(text.split()))


def _printable(text: str) -> str:
    return "".join(
        ch if ch == "\n" or " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _fold(name: str, value: str, *, width: int = _FOLD_WIDTH) -> list[str]:
    """Fold ``name: value`` at spaces so lines stay near ``width`` and never exceed 998 octets.

    Unfolding restores the value exactly, except that a single word longer than a whole line
    must be split and reads back with a space inside it.
    """
    # Room for "Name: " on the first line; continuation lines only need their leading space.
    limit = _MAX_LINE - len(name) - 2
    words: list[str] = []
    for word in value.split(" "):
        words.extend([word[i : i + limit] for i in range(0, len(word), limit)] or [""])
    lines = [f"{name}:"]
    started = False
    for word in words:
        if started and word and len(lines[-1]) + 1 + len(word) > width:
            lines.append(f" {word}")
        else:
            lines[-1] += f" {word}"
        started = True
    return lines


def _lines(lines: Iterable[str]) -> bytes:
    """Join already-ASCII lines (UTF-8 only for an SMTPUTF8 To:) with CRLF after each."""
    return b"".join(line.encode("utf-8") + _CRLF for line in lines)


def _date(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("DSN dates must be timezone-aware")
    return format_datetime(when)


def _single_line(name: str, value: str | None, *, required: bool = False) -> None:
    """Reject values that would inject header lines or MIME structure."""
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    if required and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"{name} must be a single line")
