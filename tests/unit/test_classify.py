"""Bounce classification against replies as big providers and common MTAs actually word them."""

from typing import NamedTuple

import pytest

from services.bounce.classify import (
    DEFAULT_RULES,
    HARD_CATEGORIES,
    BounceCategory,
    BounceRule,
    classify,
    is_hard,
    rules_from_data,
)

C = BounceCategory


class Sample(NamedTuple):
    """One reply, split the way core.outcome.Reply.parse splits it."""

    source: str
    code: int | None
    enhanced: str | None
    text: str
    expected: BounceCategory


# Provider texts are written from their documented/observed formats; IPs and hosts are examples.
SAMPLES = [
    # -- invalid_recipient
    Sample(
        "gmail",
        550,
        "5.1.1",
        "The email account that you tried to reach does not exist. Please try double-checking the "
        "recipient's email address for typos or unnecessary spaces. "
        "https://support.google.com/mail/?p=NoSuchUser a1-20020a05600c000100b004123si12345wmq.123 - gsmtp",
        C.INVALID_RECIPIENT,
    ),
    Sample(
        "outlook",
        550,
        "5.5.0",
        "Requested action not taken: mailbox unavailable (S2017062302). "
        "[AM4PEPF00027A64.eurprd04.prod.outlook.com 2024-03-01T12:00:00.000Z 08DC3A1B2C3D4E5F]",
        C.INVALID_RECIPIENT,
    ),
    Sample(
        "microsoft-365-dbeb",
        550,
        "5.4.1",
        "Recipient address rejected: Access denied. For more information see https://aka.ms/EXOSmtpErrors "
        "[DB5PEPF00014B8E.eurprd02.prod.outlook.com 2024-03-01T12:00:00.000Z 08DC3A1B2C3D4E5F]",
        C.INVALID_RECIPIENT,
    ),
    Sample(
        "yahoo",
        554,
        "5.0.0",
        "delivery error: dd This user doesn't have a yahoo.com account (bob@yahoo.com) [0] - "
        "mta4123.mail.bf1.yahoo.com",
        C.INVALID_RECIPIENT,
    ),
    Sample(
        "postfix",
        550,
        "5.1.1",
        "<bob@x.test>: Recipient address rejected: User unknown in virtual mailbox table",
        C.INVALID_RECIPIENT,
    ),
    Sample("exim", 550, "5.0.0", "Unrouteable address", C.INVALID_RECIPIENT),
    Sample("exim-cpanel", 550, "5.0.0", "No Such User Here", C.INVALID_RECIPIENT),
    # -- bad_domain
    Sample(
        "postfix-dns",
        None,
        "5.4.4",
        "Host or domain name not found. Name service error for name=nonexistent.test type=A: Host not found",
        C.BAD_DOMAIN,
    ),
    Sample(
        "outlook",
        550,
        "5.4.4",
        "SMTPSEND.DNS.NonExistentDomain; nonexistent domain",
        C.BAD_DOMAIN,
    ),
    Sample("null-mx", 556, "5.1.10", "Recipient address has null MX", C.BAD_DOMAIN),
    Sample(
        "exim",
        None,
        None,
        "all relevant MX records point to non-existent hosts",
        C.BAD_DOMAIN,
    ),
    # -- inactive_mailbox
    Sample(
        "gmail",
        550,
        "5.2.1",
        "The email account that you tried to reach is disabled. "
        "https://support.google.com/mail/?p=DisabledUser a1si12345wmq.12 - gsmtp",
        C.INACTIVE_MAILBOX,
    ),
    Sample(
        "yahoo",
        554,
        "5.0.0",
        "delivery error: dd Sorry, your message to bob@yahoo.com cannot be delivered. This mailbox is "
        "disabled (554.30). - mta1234.mail.gq1.yahoo.com",
        C.INACTIVE_MAILBOX,
    ),
    Sample("rrvs", 525, "5.7.13", "User account disabled", C.INACTIVE_MAILBOX),
    # -- invalid_sender
    Sample(
        "postfix",
        550,
        "5.1.8",
        "<alice@nonexistent.test>: Sender address rejected: Domain not found",
        C.INVALID_SENDER,
    ),
    Sample("qmail", 553, "5.0.0", "sorry, your envelope sender domain must exist (#5.7.1)", C.INVALID_SENDER),
    Sample(
        "exim-callout",
        550,
        "5.0.0",
        "Verification failed for <alice@sender.test>\nUnrouteable address\nSender verify failed",
        C.INVALID_SENDER,
    ),
    # -- quota_issues
    Sample(
        "gmail",
        452,
        "4.2.2",
        "The email account that you tried to reach is over quota. Please direct the recipient to "
        "https://support.google.com/mail/?p=OverQuotaTemp a1si12345wmq.12 - gsmtp",
        C.QUOTA_ISSUES,
    ),
    Sample(
        "dovecot-lmtp",
        552,
        "5.2.2",
        "<bob@x.test> Quota exceeded (mailbox for user is full)",
        C.QUOTA_ISSUES,
    ),
    Sample("exim", 452, "5.0.0", "Mailbox full", C.QUOTA_ISSUES),
    # -- message_too_large
    Sample(
        "gmail",
        552,
        "5.3.4",
        "Your message exceeded Google's message size limits. Please visit "
        "https://support.google.com/mail/?p=MaxSizeError to view our size guidelines. "
        "a1si12345wmq.12 - gsmtp",
        C.MESSAGE_TOO_LARGE,
    ),
    Sample("postfix", 552, "5.3.4", "Message size exceeds fixed limit", C.MESSAGE_TOO_LARGE),
    Sample("outlook", 552, "5.3.4", "Message size exceeds fixed maximum message size", C.MESSAGE_TOO_LARGE),
    Sample("iana", 552, "5.2.3", "Requested action aborted", C.MESSAGE_TOO_LARGE),
    # -- spam_block
    Sample(
        "postfix-spamhaus",
        554,
        "5.7.1",
        "Service unavailable; Client host [203.0.113.7] blocked using zen.spamhaus.org; "
        "https://www.spamhaus.org/query/ip/203.0.113.7",
        C.SPAM_BLOCK,
    ),
    Sample(
        "outlook",
        550,
        "5.7.1",
        "Unfortunately, messages from [203.0.113.7] weren't sent. Please contact your Internet service "
        "provider since part of their network is on our block list (S3150). You can also refer your "
        "provider to http://mail.live.com/mail/troubleshooting.aspx#errors.",
        C.SPAM_BLOCK,
    ),
    Sample(
        "outlook",
        550,
        "5.7.606",
        "Access denied, banned sending IP [203.0.113.7]. To request removal from this list please visit "
        "https://sender.office.com/ and follow the directions.",
        C.SPAM_BLOCK,
    ),
    Sample(
        "yahoo",
        553,
        "5.7.1",
        "[BL21] Connections will not be accepted from 203.0.113.7, because the ip is in Spamhaus's list; "
        "see https://postmaster.yahooinc.com/error-codes",
        C.SPAM_BLOCK,
    ),
    Sample(
        "yahoo",
        421,
        "4.7.0",
        "[TSS04] Messages from 203.0.113.7 temporarily deferred due to unexpected volume or user "
        "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        C.SPAM_BLOCK,
    ),
    Sample(
        "gmail",
        421,
        "4.7.28",
        "Our system has detected an unusual rate of unsolicited mail originating from your IP address. "
        "To protect our users from spam, mail sent from your IP address has been temporarily rate "
        "limited. Please visit https://support.google.com/mail/?p=UnsolicitedRateLimitError to review "
        "our Bulk Email Senders Guidelines. a1si12345wmq.12 - gsmtp",
        C.SPAM_BLOCK,
    ),
    Sample(
        "gmail",
        421,
        "4.7.0",
        "This message is suspicious due to the very low reputation of the sending IP address. To "
        "protect our users from spam, mail sent from your IP address has been temporarily rate limited.",
        C.SPAM_BLOCK,
    ),
    # -- spam_content
    Sample(
        "gmail",
        550,
        "5.7.1",
        "Our system has detected that this message is likely unsolicited mail. To reduce the amount of "
        "spam sent to Gmail, this message has been blocked. Please visit "
        "https://support.google.com/mail/?p=UnsolicitedMessageError for more information.",
        C.SPAM_CONTENT,
    ),
    Sample("microsoft-eop", 550, "5.7.1", "Message rejected as spam by Content Filtering.", C.SPAM_CONTENT),
    Sample(
        "exim-spamassassin",
        550,
        "5.0.0",
        "Rejected: message looks like spam (SpamAssassin score 12.3, required 5.0)",
        C.SPAM_CONTENT,
    ),
    # -- spam_related
    Sample("generic", 550, "5.7.1", "Spam detected", C.SPAM_RELATED),
    # -- virus_related
    Sample(
        "exim-clamav",
        550,
        "5.0.0",
        "This message contains a virus (Eicar-Test-Signature) and has been rejected",
        C.VIRUS_RELATED,
    ),
    # -- prohibited_attachment
    Sample(
        "gmail",
        552,
        "5.7.0",
        "This message was blocked because its content presents a potential security issue. Please "
        "visit https://support.google.com/mail/?p=BlockedMessage to review our message content and "
        "attachment content guidelines.",
        C.PROHIBITED_ATTACHMENT,
    ),
    Sample(
        "postfix-mime-checks",
        554,
        "5.7.1",
        "message content rejected, .exe attachments are not allowed",
        C.PROHIBITED_ATTACHMENT,
    ),
    # -- content_related
    Sample(
        "gmail",
        550,
        "5.7.1",
        "[203.0.113.7] Messages missing a valid Message-ID header are not accepted. For more "
        "information, go to https://support.google.com/mail/?p=RfcMessageNonCompliant and review RFC "
        "5322 specifications.",
        C.CONTENT_RELATED,
    ),
    Sample(
        "gmail",
        550,
        "5.7.1",
        "This message is not RFC 5322 compliant. There are multiple Subject headers. To reduce the "
        "amount of spam sent to Gmail, this message has been blocked.",
        C.CONTENT_RELATED,
    ),
    Sample("iana", 554, "5.6.1", "Media not supported", C.CONTENT_RELATED),
    # -- policy_related
    Sample(
        "gmail",
        550,
        "5.7.1",
        "[203.0.113.7] The user or domain that you are sending to (or from) has a policy that "
        "prohibited the mail that you sent. Please contact your domain administrator for further details.",
        C.POLICY_RELATED,
    ),
    Sample(
        "postfix-access",
        554,
        "5.7.1",
        "<bob@x.test>: Recipient address rejected: Access denied",
        C.POLICY_RELATED,
    ),
    Sample("exim", 550, "5.0.0", "Administrative prohibition", C.POLICY_RELATED),
    Sample("generic", 550, "5.0.0", "Message rejected due to policy", C.POLICY_RELATED),
    Sample(
        "gmail",
        452,
        "4.5.3",
        "Your message has too many recipients. For more information regarding Google's sending limits, "
        "please visit https://support.google.com/mail/?p=TooManyRecipientsError",
        C.POLICY_RELATED,
    ),
    # -- authentication_failed
    Sample(
        "gmail",
        550,
        "5.7.26",
        "This mail has been blocked because the sender is unauthenticated. Gmail requires all senders "
        "to authenticate with either SPF or DKIM. Authentication results: DKIM = did not pass SPF "
        "[sender.test] with ip: [203.0.113.7] = did not pass",
        C.AUTHENTICATION_FAILED,
    ),
    Sample(
        "gmail",
        550,
        "5.7.26",
        "Unauthenticated email from sender.test is not accepted due to domain's DMARC policy. Please "
        "contact the administrator of sender.test domain if this was a legitimate mail.",
        C.AUTHENTICATION_FAILED,
    ),
    Sample(
        "gmail",
        550,
        "5.7.25",
        "[203.0.113.7] The IP address sending this message does not have a PTR record setup, or the "
        "corresponding forward DNS entry does not point to the sending IP. As a policy, Gmail does not "
        "accept messages from IP addresses with missing PTR records.",
        C.AUTHENTICATION_FAILED,
    ),
    Sample(
        "outlook",
        550,
        "5.7.515",
        "Access denied, sending domain sender.test doesn't meet the required authentication level.",
        C.AUTHENTICATION_FAILED,
    ),
    Sample(
        "yahoo",
        550,
        "5.7.9",
        "This mail has been blocked because the sender is unauthenticated. Yahoo requires all senders "
        "to authenticate with either SPF or DKIM.",
        C.AUTHENTICATION_FAILED,
    ),
    # -- relay_denied
    Sample("postfix", 554, "5.7.1", "<bob@elsewhere.test>: Relay access denied", C.RELAY_DENIED),
    Sample("exim", 550, "5.0.0", "relay not permitted", C.RELAY_DENIED),
    Sample(
        "outlook",
        550,
        "5.7.64",
        "TenantAttribution; Relay Access Denied [DB5EUR03FT012.eop-EUR03.prod.protection.outlook.com]",
        C.RELAY_DENIED,
    ),
    # -- routing_errors
    Sample("postfix", None, "5.4.6", "mail for x.test loops back to myself", C.ROUTING_ERRORS),
    Sample(
        "exim",
        None,
        None,
        'Too many "Received" headers - suspected mail loop',
        C.ROUTING_ERRORS,
    ),
    Sample("iana", 550, "5.4.4", "Unable to route", C.ROUTING_ERRORS),
    # -- dns_failure
    Sample(
        "postfix",
        None,
        "4.4.3",
        "Host or domain name not found. Name service error for name=x.test type=MX: "
        "Host not found, try again",
        C.DNS_FAILURE,
    ),
    Sample("exim", None, None, "R=dnslookup defer (-1): host lookup did not complete", C.DNS_FAILURE),
    Sample("iana", 451, "4.4.3", "Directory server failure", C.DNS_FAILURE),
    # -- no_answer_from_host
    Sample(
        "postfix",
        None,
        "4.4.2",
        "conversation with mx1.x.test[192.0.2.25] timed out while receiving the initial server greeting",
        C.NO_ANSWER_FROM_HOST,
    ),
    Sample(
        "exim",
        None,
        None,
        "T=remote_smtp: SMTP timeout after end of data (1234 bytes written): Connection timed out",
        C.NO_ANSWER_FROM_HOST,
    ),
    # -- bad_connection
    Sample(
        "postfix", None, "4.4.1", "connect to mx1.x.test[192.0.2.25]:25: Connection refused", C.BAD_CONNECTION
    ),
    Sample(
        "postfix",
        None,
        "4.4.2",
        "lost connection with mx1.x.test[192.0.2.25] while sending end of data -- message may be sent "
        "more than once",
        C.BAD_CONNECTION,
    ),
    # -- bad_configuration
    Sample("postfix", 451, "4.3.5", "Server configuration problem", C.BAD_CONFIGURATION),
    Sample(
        "postfix",
        None,
        "4.7.4",
        "TLS is required, but was not offered by host mx1.x.test[192.0.2.25]",
        C.BAD_CONFIGURATION,
    ),
    # -- protocol_errors
    Sample("postfix", 503, "5.5.1", "Error: need RCPT command", C.PROTOCOL_ERRORS),
    Sample("exim", 554, "5.0.0", "SMTP synchronization error", C.PROTOCOL_ERRORS),
    Sample("generic", 500, "5.5.2", "Syntax error, command unrecognized", C.PROTOCOL_ERRORS),
    # -- transient_failure
    Sample(
        "gmail",
        421,
        "4.7.0",
        "Try again later, closing connection. (EHLO) a1-20020a05600c000100b004123si12345wmq.12 - gsmtp",
        C.TRANSIENT_FAILURE,
    ),
    Sample(
        "postgrey",
        450,
        "4.2.0",
        "<bob@x.test>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/x.test.html",
        C.TRANSIENT_FAILURE,
    ),
    Sample(
        "outlook",
        451,
        "4.7.500",
        "Server busy. Please try again later from [203.0.113.7]. (S77719)",
        C.TRANSIENT_FAILURE,
    ),
    # -- message_expired
    Sample("exim", None, None, "retry timeout exceeded", C.MESSAGE_EXPIRED),
    Sample("iana", None, "4.4.7", "Delivery time expired", C.MESSAGE_EXPIRED),
    # -- uncategorized
    Sample("generic", 554, "5.0.0", "Transaction failed", C.UNCATEGORIZED),
    Sample("success", 250, "2.0.0", "OK id=1rXyZa-000123-AB", C.UNCATEGORIZED),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=[f"{s.expected}-{s.source}" for s in SAMPLES])
