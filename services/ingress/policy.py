"""Pure policy: facts in, verdict out. No sockets, no aiosmtpd: unit-testable in isolation.

A verdict of None means "accept"; otherwise it is the exact SMTP reply to send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.core.config import AccountConfig


@dataclass(frozen=True, slots=True)
class Verdict:
    code: int
    enhanced_status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced_status} {self.text}"


SENDER_NOT_OWNED = Verdict(553, "5.7.1", "Sender address not owned by the authenticated account")
SENDER_REQUIRED_AUTH = Verdict(530, "5.7.0", "Authentication required")
ACCOUNT_DISABLED = Verdict(535, "5.7.8", "Authentication credentials invalid")
BAD_RECIPIENT_SYNTAX = Verdict(501, "5.1.3", "Bad recipient address syntax")
RELAY_DENIED = Verdict(554, "5.7.1", "Relay access denied")
TOO_MANY_RECIPIENTS = Verdict(452, "4.5.3", "Too many recipients")
BARE_LINE_ENDING = Verdict(554, "5.6.0", "Message contains bare CR or LF line endings (see RFC 5321 2.3.8)")
NUL_BYTES = Verdict(554, "5.6.0", "Message contains NUL characters")
FROM_NOT_OWNED = Verdict(550, "5.7.1", "From: header domain not owned by the authenticated account")

# A conservative dot-atom domain: letters, digits, hyphens, at least two labels. IP literals,
# source routes, '%' and '!' routing tricks all fail this and are refused as relay attempts.
_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$", re.I)
_LOCAL = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]{1,64}$")
_HEADER_FROM = re.compile(rb"^From:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", re.I | re.M)
_ADDR_IN_HEADER = re.compile(rb"@([A-Za-z0-9.-]+)")


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def split_address(address: str) -> tuple[str, str] | None:
    """local and domain of a plain mailbox, or None for anything routing-tricky or malformed."""
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL.match(local) or ".." in local or local.startswith(".") or local.endswith("."):
        return None
    if "%" in local or "!" in local or not _DOMAIN.match(domain):
        return None
    return local, domain.lower()


def sender_verdict(account: AccountConfig | None, sender: str) -> Verdict | None:
    """MAIL FROM: the envelope sender must be in one of the account's domains (or the null sender)."""
    if account is None:
        return SENDER_REQUIRED_AUTH
    if account.disabled:
        return ACCOUNT_DISABLED
    if sender in ("", "<>"):
        return None
    parts = split_address(sender)
    if parts is None or not owns_domain(account, parts[1]):
        return SENDER_NOT_OWNED
    return None


def owns_domain(account: AccountConfig, domain: str) -> bool:
    domain = domain.lower().rstrip(".")
    return any(domain == d.lower() for d in account.domains)


def recipient_verdict(address: str, accepted_so_far: int, max_recipients: int) -> Verdict | None:
    if accepted_so_far >= max_recipients:
        return TOO_MANY_RECIPIENTS
    if address.startswith("@") or ":" in address:
        return RELAY_DENIED  # RFC 5321 source route
    if split_address(address) is None:
        if "%" in address or "!" in address or "[" in address:
            return RELAY_DENIED
        return BAD_RECIPIENT_SYNTAX
    return None


def content_verdict(data: bytes, bare_line_endings: str) -> Verdict | None:
    """Reject (or allow normalising) bare CR/LF: the root of SMTP smuggling; refuse NULs."""
    if b"\x00" in data:
        return NUL_BYTES
    if bare_line_endings == "reject" and has_bare_line_ending(data):
        return BARE_LINE_ENDING
    return None


def has_bare_line_ending(data: bytes) -> bool:
    return data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n")


def normalise_line_endings(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def from_header_domains(data: bytes) -> list[str]:
    match = _HEADER_FROM.search(header_block(data))
    if not match:
        return []
    return [d.decode("ascii", "replace").lower().rstrip(".") for d in _ADDR_IN_HEADER.findall(match.group(0))]


def from_header_verdict(account: AccountConfig, data: bytes) -> Verdict | None:
    domains = from_header_domains(data)
    if domains and all(owns_domain(account, d) for d in domains):
        return None
    return FROM_NOT_OWNED
