"""Read an incoming bounce: which recipients failed, how, and into which category. No I/O.

Standard RFC 3464 DSNs are read field by field. Everything else (the many MTAs that write prose)
goes to flufl.bounce's detectors for the addresses; the category then comes from the reply
text found next to each address, through the same classifier as synchronous failures.
"""

from __future__ import annotations

import binascii
import email
import email.message
import io
import quopri
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.header import Header, decode_header
from email.message import Message

from flufl.bounce._detectors.llnl import LLNL
from flufl.bounce._scan import _DETECTORS as FLUFL_DETECTORS

from services.bounce.classify import DEFAULT_RULES, BounceCategory, BounceRule, classify

# A reply code and enhanced status somewhere in prose: "550 5.1.1", "said: 550-5.7.1", "#5.1.1".
# Not a part of a dotted number: "52.101.41.210" in Exim's host line is no reply code 210.
_REPLY_IN_TEXT = re.compile(r"(?<![\w.])([245]\d\d)(?!\w|\.\d)(?:[ -]+#?([245]\.\d{1,3}\.\d{1,3}))?\b")
# Address literals ("[2001:db8::250]", "[IPv6:...]", "[192.0.2.1]") hold no reply: left out.
_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:)?[0-9A-Fa-f:.]+\]")


def reply_in_text(text: str) -> re.Match[str] | None:
    """The first SMTP reply code (with its enhanced status, if any) in a bounce's prose."""
    return _REPLY_IN_TEXT.search(_ADDRESS_LITERAL.sub(" ", text))


# flufl.bounce's detectors in its order, but for its last, written for one laboratory's sendmail of
# 2001, whose only mark is a line holding ", <address>,". Any prose has such lines, an
# out-of-office reply's too ("this mailbox, jane@example.com, is no longer monitored"), and what it
# finds is a permanent failure: an automatic reply to the return path (RFC 3834) came out a
# bounce, and had the recipient suppressed when the words around read as a dead mailbox. flufl
# offers no public way to leave a detector out; constraints.txt pins it, and the tests name this one.
_DETECTORS = tuple(d for d in FLUFL_DETECTORS if d is not LLNL)


def _failures(msg: Message) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """flufl.bounce's `all_failures` without that detector: (temporary, permanent) as the first
    detector that names anyone reads them."""
    for detector in _DETECTORS:
        temporary, permanent = detector().process(msg)
        if temporary or permanent:
            return frozenset(temporary), frozenset(permanent)
    return frozenset(), frozenset()