def test_classifies_real_world_replies(sample: Sample) -> None:
    assert classify(sample.code, sample.enhanced, sample.text) is sample.expected


def test_samples_cover_every_category() -> None:
    assert {s.expected for s in SAMPLES} == set(BounceCategory)


def test_every_category_is_reachable_from_the_default_rules() -> None:
    assert {rule.category for rule in DEFAULT_RULES} | {C.UNCATEGORIZED} == set(BounceCategory)


# -- reading codes that were not split off --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("550 5.1.1 <bob@x.test>: bounce", C.INVALID_RECIPIENT),
        ("550-5.2.2 box", C.QUOTA_ISSUES),
        ("5.3.4 too", C.MESSAGE_TOO_LARGE),
        ("421 4.4.2 gone", C.BAD_CONNECTION),
    ],
)
def test_reads_code_and_enhanced_status_from_an_unsplit_reply(text: str, expected: BounceCategory) -> None:
    assert classify(None, None, text) is expected


def test_given_enhanced_status_wins_over_one_in_the_text() -> None:
    assert classify(552, "5.2.2", "5.1.1 text disagrees") is C.QUOTA_ISSUES


def test_x_0_0_alone_says_nothing() -> None:
    # core.outcome.Reply fills in 5.0.0 when the server sent no enhanced code.
    assert classify(550, "5.0.0", "Requested action not taken") is C.UNCATEGORIZED


