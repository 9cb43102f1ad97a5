"""Which failures get a DSN, what it says about each recipient, and which get suppressed. No I/O."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from services.bounce.classify import BounceCategory, BounceRule, classify, is_hard
from services.core.addresses import printable_ascii
from services.core.config import BounceConfig
from services.core.envelope import Envelope
from services.core.outcome import ADMIN_STAGE, Bounced, Reply

log = logging.getLogger(__name__)


def original_recipient(env: Envelope, recipient: str) -> str | None:
    """ORCPT as given at RCPT ("rfc822;Bob@Example.com"), for the DSN's Original-Recipient."""
    return _dsn_field(env, "ORCPT", env.dsn_orcpt.get(recipient) or env.dsn_orcpt.get(recipient.lower()))


def envelope_id(env: Envelope) -> str | None:
    """ENVID as given at MAIL FROM, for the DSN's Original-Envelope-Id."""
    return _dsn_field(env, "ENVID", env.dsn_envid)


def _dsn_field(env: Envelope, name: str, value: str | None) -> str | None:
    """The value, or None when it is not what RFC 3461 allows. The DSN builder refuses a CR/LF
    (header injection), and a notice it refuses is retried forever with no DSN and the body
    kept: better a DSN without the field, for an envelope queued before the ingress checked."""
    if not value:
        return None
    # RFC 3461 sections 4.2 (ORCPT) and 4.4 (ENVID): once xtext-decoded, printable US-ASCII.
    if printable_ascii(value):
        return value
    log.warning("%s: %s %r is not printable US-ASCII; the DSN goes without it", env.id, name, value)
    return None


def returns_full(env: Envelope, default_full: bool) -> bool:
    """RET=FULL/HDRS from the sender wins over the configured default."""
    ret = env.dsn_ret.upper()
    return ret == "FULL" or (default_full and ret != "HDRS")


def category_of(reply: Reply, rules: Sequence[BounceRule]) -> BounceCategory:
    return classify(reply.code, reply.enhanced_status, reply.text, rules)


def failure_category(failure: Bounced, rules: Sequence[BounceRule]) -> BounceCategory:
    """An expiry is message_expired whatever its last temporary reply said: "450 4.1.1 User
    unknown" or "No mail exchanger could be reached" were an MX saying "not now", not "never"."""
    if failure.expired:
        return BounceCategory.MESSAGE_EXPIRED
    return category_of(failure.reply, rules)


def suppresses(env: Envelope, failure: Bounced, category: BounceCategory) -> bool:
    """A permanent failure of a dead address: mailing it again only hurts the sender's reputation.

    Only mail from senders counts: a DSN failing says something about a sender, not a recipient.
    An expiry never counts: its 5xx is Relais giving up on temporary failures, not an MX's verdict.
    Nor does an operator's `relais bounce-queue`: its reason is free text for the DSN ("mailbox
    unavailable for maintenance" reads as a dead address), and it judges a queue, not an address.
    """
    return (
        env.kind == "message"
        and not failure.expired
        and failure.reply.command != ADMIN_STAGE
        and failure.reply.is_permanent
        and is_hard(category)
    )


def suppression_expiry(config: BounceConfig, now: float | None = None) -> float:
    """When an automatic suppression entry lapses (0: never)."""
    if not config.suppression_expiry:
        return 0.0
    return (time.time() if now is None else now) + config.suppression_expiry


def header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]
