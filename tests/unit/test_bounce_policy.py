"""RFC 3461 parameters and suppression policy for synchronous failures."""

from __future__ import annotations

import pytest

from services.bounce.classify import DEFAULT_RULES, BounceCategory, is_hard
from services.bounce.policy import (
    category_of,
    envelope_id,
    failure_category,
    original_recipient,
    returns_full,
    suppresses,
)
from services.core.disposition import expiry_reply
from services.core.envelope import Envelope, dsn_recipients, notify_of, wants_dsn
from services.core.outcome import EXPIRED, NO_ROUTE, NO_SUCH_DOMAIN, Bounced, Reply
from tests.support.relais import an_envelope

USER_UNKNOWN = Reply(550, "5.1.1", "<a@x.test>: Recipient address rejected: User unknown", "RCPT")
MAILBOX_FULL = Reply(552, "5.2.2", "Mailbox full", "RCPT")
GREYLISTED = Reply(450, "4.2.0", "Greylisted, try again later", "RCPT")


def env(**changes: object) -> Envelope:
    fields = {"body": b"x", "id": "m1", "sender": "s@acme.test"} | changes
    return an_envelope("a@x.test", "b@x.test", "c@x.test", **fields)  # type: ignore[arg-type]


def test_notify_never_and_success_only_get_no_failure_dsn() -> None:
    e = env(dsn_notify={"a@x.test": "NEVER", "b@x.test": "SUCCESS", "c@x.test": "FAILURE"})
    assert dsn_recipients(e, list(e.recipients), action="failed") == ["c@x.test"]
    assert notify_of(e, "a@x.test") == frozenset()


def test_no_notify_means_failure_and_delay() -> None:
    e = env()
    assert dsn_recipients(e, ["a@x.test"], action="failed") == ["a@x.test"]
    assert dsn_recipients(e, ["a@x.test"], action="delayed") == ["a@x.test"]
    assert dsn_recipients(env(dsn_notify={"a@x.test": "FAILURE"}), ["a@x.test"], action="delayed") == []


def test_never_a_dsn_to_the_null_sender_or_about_a_dsn() -> None:
    assert not wants_dsn(env(sender=""))
    assert not wants_dsn(env(kind="dsn"))
    assert dsn_recipients(env(sender=""), ["a@x.test"], action="failed") == []


def test_orcpt_envid_and_ret() -> None:
    e = env(dsn_orcpt={"a@x.test": "rfc822;A@X.test"}, dsn_ret="FULL", dsn_envid="campaign-42")
    assert original_recipient(e, "a@x.test") == "rfc822;A@X.test"
    assert original_recipient(e, "b@x.test") is None
    assert envelope_id(e) == "campaign-42"
    assert envelope_id(env()) is None
    assert returns_full(e, default_full=False)
    assert not returns_full(env(dsn_ret="HDRS"), default_full=True)
    assert returns_full(env(), default_full=True)


def failed(reply: Reply, *, expired: bool = False) -> Bounced:
    return Bounced("a@x.test", reply, expired=expired)


def test_only_hard_permanent_failures_of_sender_mail_suppress() -> None:
    e = env()
    assert category_of(USER_UNKNOWN, DEFAULT_RULES) is BounceCategory.INVALID_RECIPIENT
    assert suppresses(e, failed(USER_UNKNOWN), category_of(USER_UNKNOWN, DEFAULT_RULES))
    assert suppresses(e, failed(NO_SUCH_DOMAIN), category_of(NO_SUCH_DOMAIN, DEFAULT_RULES))
    assert not suppresses(e, failed(MAILBOX_FULL), category_of(MAILBOX_FULL, DEFAULT_RULES))
    assert not suppresses(e, failed(EXPIRED), category_of(EXPIRED, DEFAULT_RULES))
    assert not suppresses(e, failed(GREYLISTED), BounceCategory.INVALID_RECIPIENT), "a 4xx never suppresses"
    assert not suppresses(env(kind="dsn"), failed(USER_UNKNOWN), BounceCategory.INVALID_RECIPIENT)


@pytest.mark.parametrize(
    "last", [NO_ROUTE, Reply(450, "4.1.1", "<a@x.test>: Recipient address rejected: User unknown", "RCPT")]
)
def test_an_expiry_is_message_expired_and_never_suppresses(last: Reply) -> None:
    expiry = failed(expiry_reply(last), expired=True)
    assert is_hard(category_of(expiry.reply, DEFAULT_RULES)), "the last reply's text alone reads as hard"
    assert failure_category(expiry, DEFAULT_RULES) is BounceCategory.MESSAGE_EXPIRED
    assert not suppresses(env(), expiry, BounceCategory.INVALID_RECIPIENT)
    assert failure_category(failed(USER_UNKNOWN), DEFAULT_RULES) is BounceCategory.INVALID_RECIPIENT


@pytest.mark.parametrize(
    "bad", ["rfc822;a@x.test\r\nBcc: victim@y.test", "rfc822;a@x.test\n", "rfc822;bö@x.test"]
)
def test_an_orcpt_or_envid_that_is_not_printable_ascii_is_left_out(
    bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    e = env(dsn_orcpt={"a@x.test": bad}, dsn_envid=bad)
    assert original_recipient(e, "a@x.test") is None
    assert envelope_id(e) is None
    assert "not printable US-ASCII" in caplog.text


def test_automatic_suppressions_expire_only_when_configured() -> None:
    from services.bounce.policy import suppression_expiry
    from services.core.config import BounceConfig

    assert suppression_expiry(BounceConfig(), now=1000.0) == 0.0
    assert suppression_expiry(BounceConfig(suppression_expiry=86400.0), now=1000.0) == 87400.0


def test_a_delay_report_always_carries_a_4xx_status() -> None:
    from services.bounce.service import _status_for

    assert _status_for("4.4.1", delayed=True) == "4.4.1"
    assert _status_for("5.2.2", delayed=True) == "4.2.2"
    assert _status_for("5.1.1", delayed=False) == "5.1.1"


def test_config_rules_are_checked_by_validate_and_tried_first() -> None:
    import pytest

    from services.bounce.classify import classify, rules_from_data
    from services.core.config import BounceConfig, Config, ConfigError, validate

    with pytest.raises(ConfigError, match=r"rules\[0\]\.text"):
        validate(Config(bounce=BounceConfig(rules=[{"category": "spam_block", "text": "(unclosed"}])))
    rules = rules_from_data([{"category": "spam_block", "text": "rejected by acme policy"}]) + DEFAULT_RULES
    assert classify(550, "5.1.1", "User unknown, rejected by acme policy", rules) is BounceCategory.SPAM_BLOCK


def test_only_notify_success_asks_for_a_relayed_dsn() -> None:
    e = env(dsn_notify={"a@x.test": "SUCCESS", "b@x.test": "SUCCESS,FAILURE", "c@x.test": "NEVER"})
    assert dsn_recipients(e, list(e.recipients), action="relayed") == ["a@x.test", "b@x.test"]
    assert dsn_recipients(env(), ["a@x.test"], action="relayed") == [], "the default is FAILURE,DELAY"


def test_a_recipient_captured_in_the_local_mailbox_was_delivered_not_relayed() -> None:
    from services.bounce.service import _action
    from services.core.outcome import LOCAL_MAILBOX, Delivered

    ok = Reply(250, "2.0.0", "Ok", "DATA")
    assert _action(Delivered("a@x.test", ok, LOCAL_MAILBOX), delayed=False) == "delivered"
    assert _action(Delivered("a@x.test", ok, "mx.x.test"), delayed=False) == "relayed"