# -- precedence -----------------------------------------------------------------------------------


def test_text_beats_a_misleading_enhanced_status() -> None:
    # Microsoft answers unknown users with 5.5.0, which the IANA table would call a protocol error.
    assert classify(550, "5.5.0", "Requested action not taken: mailbox unavailable") is C.INVALID_RECIPIENT
    assert classify(550, "5.5.0", "Requested action not taken") is C.PROTOCOL_ERRORS


def test_mailbox_unavailable_on_450_means_busy_not_unknown() -> None:
    assert (
        classify(450, None, "Requested mail action not taken: mailbox unavailable") is not C.INVALID_RECIPIENT
    )


def test_access_denied_depends_on_the_enhanced_status() -> None:
    text = "Recipient address rejected: Access denied"

    assert classify(550, "5.4.1", text) is C.INVALID_RECIPIENT
    assert classify(554, "5.7.1", text) is C.POLICY_RELATED


def test_relay_denied_beats_the_generic_5_7_1_policy() -> None:
    assert classify(554, "5.7.1", "Relay access denied") is C.RELAY_DENIED
    assert classify(554, "5.7.1", "Delivery not authorized") is C.POLICY_RELATED


def test_greylisting_is_not_an_unknown_recipient() -> None:
    text = "Recipient address rejected: Greylisted"

    assert classify(450, "4.2.0", text) is C.TRANSIENT_FAILURE


