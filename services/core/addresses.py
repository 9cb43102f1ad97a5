"""Mail addresses and the names in them, as both SMTP sides and the router compare them.

Nearly every envelope address is a dot-atom local part at a dot-separated ASCII domain. Such an
address means the same to every parser, so the ingress (reading MAIL/RCPT) and delivery
(writing them) handle it directly and leave every other form (quoted local parts, address
literals, comments, routes, non-ASCII) to the RFC 5321/5322 parsers of aiosmtpd and aiosmtplib.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# RFC 5322 3.2.3: a local part that needs no quoting.
DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
PLAIN_ADDR_SPEC = rf"{DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"

_PLAIN = re.compile(PLAIN_ADDR_SPEC)


def is_plain(address: str) -> bool:
    return _PLAIN.fullmatch(address) is not None


def mailbox_error(address: str) -> str:
    """What makes `address` no mailbox a message could have gone to, "" when nothing: a local
    part and a domain around the last "@" (as `recipient_key` splits them), printable, a space
    only inside a quoted local part. What a typo or an empty shell variable gives an operator's
    command (a suppression entry that would stand for no one) is refused; every address the
    ingress takes passes, UTF-8 (SMTPUTF8), quoted local parts and a domain's root dot included."""
    if is_plain(address):
        return ""
    local, at, domain = address.rpartition("@")
    if not at:
        return "no '@' before a domain"
    if not local:
        return "no local part before its '@'"
    domain = domain_key(domain)
    if not domain or not all(domain.split(".")):
        return "no domain after its '@'"
    if not address.isprintable():  # control characters, and whitespace other than a space
        return "a control character (or whitespace other than a space)"
    quoted = len(local) > 1 and local[0] == local[-1] == '"'
    if " " in domain or (not quoted and (" " in local or "@" in local)):
        return "a space or an '@' outside a quoted local part"
    return ""


def printable_ascii(value: str) -> bool:
    """Only printable US-ASCII and spaces: what may go into a header field verbatim (a HELO name
    into Received:, ORCPT and ENVID into a DSN), where a CR, LF or NUL would start a new field."""
    return all(" " <= c <= "~" for c in value)


def domain_of(address: str) -> str:
    """The domain of an address, as `domain_key` spells it."""
    return domain_key(address.rpartition("@")[2])


def recipient_key(address: str) -> str:
    """One mailbox, however its domain is spelt: the local part as given (its case may matter,
    RFC 5321 §2.4), the domain as `domain_key` spells it. Recipients with one key are delivered
    (and reported) once, as Postfix's duplicate filter does."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain_key(domain)}"


def domain_as_written(address: str) -> str:
    """The domain of an address lower-cased but in the spelling it came in (U-labels stay
    U-labels): how releases before `domain_key` compared domains, kept where their results
    (job numbering, VERP tokens) must be reproduced."""
    return address.rpartition("@")[2].strip().lower().rstrip(".")


def domain_key(domain: str) -> str:
    """A domain as lookups compare it: lower case, no trailing dot, A-labels (xn--) when it is
    internationalised. "Bücher.test", "bücher.test." and "xn--bcher-kva.test" are one key, so
    a sender writing either spelling finds its account's domain, dedicated pool and DKIM keys.
    A name IDNA refuses is only lower-cased (it then matches nothing configured)."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    return _a_labels(domain)


@functools.lru_cache(maxsize=16384)
def _a_labels(domain: str) -> str:
    # IDNA 2008 (UTS 46, non-transitional), as dnspython resolves the name. Python's own codec is
    # IDNA 2003, which maps "faß.de" to "fass.de": another registered domain, whose MX would
    # have been asked, and to whose mailbox an MX without SMTPUTF8 would have been given it.
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain


@functools.lru_cache(maxsize=1024)
def ip_key(address: str) -> str:
    """A source IP address in its one spelling ("2001:DB8:0::1" is 2001:db8::1), as lookups
    compare it; anything that is no IP address as it is. A pause or a shaping override written
    in another spelling than the pool's would otherwise never apply."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address