_STATUS_IN_TEXT = re.compile(r"(?<![\d.])#?([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
# RFC 6533's message/global* types are what Postfix and Exim write for mail sent with SMTPUTF8.
_RETURNED = frozenset(
    {
        "message/rfc822",
        "text/rfc822-headers",
        "message/rfc822-headers",
        "message/global",
        "message/global-headers",
    }
)
# An RFC 5322 comment without nested ones: all a DSN field's value is seen to carry.
_COMMENT = re.compile(r"\([^()]*\)")
_DSN_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
# What only a delay warning says (Exim, Gmail, Exchange, sendmail, Symantec wordings): read in
# the report's own text, never in the returned message.
_DELAY_WARNING = re.compile(
    r"has not yet been delivered|delivery attempts will continue|this is (?:just )?a warning"
    r"|warning message only|has been delayed|has been postponed|advisory-only"
    r"|do not need to resend",
    re.IGNORECASE,
)
# Prose around an address that explains it: its own line and a few after (Exim, Postfix style).
_CONTEXT_LINES = 4
_MAX_TEXT = 20_000
# What one field of a report may carry on into an event. An SMTP reply runs to a few lines
# (Gmail's longest, about 300 characters); a crafted report can put megabytes in one field,
# and an event over NATS' max_payload was refused at every redelivery, for ever.
MAX_FIELD = 1_000


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    recipient: str
    permanent: bool
    category: BounceCategory
    status: str = ""
    diagnostic: str = ""
    remote_mta: str = ""
    # The other address the report names (Final-Recipient when `recipient` is the original).
    also_known_as: str = ""

    @property
    def code(self) -> int:
        match = reply_in_text(self.diagnostic)
        if match:
            return int(match.group(1))
        return 550 if self.permanent else 450


@dataclass(frozen=True, slots=True)
class ParsedBounce:
    # "dsn": an RFC 3464 report; "heuristic": prose read by flufl.bounce; "none": not a bounce.
    kind: str
    recipients: list[FailedRecipient] = field(default_factory=list)
    reporting_mta: str = ""
    # Headers of the returned message, when the bounce includes them.
    original: Message | None = None

    @property
    def permanent(self) -> list[FailedRecipient]:
        return [r for r in self.recipients if r.permanent]


# How much of a message sent to us is read. Anyone may send port 25 a message of
# max_message_size, and the cost is per line: the stdlib parser holds an object for each, and
# flufl.bounce runs each of its 50-odd patterns over every line of the whole message, returned
# copy included: 5 MB of empty lines took 200 MB and 35 s of CPU, so one of 50 MB would have
# the bounce pod (512 MiB) killed for memory, and be redelivered to the next, for ever. What a report
# says comes first (prose, delivery-status, the returned headers), so only the copy it returns
# is cut; a line over _MAX_LINE (RFC 5322 allows 998 octets) is cut alone, so the fields after
# it are still read.
_MAX_READ = 2 * 1024 * 1024
_MAX_LINES = 50_000
_MAX_LINE = 64 * 1024
_LONG_LINE = re.compile(rb"(?m)^([^\n]{%d})[^\n]+" % _MAX_LINE)
_FIRST_LINES = re.compile(rb"(?:[^\n]*\n){%d}" % _MAX_LINES)


def parse_message(raw: bytes) -> Message:
    """The message as far as it is read: see _MAX_READ."""
    head = _LONG_LINE.sub(rb"\1", raw)[:_MAX_READ]
    lines = _FIRST_LINES.match(head)
    return email.message_from_bytes(lines.group(0) if lines else head)


def parse_bounce(msg: Message, rules: Sequence[BounceRule] = DEFAULT_RULES) -> ParsedBounce:
    report = _delivery_status(msg)
    original = returned_message(msg)
    if report is not None:
        per_message, blocks = report
        recipients = [r for r in (_dsn_recipient(b, rules) for b in blocks) if r is not None]
        if recipients:
            return ParsedBounce("dsn", recipients, _untype(per_message.get("Reporting-MTA", "")), original)
    try:
        temporary, permanent = _failures(msg)
    except Exception:  # flufl's heuristics meet arbitrary mail; never let one crash the consumer
        temporary, permanent = set(), set()
    if not temporary and not permanent:
        return ParsedBounce("none", [], "", original)
    text = human_text(msg)
    if _DELAY_WARNING.search(" ".join(text.split())):
        # flufl's first detector to name an address wins, and its generic matcher comes before
        # its warning one: Exim's delay warning in prose came out as a failure. The message is
        # still being retried; what the warning says about it is no outcome.
        temporary, permanent = temporary | permanent, frozenset()
    hard = [_address(_decode(a)) for a in sorted(permanent)]
    soft = [_address(_decode(a)) for a in sorted(temporary - permanent)]
    recipients = [_heuristic_recipient(a, True, text, rules) for a in hard if a]
    recipients += [_heuristic_recipient(a, False, text, rules) for a in soft if a]
    if not recipients:
        return ParsedBounce("none", [], "", original)
    return ParsedBounce("heuristic", recipients, "", original)


def _decode(address: bytes | str) -> str:
    return address.decode("utf-8", "replace") if isinstance(address, bytes) else address


def _delivery_status(msg: Message) -> tuple[Message, list[Message]] | None:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype not in _DSN_TYPES:
            continue
        payload = part.get_payload()
        encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if (
            ctype == "message/delivery-status"
            and encoding in _IDENTITY_ENCODINGS
            and isinstance(payload, list)
            and payload
            and all(isinstance(p, Message) for p in payload)
        ):
            return payload[0], payload[1:]
        # Encoded, global (which the stdlib reads as one embedded message) or kept as text:
        # split the blocks ourselves.
        text = _part_text(part, encoding)
        blocks = [email.message_from_string(b.strip() + "\n") for b in re.split(r"\r?\n\s*\r?\n", text)]
        blocks = [b for b in blocks if len(b.keys())]
        if blocks:
            return blocks[0], blocks[1:]
    return None


def _part_text(part: Message, encoding: str) -> str:
    """A part's body as UTF-8 text. The stdlib parses a message/* body as header blocks or as
    an embedded message even when it is base64, so its octets are written back out first."""
    payload = part.get_payload()
    if isinstance(payload, list):
        out = io.BytesIO()
        for block in payload:
            if isinstance(block, Message):
                BytesGenerator(out, mangle_from_=False, maxheaderlen=0).flatten(block)
                out.write(b"\n")
        data = out.getvalue()
    else:
        data = str(payload or "").encode("utf-8", "surrogateescape")
    try:
        if encoding == "base64":
            data = binascii.a2b_base64(data)
        elif encoding == "quoted-printable":
            data = quopri.decodestring(data)
    except (binascii.Error, ValueError):
        pass  # read as it stands: a broken encoding yields no fields, not a crash
    return data.decode("utf-8", "replace")


def _dsn_recipient(block: Message, rules: Sequence[BounceRule]) -> FailedRecipient | None:
    # Original-Recipient is the address as it reached the reporting MTA, i.e. what we sent to;
    # Final-Recipient may be an alias it expanded to. Prefer the former, keep both.
    final = _address(block.get("Final-Recipient", ""))
    original = _address(block.get("Original-Recipient", ""))
    # A comment may follow the value, as in any structured field ("failed (Bad destination
    # mailbox address)"): without it, the Status and Diagnostic-Code were thrown away.
    action = " ".join(_COMMENT.sub(" ", str(block.get("Action", ""))).split()[:1]).lower()
    if not (final or original) or action not in ("failed", "delayed"):
        return None
    status = str(block.get("Status", "")).strip().split(" ")[0]
    diagnostic = " ".join(_untype(block.get("Diagnostic-Code", "")).split())
    enhanced = status if _STATUS_IN_TEXT.fullmatch(status) else None
    category = classify(None, enhanced, diagnostic, rules)
    # "failed" is final whatever the class: a 4.4.7 expiry is as over as a 5.1.1.
    permanent = action == "failed"
    return FailedRecipient(
        recipient=original or final,
        permanent=permanent,
        category=category,
        status=enhanced or "",
        diagnostic=diagnostic,
        remote_mta=_untype(block.get("Remote-MTA", "")),
        also_known_as=final if original and final.lower() != original.lower() else "",
    )


def _heuristic_recipient(
    address: str, permanent: bool, text: str, rules: Sequence[BounceRule]
) -> FailedRecipient:
    context = _context(text, address)
    category, _, enhanced = _classify_prose(context, rules)
    if category is BounceCategory.UNCATEGORIZED:
        category, _, enhanced = _classify_prose(text, rules)
    diagnostic = " ".join(context.split())[:500]
    return FailedRecipient(address, permanent, category, enhanced or "", diagnostic)


def _classify_prose(text: str, rules: Sequence[BounceRule]) -> tuple[BounceCategory, int | None, str | None]:
    flat = " ".join(text.split())[:_MAX_TEXT]
    reply = reply_in_text(flat)
    status = _STATUS_IN_TEXT.search(flat)
    code = int(reply.group(1)) if reply else None
    enhanced = (reply.group(2) if reply and reply.group(2) else None) or (status.group(1) if status else None)
    return classify(code, enhanced, flat, rules), code, enhanced


def _context(text: str, address: str) -> str:
    lines = text.splitlines()
    needle = address.lower()
    out: list[str] = []
    for i, line in enumerate(lines):
        if needle in line.lower():
            out.extend(lines[i : i + _CONTEXT_LINES])
    return "\n".join(out)


def human_text(msg: Message) -> str:
    """The bounce's own prose: text parts, never the returned original message."""
    chunks: list[str] = []
    for part in _walk_outside_returned(msg):
        if part.get_content_maintype() != "text" or part.get_content_type() == "text/rfc822-headers":
            continue
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            charset = part.get_content_charset() or "utf-8"
            try:
                chunks.append(data.decode(charset, "replace"))
            except (LookupError, UnicodeError):  # unknown, or a codec without "replace" (idna)
                chunks.append(data.decode("utf-8", "replace"))
    return "\n".join(chunks)[: _MAX_TEXT * 2]


def _walk_outside_returned(msg: Message) -> Iterator[Message]:
    yield msg
    if msg.get_content_type() in _RETURNED or msg.get_content_type() in _DSN_TYPES:
        return
    if msg.is_multipart():
        for sub in msg.get_payload():
            if isinstance(sub, Message):
                yield from _walk_outside_returned(sub)


def returned_message(msg: Message) -> Message | None:
    """The returned original (full message or its headers), when the report carries one."""
    return part_as_message(msg, _RETURNED)


def part_as_message(msg: Message, types: Collection[str]) -> Message | None:
    """The first part of one of these content types, read as a message (or a header block)."""
    for part in msg.walk():
        if part.get_content_type() not in types:
            continue
        # message/* parts come parsed as an embedded message; text/rfc822-headers as text.
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            return email.message_from_bytes(data.lstrip())
    return None


def header_text(value: object) -> str:
    """A header field's value as text. The parser keeps 8-bit octets (an address in raw UTF-8,
    as an MTA without RFC 6533 writes it) as surrogates, and hands such a value out as a Header
    whose str() replaces them: both are read as UTF-8 here. A surrogate passed on would make
    every later encode() raise."""
    if isinstance(value, Header):
        return b"".join(
            chunk if isinstance(chunk, bytes) else chunk.encode("utf-8", "surrogateescape")
            for chunk, _ in decode_header(value)
        ).decode("utf-8", "replace")
    return str(value or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _untype(value: object) -> str:
    """'smtp; 550 ...' -> '550 ...'; 'dns; mx.example' -> 'mx.example'. At most MAX_FIELD long."""
    text = " ".join(header_text(value).split())
    kind, sep, rest = text.partition(";")
    return (rest.strip() if sep and re.fullmatch(r"[A-Za-z0-9-]+", kind.strip()) else text)[:MAX_FIELD]


def _address(value: object) -> str:
    """A plausible mailbox or ''. Redacted ones ("david...@gmail.com") are not addresses."""
    text = _untype(value).strip().strip("<>").strip()
    local, at, domain = text.rpartition("@")
    if (
        not at
        or not local
        or not domain
        or " " in text
        or ".." in local
        or local[0] == "."
        or local[-1] == "."
    ):
        return ""
    return text