def test_sender_problems_beat_recipient_and_domain_texts() -> None:
    assert classify(550, None, "Unrouteable address") is C.INVALID_RECIPIENT
    assert classify(550, None, "Unrouteable address\nSender verify failed") is C.INVALID_SENDER
    assert classify(550, None, "Sender address rejected: Domain not found") is C.INVALID_SENDER
    assert classify(550, None, "Recipient address rejected: Domain not found") is C.BAD_DOMAIN


def test_temporary_dns_failure_beats_nonexistent_domain() -> None:
    permanent = "Host or domain name not found. Name service error for name=x.test type=MX: Host not found"

    assert classify(None, "5.4.4", permanent) is C.BAD_DOMAIN
    assert classify(None, "4.4.3", permanent + ", try again") is C.DNS_FAILURE


def test_rfc_compliance_beats_gmails_spam_boilerplate() -> None:
    assert (
        classify(550, "5.7.1", "Not RFC 5322 compliant. To reduce the amount of spam ...")
        is C.CONTENT_RELATED
    )
    assert classify(550, "5.7.1", "To reduce the amount of spam ...") is C.SPAM_RELATED


def test_first_matching_rule_wins() -> None:
    rules = (
        BounceRule(C.POLICY_RELATED, text="blocked"),
        BounceRule(C.SPAM_BLOCK, text="blocked"),
    )

    assert classify(550, "5.7.1", "blocked", rules) is C.POLICY_RELATED
    assert classify(550, "5.7.1", "blocked", rules[::-1]) is C.SPAM_BLOCK


