"""Shaping rules as data: defaults, site matching, per-source overrides, push-back, rewrites."""

from __future__ import annotations

import pytest

from services.core.config import ConfigError
from services.core.outcome import Bounced, Deferred, Delivered, Reply
from services.delivery.shaping import Limits, default_shaping, merge, parse_shaping

OPERATOR = """
[default]
connections = 4

[site.google]
messages_per_minute = 120

[site.google.source."192.0.2.10"]
messages_per_minute = 6

[site.example]
domains = ["example.test"]
mx_suffixes = [".mx.example.test"]
messages_per_hour = 60
require_tls = true

[[pushback]]
name = "example-slow-down"
site = "example"
match = "slow down please"
duration = "2m"
messages_per_minute = 3

[[rewrite]]
name = "quota-is-final"
match = "5\\\\.2\\\\.2 quota exceeded for good"
outcome = "permanent"
"""


@pytest.fixture
def rules():
    return merge(default_shaping(), parse_shaping(OPERATOR))


def test_default_file_covers_the_big_providers_and_a_conservative_default() -> None:
    shaping = default_shaping()
    names = {rule.name for rule in shaping.sites}
    assert {"google", "microsoft", "yahoo", "apple"} <= names
    default = shaping.limits("unknown.example")
    assert default.connections > 0 and default.messages_per_connection > 0
    assert shaping.pushbacks and shaping.rewrites


def test_site_is_claimed_by_name_domain_or_mx_suffix(rules) -> None:
    assert rules.site_for("google") == "google"
    assert rules.site_for("gmail-smtp-in.l.google.com", "", "gmail-smtp-in.l.google.com") == "google"
    assert rules.site_for("mx1.mx.example.test", "other.test", "mx1.mx.example.test") == "example"
    assert rules.site_for("somewhere.test", "example.test") == "example"
    assert rules.site_for("mx.unknown.test", "unknown.test") == "mx.unknown.test"


def test_a_site_claims_its_domains_in_either_spelling() -> None:
    rules = parse_shaping('[site.books]\ndomains = ["Bücher.test"]\n')
    assert rules.site_for("mx.elsewhere.test", "xn--bcher-kva.test") == "books"
    assert rules.site_for("mx.elsewhere.test", "bücher.test.") == "books"


def test_limits_layer_default_site_and_source(rules) -> None:
    assert rules.limits("google").messages_per_minute == 120
    assert rules.limits("google").connections == 20, "the built-in google rule keeps its other fields"
    assert rules.limits("google", "192.0.2.10").messages_per_minute == 6
    assert rules.limits("elsewhere").connections == 4, "operator default over built-in default"
    assert rules.limits("example").require_tls is True


def test_message_interval_takes_the_stricter_of_minute_and_hour() -> None:
    assert Limits(messages_per_minute=60).message_interval() == 1.0
    assert Limits(messages_per_minute=60, messages_per_hour=60).message_interval() == 60.0
    assert Limits().message_interval() == 0.0
    assert Limits(new_connections_per_minute=30).connection_interval() == 2.0


def test_pushback_rules_match_in_order_and_per_site(rules) -> None:
    slow = Reply(421, "4.7.0", "slow down please", "RCPT")
    assert rules.pushback_for(slow, "example").name == "example-slow-down"
    assert rules.pushback_for(slow, "other").name != "example-slow-down"
    google = Reply(421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail", "DATA")
    rule = rules.pushback_for(google, "google")
    assert rule is not None and rule.name == "google-rate-limited" and rule.duration == 3600
    assert rules.pushback_for(Reply(451, "4.3.0", "Try again later", "DATA"), "x") is None, (
        "greylisting is no push-back"
    )
    assert rules.pushback_for(Reply(450, "4.2.1", "mailbox busy", "RCPT"), "x") is None


def test_an_address_echoed_in_a_reply_triggers_no_pushback(rules) -> None:
    # The recipient's name is the sender's to choose; the reply's own words still count.
    echoed = Reply(450, "4.2.0", "<throttle@x.test>: Recipient address rejected: Greylisted", "RCPT")
    assert rules.pushback_for(echoed, "x") is None
    google = Reply(450, "4.2.1", "<rate-limited@gmail.com>: try again later", "RCPT")
    assert rules.pushback_for(google, "google") is None
    throttled = Reply(450, "4.2.0", "<bob@x.test>: throttled, slow down", "RCPT")
    assert rules.pushback_for(throttled, "x").name == "generic-throttle"


def test_rewrite_turns_mailbox_full_into_a_deferral_and_respects_operator_rules(rules) -> None:
    full = Bounced("a@b.test", Reply(552, "5.2.2", "Mailbox full", "RCPT"))
    assert isinstance(rules.rewrite(full), Deferred)
    final = Bounced("a@b.test", Reply(552, "5.2.2", "quota exceeded for good", "RCPT"))
    assert isinstance(rules.rewrite(final), Bounced), "the operator's rule is tried first"
    other = Bounced("a@b.test", Reply(550, "5.1.1", "No such user", "RCPT"))
    assert rules.rewrite(other) is other
    ok = Delivered("a@b.test", Reply(250, "2.0.0", "mailbox full of joy", "DATA"))
    assert rules.rewrite(ok) is ok


@pytest.mark.parametrize(
    "text",
    [
        "[default]\nconection = 3\n",
        "[site.x]\nmessages_per_minut = 3\n",
        '[site.x.source."1.2.3.4"]\nrequire_tls = 1\n',
        '[[pushback]]\nduration = "1m"\n',
        '[[rewrite]]\nmatch = "x"\noutcome = "maybe"\n',
        '[[pushback]]\nmatch = "(unclosed"\n',
        "[defaults]\n",
        "[default]\nconnections = -1\n",
    ],
)
def test_bad_rules_are_rejected_naming_the_key(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_shaping(text)


def test_a_pushback_rate_must_slow_not_stop() -> None:
    with pytest.raises(ConfigError, match="messages_per_minute"):
        parse_shaping('[[pushback]]\nmatch = "slow down"\nmessages_per_minute = 0\n')
