"""Every reply the ingress gives on its own account, by name.

Tests assert against these constants, never against scattered literals. aiosmtpd's own built-in
replies (syntax errors, sequence errors) get enhanced status codes from `enhance`, which
`protocol.RelaisSMTP` applies to every reply it sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.ingress.headers import SINGLE_FIELDS


@dataclass(frozen=True, slots=True)
class Verdict:
    code: int
    enhanced_status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced_status} {self.text}"

    @property
    def closes_session(self) -> bool:
        return self.code == 421


# Connection
TOO_MANY_CONNECTIONS = Verdict(421, "4.7.0", "Too many connections from your address, try again later")
# The listener is full, whoever asks: the system, not the client, is the reason (RFC 3463 X.3.2).
LISTENER_FULL = Verdict(421, "4.3.2", "Too many connections, try again later")
TOO_MANY_ERRORS = Verdict(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_JUNK_COMMANDS = Verdict(421, "4.7.0", "Too many commands without mail, closing connection")
TIMEOUT = Verdict(421, "4.4.2", "Timeout, closing connection")
SHUTTING_DOWN = Verdict(421, "4.3.2", "Service shutting down, try again later")
BAD_HELO = Verdict(501, "5.5.4", "Invalid HELO/EHLO name")
TLS_ALREADY_ACTIVE = Verdict(503, "5.5.1", "TLS already active")
# A message header line or an HTTP request read as a command (`commands.non_smtp_command`):
# Postfix's answer (221 2.7.0) and, as there, the session ends.
NON_SMTP_COMMAND = Verdict(221, "2.7.0", "Non-SMTP command, closing connection")

# Authentication
AUTH_OK = Verdict(235, "2.7.0", "Authentication successful")
AUTH_REQUIRED = Verdict(530, "5.7.0", "Authentication required")
AUTH_INVALID = Verdict(535, "5.7.8", "Authentication credentials invalid")
AUTH_BAD_BASE64 = Verdict(501, "5.5.2", "Cannot decode base64")
AUTH_MALFORMED = Verdict(501, "5.5.2", "Cannot split AUTH value")
# RFC 4616 2: an authorization identity other than the authentication identity.
AUTH_AUTHZID = Verdict(535, "5.7.8", "Authorization identity must match the authentication identity")
AUTH_THROTTLED = Verdict(454, "4.7.0", "Too many failed authentication attempts, try again later")
# RFC 4954 §6: the accounts are not read yet (the replica just started and KV is slow).
AUTH_UNAVAILABLE = Verdict(454, "4.7.0", "Temporary authentication failure, try again later")
ACCOUNTS_UNAVAILABLE = Verdict(451, "4.3.0", "Accounts not available yet, try again later")
TOO_MANY_SESSIONS = Verdict(421, "4.7.0", "Too many concurrent sessions for this account")
AUTH_IN_TRANSACTION = Verdict(503, "5.5.1", "AUTH not permitted during a mail transaction")
# A listener that offers no AUTH (inbound): Postfix's reply where SASL is off.
AUTH_NOT_ENABLED = Verdict(503, "5.5.1", "Authentication not enabled")
# RFC 4954 5: MAIL's AUTH parameter is "<>" or an xtext.
BAD_AUTH_PARAMETER = Verdict(501, "5.5.4", "Invalid AUTH parameter")
# RFC 4954 4: a response line in the AUTH exchange over the line limit cancels the exchange.
AUTH_LINE_TOO_LONG = Verdict(500, "5.5.6", "Authentication Exchange line is too long")

# MAIL FROM
SENDER_NOT_OWNED = Verdict(553, "5.7.1", "Sender address not owned by the authenticated account")
ACCOUNT_DISABLED = Verdict(535, "5.7.8", "Authentication credentials invalid")
BAD_SENDER_SYNTAX = Verdict(553, "5.1.7", "Bad sender address syntax")
NEEDS_SMTPUTF8 = Verdict(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
HOURLY_LIMIT = Verdict(451, "4.7.1", "Hourly message limit reached for this account, try again later")
DAILY_LIMIT = Verdict(451, "4.7.1", "Daily message limit reached for this account, try again later")
# Postfix's reply when its queue is short of space: here the process's DATA byte budget, at MAIL
# (the SIZE= declared does not fit now) and after the final dot (the message did not).
INSUFFICIENT_STORAGE = Verdict(452, "4.3.1", "Insufficient system storage")

# RCPT TO
BAD_RECIPIENT_SYNTAX = Verdict(501, "5.1.3", "Bad recipient address syntax")
RELAY_DENIED = Verdict(554, "5.7.1", "Relay access denied")
TOO_MANY_RECIPIENTS = Verdict(452, "4.5.3", "Too many recipients")

# End of DATA
MESSAGE_TOO_BIG = Verdict(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Verdict(552, "5.3.4", "Message header size exceeds limit")
LINE_TOO_LONG = Verdict(554, "5.6.0", "Message line longer than 998 octets (RFC 5322 2.1.1)")
BARE_LINE_ENDING = Verdict(554, "5.6.0", "Message contains bare CR or LF line endings (see RFC 5321 2.3.8)")
NUL_BYTES = Verdict(554, "5.6.0", "Message contains NUL characters")
# RFC 3463: 5.4.6 routing loop detected.
TOO_MANY_HOPS = Verdict(554, "5.4.6", "Too many hops (Received: fields), mail loop?")
NEEDS_8BITMIME = Verdict(554, "5.6.1", "8-bit message content requires BODY=8BITMIME")
# RFC 5322 3.6 and 3.6.2, as refused by Gmail and Amazon SES: by lower-case field name.
DUPLICATE_FIELD = {
    name.lower(): Verdict(554, "5.6.0", f"Duplicate header field: {name} (RFC 5322 3.6 allows one)")
    for name in SINGLE_FIELDS
}
FROM_NEEDS_SENDER = Verdict(
    554, "5.6.0", "From: with several mailboxes requires a Sender: field (RFC 5322 3.6.2)"
)
FROM_NOT_OWNED = Verdict(550, "5.7.1", "From: header domain not owned by the authenticated account")
SENDER_HEADER_NOT_OWNED = Verdict(
    550, "5.7.1", "Sender: header domain not owned by the authenticated account"
)
POOL_NOT_ALLOWED = Verdict(550, "5.7.1", "X-Relais-Pool names a pool this account may not use")
LOCAL_ERROR = Verdict(451, "4.3.0", "Local error in processing, try again later")

# aiosmtpd's own replies that need a different code or text, not just an enhanced status.
_REWRITES = {
    "552 Error: message size exceeds fixed maximum message size": str(MESSAGE_TOO_BIG),
    "552 Error: Too much mail data": str(MESSAGE_TOO_BIG),
    "500 Line too long (see RFC5321 4.5.3.1.6)": str(LINE_TOO_LONG),
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
}
# RFC 3463 defaults for replies that arrive without an enhanced status code.
_DEFAULT_ENHANCED = {
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.5.0",
    555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")


def enhance(reply: str) -> str:
    """The same reply with an enhanced status code (RFC 2034), for the single-line error replies."""
    if reply in _REWRITES:
        return _REWRITES[reply]
    if len(reply) < 4 or not reply[:3].isdigit() or reply[3] != " " or _HAS_ENHANCED.match(reply):
        return reply
    code = int(reply[:3])
    if code < 400:
        return reply
    text = reply[4:].removeprefix("Error: ").strip()
    return f"{code} {_DEFAULT_ENHANCED.get(code, f'{code // 100}.0.0')} {text}"


def is_error(reply: str) -> bool:
    """A refusal that counts against the errors-per-session limit (421 ends the session anyway)."""
    return len(reply) >= 3 and reply[:3].isdigit() and reply[0] in "45" and reply[:3] != "421"