def test_operator_rules_in_front_override_the_defaults() -> None:
    custom = rules_from_data([{"category": "spam_block", "code": "550", "text": r"\bAS\(\d+\)"}])

    text = "Recipient address rejected: Access denied. AS(201806281)"
    assert classify(550, "5.4.1", text) is C.INVALID_RECIPIENT
    assert classify(550, "5.4.1", text, custom + DEFAULT_RULES) is C.SPAM_BLOCK


def test_no_rules_means_uncategorized() -> None:
    assert classify(550, "5.1.1", "User unknown", ()) is C.UNCATEGORIZED


# -- BounceRule -----------------------------------------------------------------------------------


def test_rule_requires_all_its_patterns() -> None:
    rule = BounceRule(C.QUOTA_ISSUES, code=r"5\d\d", enhanced=r"5\.2\.2", text="full")

    assert rule.matches(552, "5.2.2", "Mailbox FULL")
    assert not rule.matches(452, "5.2.2", "Mailbox full")
    assert not rule.matches(552, "5.2.1", "Mailbox full")
    assert not rule.matches(552, "5.2.2", "Mailbox empty")
    assert not rule.matches(None, "5.2.2", "Mailbox full")
    assert not rule.matches(552, None, "Mailbox full")


def test_code_and_enhanced_patterns_match_the_whole_value() -> None:
    rule = BounceRule(C.INVALID_RECIPIENT, code="55", enhanced=r"5\.1\.1")

    assert not rule.matches(550, "5.1.1", "")
    assert not BounceRule(C.INVALID_RECIPIENT, enhanced=r"5\.1\.1").matches(550, "5.1.10", "")


