"""Bounce classification: ordered rules, first match wins, mapping SMTP replies to categories.

Category names follow KumoMTA's predefined bounce classes (``crates/bounce-classify``) in
snake_case, so operators can carry their vocabulary and dashboards across. Relais leaves out
Kumo's classes for inbound mail (AutoReply, Subscribe, Unsubscribe, ChallengeResponse), which
describe messages rather than replies, and adds ``message_too_large``: a size rejection says
nothing about the recipient's mailbox, so it should not be filed with quota problems.

``DEFAULT_RULES`` has two layers. Reply texts come first because providers reuse a few catch-all
codes (5.7.1, 5.5.0, 5.4.1) for everything from unknown users to blocklists, and the text is the
only honest signal. The IANA enhanced status codes (RFC 3463 and the registry that extends it)
then classify whatever the texts did not recognise. Config rules go in front of both:
``rules_from_data(config) + DEFAULT_RULES``.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class BounceCategory(StrEnum):
    INVALID_RECIPIENT = "invalid_recipient"
    BAD_DOMAIN = "bad_domain"
    INACTIVE_MAILBOX = "inactive_mailbox"
    INVALID_SENDER = "invalid_sender"
    QUOTA_ISSUES = "quota_issues"
    MESSAGE_TOO_LARGE = "message_too_large"
    SPAM_BLOCK = "spam_block"
    SPAM_CONTENT = "spam_content"
    SPAM_RELATED = "spam_related"
    VIRUS_RELATED = "virus_related"
    PROHIBITED_ATTACHMENT = "prohibited_attachment"
    CONTENT_RELATED = "content_related"
    POLICY_RELATED = "policy_related"
    AUTHENTICATION_FAILED = "authentication_failed"
    RELAY_DENIED = "relay_denied"
    ROUTING_ERRORS = "routing_errors"
    DNS_FAILURE = "dns_failure"
    NO_ANSWER_FROM_HOST = "no_answer_from_host"
    BAD_CONNECTION = "bad_connection"
    BAD_CONFIGURATION = "bad_configuration"
    PROTOCOL_ERRORS = "protocol_errors"
    TRANSIENT_FAILURE = "transient_failure"
    MESSAGE_EXPIRED = "message_expired"
    UNCATEGORIZED = "uncategorized"


# The address itself is dead: mailing it again only hurts the sender's reputation.
HARD_CATEGORIES = frozenset(
    {BounceCategory.INVALID_RECIPIENT, BounceCategory.BAD_DOMAIN, BounceCategory.INACTIVE_MAILBOX}
)

_RULE_KEYS = frozenset({"category", "code", "enhanced", "text"})
# "550 5.1.1 ...", "550-5.1.1 ...", "5.1.1 ..." at the start of a reply whose parts were not split.
_LEADING = re.compile(
    r"\s*(?:(?P<code>[245]\d\d)(?:[ -]|$))?\s*(?:(?P<enhanced>[245]\.\d{1,3}\.\d{1,3})(?:\s|$))?"
)


@dataclass(frozen=True, slots=True)
class BounceRule:
    """Matches when every pattern it has matches: ``code`` and ``enhanced`` against the whole
    value, ``text`` anywhere in the reply text, case-insensitively."""

    category: BounceCategory
    code: str | None = None
    enhanced: str | None = None
    text: str | None = None
    _code: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _enhanced: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _text: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "category", BounceCategory(self.category))
        except ValueError:
            raise ValueError(
                f"unknown bounce category {self.category!r}; known: {', '.join(BounceCategory)}"
            ) from None
        if self.code is None and self.enhanced is None and self.text is None:
            raise ValueError("a bounce rule needs at least one of code, enhanced, text")
        object.__setattr__(self, "_code", _compile("code", self.code, 0))
        object.__setattr__(self, "_enhanced", _compile("enhanced", self.enhanced, 0))
        object.__setattr__(self, "_text", _compile("text", self.text, re.IGNORECASE))

    def matches(self, code: int | None, enhanced: str | None, text: str) -> bool:
        if self._code is not None and (code is None or not self._code.fullmatch(f"{code:03d}")):
            return False
        if self._enhanced is not None and (enhanced is None or not self._enhanced.fullmatch(enhanced)):
            return False
        return self._text is None or self._text.search(text) is not None


def _compile(name: str, pattern: str | None, flags: int) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {exc}") from None


def _text(category: BounceCategory, pattern: str, *, code: str | None = None) -> BounceRule:
    return BounceRule(category, code=code, text=pattern)


def _status(category: BounceCategory, enhanced: str) -> BounceRule:
    # Class 4 and 5 alike: a 4.2.2 mailbox is as full as a 5.2.2 one; only the retry differs.
    return BounceRule(category, enhanced=rf"[45]\.{enhanced}")


_C = BounceCategory
_REPLY_TEXT_RULES = (
    # Greylisting names the recipient ("Recipient address rejected: Greylisted") but is only a delay.
    _text(_C.TRANSIENT_FAILURE, r"greylist|graylist", code=r"4\d\d"),
    # Before bad_domain and invalid_recipient: "Sender address rejected: Domain not found" and
    # Exim's "Verification failed ... Unrouteable address ... Sender verify failed" are about us.
    _text(
        _C.INVALID_SENDER,
        r"sender verif\w* failed|sender address rejected: (?:domain not found|need fully-qualified"
        r"|undeliverable address)|sender domain must exist|sender (?:domain|address) (?:does not exist"
        r"|not found|is invalid)|invalid sender|unverified sender|sender .{0,30}null mx",
    ),
    # Before spam and policy: Gmail's and Yahoo's DMARC texts also say "blocked" and "policy".
    _text(
        _C.AUTHENTICATION_FAILED,
        r"\b(?:spf|dkim|dmarc|arc)\b|unauthenticated|not authenticated|authentication (?:required"
        r"|failed|failure|level|requirements)|\bptr record|reverse dns|\brdns\b",
    ),
    _text(_C.VIRUS_RELATED, r"\bvirus|malware|trojan|infected|eicar"),
    _text(
        _C.PROHIBITED_ATTACHMENT,
        r"attachment.{0,40}(?:not allowed|prohibited|forbidden|blocked|banned|rejected)|(?:prohibited"
        r"|forbidden|banned|dangerous|unsafe) (?:file|attachment|extension)|potential security issue"
        r"|file (?:type|extension)s? (?:\S+ ){0,3}(?:not allowed|blocked|prohibited)",
    ),
    # Before spam: Gmail's RFC 5322 rejections add "To reduce the amount of spam sent to Gmail".
    _text(
        _C.CONTENT_RELATED,
        r"not rfc ?\d+ compliant|\brfc ?(?:5322|2822|822|2045|5321)\b|missing (?:a )?(?:valid )?"
        r"(?:message-?id|date|from|subject)\b|(?:multiple|duplicate) \S+ headers?|malformed (?:message"
        r"|header|mime)|invalid (?:mime|header|message format)|8-?bit (?:data|characters?) not allowed"
        r"|message content rejected|content rejected",
    ),
    # Source reputation: about the sending IP or domain, whatever the message says.
    _text(
        _C.SPAM_BLOCK,
        r"spamhaus|spamcop|\bbarracuda\b|\bsorbs\b|\b(?:rbl|dnsbl|uribl)\b|block ?list|black ?list"
        r"|blocked using|(?<!not )listed (?:at|on|in|by)\b|reputation|unusual rate of unsolicited"
        r"|banned sending ip|\[(?:BL|TSS?)\d+\]|user complaints",
    ),
    _text(
        _C.SPAM_CONTENT,
        r"likely unsolicited|(?:message|content|mail)\b.{0,40}\b(?:as|is|looks like|considered"
        r"|identified as|detected as|classified as) (?:spam|junk|bulk)\b|spam (?:content|message)"
        r"|spam ?assassin|spam score|scored [\d.]+ (?:spam )?points|content filter",
    ),
    _text(_C.SPAM_RELATED, r"\bspam\b|unsolicited|\bjunk\b|\bube\b"),
    _text(
        _C.RELAY_DENIED,
        r"relay(?:ing)? (?:access )?(?:denied|not permitted|prohibited|not allowed)|not permitted to"
        r" relay|unable to relay|we do not relay|relay not permitted|not an open relay",
    ),
    # Before bad_domain: Postfix says "Host or domain name not found ... try again" when the
    # lookup merely failed; without "try again" the domain really does not exist.
    _text(
        _C.DNS_FAILURE,
        r"host not found, try again|name service error.{0,80}try again|temporary failure in name"
        r" resolution|servfail|dns (?:lookup |query |resolution )?(?:failure|failed|error|timeout"
        r"|timed out)|host lookup did not complete|unable to resolve|could not resolve",
    ),
    # Before invalid_recipient, whose "does not exist" would also read delivery's own "Host not
    # found: MX host ... does not exist" (every MX host NXDOMAIN) as an unknown user.
    _text(
        _C.BAD_DOMAIN,
        r"host or domain name not found|domain (?:name )?(?:not found|does not exist|doesn't exist)"
        r"|non-?existent ?domain|no (?:mx|mail exchanger|valid mx)\b|nxdomain|null mx|does not accept"
        r" (?:e-?)?mail|relevant mx records point to non-existent hosts|unroute?able domain"
        r"|\.\.\. unknown host|host not found: mx host",
    ),
    _text(
        _C.INACTIVE_MAILBOX,
        r"(?:account|mailbox|address|user)\b.{0,40}\b(?:is|has been|was) (?:disabled|deactivated"
        r"|inactive|suspended|closed|expired|locked)\b|inactive (?:account|mailbox|user)|account"
        r" (?:has been )?(?:disabled|terminated)|no longer (?:active|in use|valid|available)",
    ),
    # Microsoft 365 rejects unknown recipients (directory-based edge blocking) with this text on
    # 5.4.1; on 5.7.1 the same words are a Postfix access-table REJECT, i.e. policy.
    BounceRule(
        _C.INVALID_RECIPIENT, enhanced=r"[45]\.4\.1", text=r"recipient address rejected: access denied"
    ),
    # RFC 5321 gives "mailbox unavailable" as the stock text of 450 (busy) as well as 550.
    _text(_C.INVALID_RECIPIENT, r"mailbox unavailable", code=r"5\d\d"),
    _text(
        _C.INVALID_RECIPIENT,
        r"user unknown|unknown (?:user|recipient|address|local part|mailbox)|no such (?:user|mailbox"
        r"|recipient|address|account|person)|does not exist|doesn't exist|(?:mailbox|recipient|user"
        r"|address) not found|invalid (?:recipient|mailbox|address|user)|doesn't have an? \S+ account"
        r"|unrouteable address|not a valid (?:mailbox|user|recipient)|recipient rejected|bad"
        r" destination mailbox|addressee unknown|user not known|invalid (?:final delivery )?userid"
        r"|does not have a final e-?mail|did not (?:exactly )?match an? \S+ (?:e-?mail )?address"
        r"|recipient name is not recognized|not listed in (?:the )?(?:\S+ )?directory",
    ),
    _text(
        _C.QUOTA_ISSUES,
        r"over ?quota|quota (?:exceeded|full)|exceed(?:s|ed)? (?:\S+ )?(?:quota|storage)|mailbox"
        r" (?:is )?full|(?:mailbox|inbox|account) (?:\S+ ){0,3}full\b|insufficient (?:system )?storage"
        r"|out of storage|not enough (?:disk )?space|storage (?:limit|allocation)|disk quota"
        r"|quota violation|exceeding (?:\S+ )?quota|mail ?folder is full|full mailbox",
    ),
    _text(
        _C.MESSAGE_TOO_LARGE,
        r"(?:message|mail|email)(?: size)? (?:\S+ ){0,3}(?:too (?:large|big)|exceed)|size (?:limit"
        r"|exceeds)|message size|too large|too big",
    ),
    _text(
        _C.ROUTING_ERRORS,
        r"loops? back to myself|mail(?:ing)? loop|routing loop|loop detected|too many hops|hop count"
        r" exceeded|unable to route|no route (?:for|to) (?:domain|recipient|destination)",
    ),
    _text(
        _C.MESSAGE_EXPIRED,
        r"message expired|delivery time expired|expired after|too long in (?:the )?queue|retry"
        r" timeout exceeded|could not be delivered within|delivery failed \d+ attempts",
    ),
    # Before bad_connection: Postfix labels these 4.4.2, but the host did answer, then went quiet.
    _text(
        _C.NO_ANSWER_FROM_HOST,
        r"timed out while|conversation .{0,120}timed out|smtp timeout|no response from|did not"
        r" respond|not responding|no answer from|read timeout|timeout waiting",
    ),
    _text(
        _C.BAD_CONNECTION,
        r"connection (?:refused|reset|timed out|closed|dropped|lost)|lost connection|broken pipe"
        r"|connection to (?:the )?mail exchanger failed"
        r"|network is unreachable|no route to host|handshake (?:failed|failure)|cannot start tls"
        r"|(?:tls|ssl)\b.{0,40}(?:negotiation|handshake) (?:failed|failure|error)",
    ),
    _text(
        _C.BAD_CONFIGURATION,
        r"misconfigur|configuration (?:error|problem)|tls is required, but (?:was )?not offered"
        r"|requiretls|incorrectly configured",
    ),
    _text(
        _C.PROTOCOL_ERRORS,
        r"syntax error|synchroni[sz]ation error|command (?:not recognized|unrecognized|not implemented)"
        r"|bad sequence of commands|need (?:mail|rcpt|helo|ehlo) command|protocol error|line too long"
        r"|bare (?:lf|newline)",
    ),
    _text(
        _C.POLICY_RELATED,
        r"\bpolic(?:y|ies)\b|administrative(?:ly)? prohibit|prohibited|not (?:allowed|permitted"
        r"|authori[sz]ed)|too many (?:recipients|messages|connections)|rate limit|throttl|sending"
        r" limit|access denied",
    ),
    _text(
        _C.TRANSIENT_FAILURE,
        r"try again later|temporar(?:il)?y (?:unavailable|deferred|rejected|failure|error|suspended)"
        r"|will be retried|delivery attempts will continue"
        r"|service (?:is )?(?:temporarily )?(?:unavailable|not available)|(?:server|system) (?:is )?"
        r"busy|too busy|resources temporarily unavailable|congestion|insufficient resources",
    ),
)

# IANA SMTP Enhanced Status Codes registry, by subject and detail. X.0.0 is left out on purpose:
# it is what core.outcome.Reply fills in when a server sent no enhanced code at all.
_STATUS_RULES = (
    _status(_C.INVALID_RECIPIENT, r"1\.[134]"),  # bad mailbox, bad mailbox syntax, ambiguous
    _status(_C.BAD_DOMAIN, r"1\.(?:2|10)"),  # bad destination system, recipient has null MX
    _status(_C.INACTIVE_MAILBOX, r"1\.6"),  # mailbox has moved, no forwarding address
    _status(_C.INVALID_SENDER, r"1\.[78]"),  # bad sender mailbox / system address
    _status(_C.INACTIVE_MAILBOX, r"2\.1"),  # mailbox disabled
    _status(_C.QUOTA_ISSUES, r"2\.2"),  # mailbox full
    _status(_C.MESSAGE_TOO_LARGE, r"2\.3"),  # message length exceeds administrative limit
    _status(_C.INVALID_RECIPIENT, r"2\.4"),  # mailing list expansion problem
    _status(_C.QUOTA_ISSUES, r"3\.1"),  # mail system full
    _status(_C.TRANSIENT_FAILURE, r"3\.2"),  # system not accepting network messages
    _status(_C.PROTOCOL_ERRORS, r"3\.3"),  # system not capable of selected features
    _status(_C.MESSAGE_TOO_LARGE, r"3\.4"),  # message too big for system
    _status(_C.BAD_CONFIGURATION, r"3\.5"),  # system incorrectly configured
    _status(_C.NO_ANSWER_FROM_HOST, r"4\.1"),
    _status(_C.BAD_CONNECTION, r"4\.2"),
    _status(_C.DNS_FAILURE, r"4\.3"),  # directory server failure
    _status(_C.ROUTING_ERRORS, r"4\.[46]"),  # unable to route, routing loop
    _status(_C.TRANSIENT_FAILURE, r"4\.5"),  # network congestion
    _status(_C.MESSAGE_EXPIRED, r"4\.7"),  # delivery time expired
    _status(_C.POLICY_RELATED, r"5\.3"),  # too many recipients: a limit, not a protocol slip
    _status(_C.PROTOCOL_ERRORS, r"5\.\d{1,3}"),
    _status(_C.CONTENT_RELATED, r"6\.\d{1,3}"),  # media, conversion, content
    _status(_C.INACTIVE_MAILBOX, r"7\.13"),  # user account disabled
    _status(_C.MESSAGE_TOO_LARGE, r"7\.16"),  # message too big for specified priority
    _status(_C.INVALID_RECIPIENT, r"7\.17"),  # RRVS: mailbox owner has changed
    _status(_C.BAD_DOMAIN, r"7\.18"),  # RRVS: domain owner has changed
    _status(_C.INVALID_SENDER, r"7\.27"),  # sender address has null MX
    _status(_C.SPAM_BLOCK, r"7\.28"),  # mail flood of similar abusive messages
    # credentials, mechanism, password transition, DKIM, SPF, reverse DNS, multiple checks, ARC
    _status(_C.AUTHENTICATION_FAILED, r"7\.(?:8|9|11|12|2[0-6]|29)"),
    _status(_C.BAD_CONFIGURATION, r"7\.(?:4|10|30)"),  # security features, encryption, REQUIRETLS
    _status(_C.POLICY_RELATED, r"7\.\d{1,3}"),  # 7.1 delivery not authorized and the rest of X.7
)

DEFAULT_RULES: tuple[BounceRule, ...] = _REPLY_TEXT_RULES + _STATUS_RULES


def classify(
    code: int | None,
    enhanced: str | None,
    text: str,
    rules: Sequence[BounceRule] = DEFAULT_RULES,
) -> BounceCategory:
    """The category of the first rule that matches, else UNCATEGORIZED.

    A code or enhanced status left out is read from the front of ``text`` when it is there, so
    a raw "550 5.1.1 ..." line from a Diagnostic-Code classifies the same as a parsed Reply.
    """
    leading = _LEADING.match(text)
    if leading:
        if code is None and leading.group("code"):
            code = int(leading.group("code"))
        if enhanced is None:
            enhanced = leading.group("enhanced")
    flat = " ".join(text.split())
    for rule in rules:
        if rule.matches(code, enhanced, flat):
            return rule.category
    return BounceCategory.UNCATEGORIZED


def rules_from_data(items: Sequence[Mapping[str, str]]) -> tuple[BounceRule, ...]:
    """Build rules from config data, e.g. ``[[bounce.rules]]`` tables in TOML, keeping their order."""
    rules = []
    for index, item in enumerate(items):
        where = f"bounce rule {index}"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected a table, got {type(item).__name__}")
        unknown = set(item) - _RULE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
        if "category" not in item:
            raise ValueError(f"{where}: category is required")
        for key, value in item.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: {key} must be a non-empty string")
        try:
            rules.append(
                BounceRule(
                    category=item["category"],  # type: ignore[arg-type]  # validated by BounceRule
                    code=item.get("code"),
                    enhanced=item.get("enhanced"),
                    text=item.get("text"),
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return tuple(rules)


def is_hard(category: BounceCategory) -> bool:
    """Whether a (permanent) bounce in this category should put the address on suppression."""
    return category in HARD_CATEGORIES
