"""Pure policy: facts in, verdict out. No sockets, no aiosmtpd: unit-testable in isolation.

A verdict of None means "accept"; otherwise it is the exact SMTP reply to send (see replies.py).
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence

from services.core.addresses import domain_key, domain_of, printable_ascii
from services.core.config import AccountConfig, Config
from services.ingress import headers
from services.ingress.data import LineStats
from services.ingress.replies import (
    ACCOUNT_DISABLED,
    AUTH_REQUIRED,
    BAD_HELO,
    BAD_RECIPIENT_SYNTAX,
    BAD_SENDER_SYNTAX,
    BARE_LINE_ENDING,
    DUPLICATE_FIELD,
    FROM_NEEDS_SENDER,
    FROM_NOT_OWNED,
    HEADER_TOO_BIG,
    INSUFFICIENT_STORAGE,
    LINE_TOO_LONG,
    NEEDS_8BITMIME,
    NEEDS_SMTPUTF8,
    NUL_BYTES,
    POOL_NOT_ALLOWED,
    RELAY_DENIED,
    SENDER_HEADER_NOT_OWNED,
    SENDER_NOT_OWNED,
    TOO_MANY_HOPS,
    TOO_MANY_RECIPIENTS,
    Verdict,
)

MAX_LINE = 998  # octets, without CRLF (RFC 5322 2.1.1)
# Received: fields that make a message taken for a loop: Postfix's hopcount_limit.
# A loop (an MX that points back at a relay network, an auto-forward between two domains) would
# otherwise queue and deliver the same mail for ever.
MAX_HOPS = 50
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)

# A conservative dot-atom domain: letters, digits, hyphens, at least two labels, a top label
# that is not all digits (RFC 1123 2.1: else 10.0.0.10 would pass as a name). IP literals, with
# or without brackets, source routes, '%' and '!' routing tricks all fail this and are refused
# as relay attempts.
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?=[0-9-]*[a-z])[a-z0-9-]{2,63}$", re.I
)
_LOCAL = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]{1,64}$")
# The same, but also non-ASCII (RFC 6531) for SMTPUTF8 transactions; still no routing characters.
# Surrogates are left out: they are how undecodable octets arrive (surrogateescape), not UTF-8.
_LOCAL_UTF8 = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.\u0080-\ud7ff\ue000-\U0010ffff-]{1,64}$")
# Everything after an "@" up to a delimiter, non-ASCII included: a scan that stopped at the
# first non-ASCII character would see "ours.test" in "ceo@ours.testévil.example".
_ADDR_IN_HEADER = re.compile(r'@([^\s<>()\[\],;:"@\\]+)')
_CONTROL_VALUE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SINGLE_FIELDS = frozenset(name.lower() for name in headers.SINGLE_FIELDS)


def split_address(address: str, *, utf8: bool = False) -> tuple[str, str] | None:
    """local and domain of a plain mailbox, or None for anything routing-tricky or malformed.

    Quoted local parts, source routes, '%' and '!' hacks and IP literals are all refused: a
    relay must never be talked into a second hop it did not choose.
    """
    local, at, domain = address.rpartition("@")
    local_re = _LOCAL_UTF8 if utf8 else _LOCAL
    if not at or not local_re.match(local) or ".." in local or local.startswith(".") or local.endswith("."):
        return None
    if "%" in local or "!" in local:
        return None
    if utf8 and not domain.isascii():
        # IDNA 2008, as everything else reads it (`domain_key`): Python's own codec is IDNA 2003,
        # which made faß.test fass.test, so the owner of fass.test could send as another domain.
        domain = domain_key(domain) + ("." if domain.endswith(".") else "")
        if not domain.isascii():
            return None  # a name IDNA refuses
    if not _DOMAIN.match(domain):
        return None
    return local, domain.lower()


def owns_domain(account: AccountConfig, domain: str) -> bool:
    domain = domain_key(domain)
    return any(domain == domain_key(d) for d in account.domains)


def is_local_domain(domain: str, local_domains: Iterable[str]) -> bool:
    """A listed domain or a name below it (bounce addresses often use a per-tenant subdomain)."""
    domain = domain.lower().rstrip(".")
    return any(domain == d.lower() or domain.endswith("." + d.lower()) for d in local_domains)


def local_domains(config: Config) -> list[str]:
    """ingress.local_domains plus the bounce return-path domain: the inbound listener's domains."""
    domains = list(config.ingress.local_domains)
    return_path = getattr(config.bounce, "return_path_domain", "")
    if return_path and return_path not in domains:
        domains.append(return_path)
    return domains


def in_networks(ip: str, networks: Iterable[str]) -> bool:
    try:
        addr = _address(ip)
    except ValueError:
        return False
    return any(addr in _network(net) for net in networks)