def test_rule_accepts_category_names() -> None:
    assert BounceRule("bad_domain", text="x").category is C.BAD_DOMAIN  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"category": C.SPAM_BLOCK},
        {"category": "SpamBlock", "text": "x"},
        {"category": C.SPAM_BLOCK, "text": "(unclosed"},
        {"category": C.SPAM_BLOCK, "code": "5[0-"},
    ],
    ids=["no-pattern", "unknown-category", "bad-text-regex", "bad-code-regex"],
)
def test_rule_rejects_invalid_definitions(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        BounceRule(**kwargs)  # type: ignore[arg-type]


# -- rules_from_data ------------------------------------------------------------------------------


def test_rules_from_data_keeps_order_and_fields() -> None:
    rules = rules_from_data(
        [
            {"category": "quota_issues", "code": "452", "enhanced": r"4\.2\.2"},
            {"category": "spam_block", "text": "cloudmark"},
        ]
    )

    assert rules == (
        BounceRule(C.QUOTA_ISSUES, code="452", enhanced=r"4\.2\.2"),
        BounceRule(C.SPAM_BLOCK, text="cloudmark"),
    )
    assert classify(550, "5.7.1", "Blocked by CloudMark CSI", rules) is C.SPAM_BLOCK


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"category": "spam_block", "txt": "x"}], "unknown keys"),
        ([{"text": "x"}], "category is required"),
        ([{"category": "spamblock", "text": "x"}], "unknown bounce category"),
        ([{"category": "spam_block"}], "at least one"),
        ([{"category": "spam_block", "text": "("}], "not a valid regex"),
        ([{"category": "spam_block", "text": ""}], "non-empty string"),
        ([{"category": "spam_block", "code": 550}], "non-empty string"),
        (["spam_block"], "expected a table"),
    ],
)
def test_rules_from_data_rejects_bad_config(items: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rules_from_data(items)  # type: ignore[arg-type]


def test_rules_from_data_names_the_offending_rule() -> None:
    with pytest.raises(ValueError, match="bounce rule 1"):
        rules_from_data([{"category": "spam_block", "text": "x"}, {"category": "nope", "text": "x"}])


# -- is_hard --------------------------------------------------------------------------------------


def test_hard_categories_are_the_dead_address_ones() -> None:
    assert HARD_CATEGORIES == {C.INVALID_RECIPIENT, C.BAD_DOMAIN, C.INACTIVE_MAILBOX}
    assert all(is_hard(c) for c in HARD_CATEGORIES)


@pytest.mark.parametrize("category", sorted(set(BounceCategory) - HARD_CATEGORIES))
def test_everything_else_is_soft(category: BounceCategory) -> None:
    assert not is_hard(category)
