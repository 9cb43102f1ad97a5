"""The plain form of a mail address, shared by both SMTP sides.

Nearly every envelope address is a dot-atom local part at a dot-separated ASCII domain. Such an
address means the same to every parser, so the ingress (reading MAIL/RCPT) and delivery
(writing them) handle it directly and leave every other form (quoted local parts, address
literals, comments, routes, non-ASCII) to the RFC 5321/5322 parsers of aiosmtpd and aiosmtplib.
"""

from __future__ import annotations

import re

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_ADDR_SPEC = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"

_PLAIN = re.compile(PLAIN_ADDR_SPEC)


def is_plain(address: str) -> bool:
    return _PLAIN.fullmatch(address) is not None