@functools.lru_cache(maxsize=1024)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # Asked at MAIL and at DATA of every message, mostly by the same few clients.
    return ipaddress.ip_address(ip)


@functools.lru_cache(maxsize=256)
def _network(net: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # Asked at MAIL and at DATA of every relay-networks message; the configured list is small.
    return ipaddress.ip_network(net, strict=False)


def helo_verdict(name: str) -> Verdict | None:
    """HELO/EHLO: the name goes into our Received: header verbatim, so it must be printable
    ASCII. A CR, a NUL or an undecodable octet there would smuggle a header past the checks
    DATA makes, which run on the message as sent, before the Received: line is added."""
    return None if printable_ascii(name) else BAD_HELO


def sender_verdict(account: AccountConfig | None, sender: str, *, smtputf8: bool = False) -> Verdict | None:
    """MAIL FROM: the envelope sender must be in one of the account's domains (or the null sender)."""
    if account is None:
        return AUTH_REQUIRED
    if account.disabled:
        return ACCOUNT_DISABLED
    if sender in ("", "<>"):
        return None
    if not sender.isascii() and not smtputf8:
        return NEEDS_SMTPUTF8
    parts = split_address(sender, utf8=smtputf8)
    if parts is None:
        return BAD_SENDER_SYNTAX
    if not owns_domain(account, parts[1]):
        return SENDER_NOT_OWNED
    return None


def inbound_sender_verdict(sender: str, *, smtputf8: bool = False) -> Verdict | None:
    """MAIL FROM on the inbound listener: anyone may write to Relais' own domains."""
    if sender in ("", "<>"):
        return None
    if not sender.isascii() and not smtputf8:
        return NEEDS_SMTPUTF8
    return None if split_address(sender, utf8=smtputf8) else BAD_SENDER_SYNTAX


def storage_verdict(mail_options: Sequence[str], free: int | None) -> Verdict | None:
    """At MAIL, as Postfix checks its queue space: a message declared (SIZE=, RFC 1870) larger
    than the DATA budget's free room now is refused before it is sent. `free` None: no budget.
    Over max_message_size, aiosmtpd has answered 552 5.3.4 before asking."""
    if free is None:
        return None
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit() and int(value) > free:
            return INSUFFICIENT_STORAGE
    return None


def recipient_verdict(
    address: str, accepted_so_far: int, max_recipients: int, *, smtputf8: bool = False
) -> Verdict | None:
    if address.startswith("@") or ":" in address:
        return RELAY_DENIED  # RFC 5321 source route
    if not address.isascii() and not smtputf8:
        return NEEDS_SMTPUTF8
    if split_address(address, utf8=smtputf8) is None:
        if "%" in address or "!" in address or "[" in address or '"' in address:
            return RELAY_DENIED
        return BAD_RECIPIENT_SYNTAX
    if accepted_so_far >= max_recipients:
        return TOO_MANY_RECIPIENTS
    return None


def local_postmaster(address: str, local_domains: Sequence[str]) -> str:
    """`RCPT TO:<postmaster>` names this server's postmaster and must be accepted without a
    domain (RFC 5321 §4.5.1); it is taken as postmaster@ our first domain. Any other address is
    returned as given."""
    if address.lower() == "postmaster" and local_domains:
        return f"postmaster@{local_domains[0]}"
    return address


def inbound_recipient_verdict(
    address: str,
    accepted_so_far: int,
    max_recipients: int,
    local_domains: Iterable[str],
    *,
    smtputf8: bool = False,
) -> Verdict | None:
    """RCPT TO without AUTH: only Relais' own domains; anything else is a relay attempt."""
    verdict = recipient_verdict(address, accepted_so_far, max_recipients, smtputf8=smtputf8)
    if verdict:
        return verdict
    if not is_local_domain(domain_of(address), local_domains):
        return RELAY_DENIED
    return None


def content_verdict(
    data: bytes,
    bare_line_endings: str,
    *,
    eight_bit_declared: bool = True,
    max_header_size: int = 0,
    lines: LineStats | None = None,
) -> Verdict | None:
    """Reject (or allow normalising) bare CR/LF: the root of SMTP smuggling; refuse NULs, lines
    over 998 octets, undeclared 8-bit data and oversized header blocks.

    `lines`: what the DATA reader saw (`read_data`). With it, the message is not split again to
    measure its lines unless one may exceed 998 octets, nor searched for CRLFs: measuring twice
    was about 10% of the ingress's CPU for 50 KB messages."""
    if b"\x00" in data:
        return NUL_BYTES
    if bare_line_endings == "reject" and has_bare_line_ending(data, None if lines is None else lines.crlf):
        return BARE_LINE_ENDING
    if (lines is None or lines.longest > MAX_LINE) and has_long_line(data):
        return LINE_TOO_LONG
    if not eight_bit_declared and not data.isascii():
        return NEEDS_8BITMIME
    if max_header_size and len(headers.split_message(data)[0]) > max_header_size:
        return HEADER_TOO_BIG
    return None


def hop_verdict(header_block: bytes) -> Verdict | None:
    """Refuse a message with MAX_HOPS or more Received: fields. `header_block` is split from
    CRLF-terminated data (after normalising): with bare line endings the header's end is not
    found, and a body's lines would be counted."""
    if len(_RECEIVED.findall(header_block)) >= MAX_HOPS:
        return TOO_MANY_HOPS
    return None


def has_long_line(data: bytes) -> bool:
    # Splitting runs in C; a regex scan for 999 non-newline octets costs O(size x line length).
    if len(data) <= MAX_LINE:
        return False
    return max(map(len, data.replace(b"\r", b"\n").split(b"\n"))) > MAX_LINE


def has_bare_line_ending(data: bytes, crlf: int | None = None) -> bool:
    """Whether a CR or LF is not part of a CRLF. `crlf`: the number of CRLFs, when known."""
    # Single-byte counts are cheap; the CRLF count (a two-octet search, three times slower) only
    # runs when it is not known and the CR and LF counts agree.
    lf = data.count(b"\n")
    if lf != data.count(b"\r"):
        return True
    return lf != (data.count(b"\r\n") if crlf is None else crlf)


def header_block(data: bytes) -> bytes:
    return headers.split_message(data)[0]


def from_header_domains(message: bytes | headers.HeaderBlock, field: str = "from") -> list[str]:
    """Domains in the From: header(s) of a message (or of its already parsed header block), or
    in another address field (`field`, e.g. "sender").

    Every such field counts, each read twice: as a mail reader parses it (comments dropped, so
    `ceo@(x@ours.example)bank.example` is at bank.example) and as a plain scan for `@domain`. An
    account must own all of them, so neither reading can hide a foreign domain from the other.
    The parsed mailboxes come first; one without a domain gives "", which nobody owns.
    """
    block = (
        message if isinstance(message, headers.HeaderBlock) else headers.HeaderBlock(header_block(message))
    )
    parsed: list[str] = []
    scanned: list[str] = []
    for value in block.every(field):
        parsed += [
            a.rpartition("@")[2] if "@" in a else "" for _, a in email.utils.getaddresses([value]) if a
        ]
        scanned += _ADDR_IN_HEADER.findall(value)
    found: dict[str, None] = {}
    for domain in parsed + scanned:
        found.setdefault(domain_key(domain), None)
    return list(found)


def from_header_verdict(account: AccountConfig, message: bytes | headers.HeaderBlock) -> Verdict | None:
    """A From: the account owns, and a Sender: it owns when there is one. Sender: names who sent
    the message on the author's behalf, and mail readers show it ("ceo@bank.example on behalf of
    news@acme.test"), so it is sending as that domain as much as From: is."""
    domains = from_header_domains(message)
    if not domains or not all(owns_domain(account, d) for d in domains):
        return FROM_NOT_OWNED
    if not all(owns_domain(account, d) for d in from_header_domains(message, "sender")):
        return SENDER_HEADER_NOT_OWNED
    return None


def header_fields_verdict(block: headers.HeaderBlock) -> Verdict | None:
    """A field RFC 5322 3.6 allows once (`headers.SINGLE_FIELDS`) given twice, or a From: of
    several mailboxes without the Sender: RFC 5322 3.6.2 then requires. Gmail and Amazon SES
    refuse such mail; refused here, the sender learns it at once rather than from a bounce that
    also suppresses a valid mailbox and costs the shared IPs reputation."""
    repeated = block.repeated(_SINGLE_FIELDS)
    if repeated:
        return DUPLICATE_FIELD[repeated]
    if "sender" not in block.names:
        author = block.first("from")
        # Parsed only when it may hold two mailboxes (a comma, two "@"): 10 µs, not 0.1. A part
        # without "@" is not counted: a lenient client's encoded-word may hold a comma.
        if author and author.count("@") > 1 and "," in author and _mailboxes(author) > 1:
            return FROM_NEEDS_SENDER
    return None


def _mailboxes(value: str) -> int:
    return sum("@" in address for _, address in email.utils.getaddresses([value]))


def pool_verdict(requested: str, account: AccountConfig, configured_pools: Iterable[str]) -> Verdict | None:
    """X-Relais-Pool: honoured only for the account's own pool(s) that exist in this cluster."""
    allowed = {account.pool, *account.pools}
    if requested not in allowed or requested not in set(configured_pools):
        return POOL_NOT_ALLOWED
    return None


def control_value(value: str | None) -> str:
    """A control header value fit for the envelope and metric labels, or "" when unusable."""
    value = (value or "").strip()
    return value if _CONTROL_VALUE.match(value) else ""
