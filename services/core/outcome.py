"""SMTP replies and delivery outcomes: the vocabulary shared by delivery, bounce and events."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# The most of a reply's text kept, as Postfix keeps line_limit (2048) of a multi-line reply
# (smtp_chat.c). Each deferral stores its reply in the job (Envelope.attempts, about 120 over
# the default retry.max_age); at aiosmtplib's 32 KiB a reply, a job an MX kept deferring with
# replies that long outgrew NATS's default max_payload (1 MiB): its retry, and later its
# expiry, could not be stored, and the job came back for ever, sent to the MX each time.
TEXT_MAX = 2048


# `Reply.command` of a bounce the operator ordered (`relais bounce-queue`): no MX said anything.
ADMIN_STAGE = "ADMIN"
# `Reply.command` values that name a decision made inside Relais, not an SMTP stage.
LOCAL_STAGES = frozenset({"DNS", "QUEUE", ADMIN_STAGE})


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply as seen (or produced) by Relais.

    `command` names the SMTP stage that drew the reply (CONNECT, EHLO, MAIL, RCPT, DATA, ...),
    or a local pseudo-stage (`LOCAL_STAGES`) when Relais decided on its own.
    """

    code: int
    enhanced_status: str
    text: str
    command: str = ""

    def __post_init__(self) -> None:
        # aiosmtplib decodes a reply with surrogateescape, so octets that are not UTF-8 (a
        # Latin-1 "Empf\xe4nger unbekannt") arrive as lone surrogates, which no envelope, notice
        # or retry can be encoded with: the job's outcome was never stored, and its recipients
        # already accepted got the message again at each redelivery. Censored to "?" here, where
        # every reply (parsed, or quoted into one of ours) is made, as Postfix does (smtp_chat.c).
        if not self.text.isascii():
            object.__setattr__(self, "text", _SURROGATE.sub("?", self.text))
        if len(self.text) > TEXT_MAX:
            object.__setattr__(self, "text", self.text[:TEXT_MAX])

    @classmethod
    def parse(cls, code: int, message: str, command: str = "") -> Reply:
        """Split an enhanced status code off the front of a server's reply text."""
        text = message.strip()
        match = _ENHANCED.match(text)
        if match and match.group(1) == str(code)[0]:
            return cls(code, match.group(0), text[match.end() :].strip(), command)
        return cls(code, default_enhanced(code), text, command)

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced_status} {self.text}".strip()

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "enhanced": self.enhanced_status,
            "text": self.text,
            "command": self.command,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reply:
        return cls(int(data["code"]), str(data["enhanced"]), str(data["text"]), str(data.get("command", "")))


def default_enhanced(code: int) -> str:
    """RFC 3463 fallback when a server gave no enhanced status code."""
    klass = str(code)[0] if 200 <= code < 600 else "4"
    return {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}.get(klass, "4.0.0")


# The MX host of a recipient `relais up` captured in its local mailbox (delivery mode
# "capture"): delivered for good there, not relayed to another server.
LOCAL_MAILBOX = "mailbox"


@dataclass(frozen=True, slots=True)
class Delivered:
    recipient: str
    reply: Reply
    mx_host: str = ""

    kind = "delivered"


@dataclass(frozen=True, slots=True)
class Deferred:
    recipient: str
    reply: Reply
    mx_host: str = ""

    kind = "deferred"


@dataclass(frozen=True, slots=True)
class Bounced:
    recipient: str
    reply: Reply
    mx_host: str = ""
    # Retries ran out (4.4.7): the reply is only the last temporary one, so it says nothing
    # final about the address. Per recipient, since one round can expire some and bounce others.
    expired: bool = False

    kind = "bounced"


Outcome = Delivered | Deferred | Bounced


def outcome_for(recipient: str, reply: Reply, mx_host: str = "") -> Outcome:
    """The outcome a reply means for one recipient: 2xx delivered, 5xx bounced, anything else deferred."""
    if 200 <= reply.code < 300:
        return Delivered(recipient, reply, mx_host)
    if reply.is_permanent:
        return Bounced(recipient, reply, mx_host)
    return Deferred(recipient, reply, mx_host)


# Replies Relais produces itself. Named so tests and code share one spelling.
QUEUE_UNAVAILABLE = Reply(451, "4.3.0", "Queue temporarily unavailable, try again later", "DATA")
NULL_MX = Reply(556, "5.1.10", "Recipient domain does not accept mail (null MX)", "DNS")
NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Recipient domain does not exist", "DNS")
DNS_TEMPFAIL = Reply(451, "4.4.3", "Temporary DNS failure resolving the recipient domain", "DNS")
NO_ROUTE = Reply(451, "4.4.1", "No mail exchanger could be reached", "CONNECT")
EXPIRED = Reply(554, "4.4.7", "Message expired: delivery not possible within the maximum queue age", "QUEUE")
