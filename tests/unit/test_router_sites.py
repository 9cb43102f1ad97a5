"""Site rollup: MX host patterns, and the registrable-domain fallback."""

from __future__ import annotations

from services.core.config import SiteConfig
from services.router.sites import SiteRules, registrable, site_for

RULES = SiteRules.from_config(
    {
        "google": SiteConfig(mx=["*.google.com", "*.googlemail.com"]),
        "outlook": SiteConfig(mx=["*.mail.protection.outlook.com"]),
        "special": SiteConfig(mx=["mx.special.test"]),
        "deeper": SiteConfig(mx=["*.eu.google.com"]),
    }
)


def test_suffix_patterns_match_any_host_below_them() -> None:
    assert RULES.match("aspmx.l.google.com") == "google"
    assert RULES.match("ALT1.ASPMX.L.GOOGLE.COM.") == "google"
    assert RULES.match("example-com.mail.protection.outlook.com") == "outlook"
    assert RULES.match("google.com") is None, "*.x matches hosts under x, not x itself"
    assert RULES.match("notgoogle.com") is None


def test_the_longest_suffix_wins() -> None:
    assert RULES.match("mx.eu.google.com") == "deeper"


def test_exact_patterns_match_one_host() -> None:
    assert RULES.match("mx.special.test") == "special"
    assert RULES.match("mx2.special.test") is None


def test_domains_sharing_a_provider_get_one_site() -> None:
    a = site_for("a.test", ("aspmx.l.google.com", "alt1.aspmx.l.google.com"), ("aspmx.l.google.com",), RULES)
    b = site_for("b.test", ("alt2.aspmx.l.google.com",), ("alt2.aspmx.l.google.com",), RULES)
    assert a == b == "google"


def test_a_rule_matching_a_backup_mx_still_names_the_site() -> None:
    assert site_for("c.test", ("mx.c.test", "alt1.aspmx.l.google.com"), ("mx.c.test",), RULES) == "google"


def test_fallback_is_the_registrable_domain_of_the_primary_mx() -> None:
    hosts = ("mx2.hoster.test", "mx1.hoster.test")
    assert site_for("d.test", hosts, ("mx1.hoster.test", "mx2.hoster.test"), RULES) == "hoster.test"
    assert site_for("e.test", ("mx.e.test",), (), RULES) == "e.test"
    assert site_for("f.test", (), (), RULES) == "f.test"


def test_registrable_handles_second_level_country_suffixes_and_ip_literals() -> None:
    assert registrable("mx1.mail.example.co.uk") == "example.co.uk"
    assert registrable("mx.example.com.au") == "example.com.au"
    assert registrable("mx.example.de") == "example.de"
    assert registrable("localhost") == "localhost"
    assert registrable("127.0.0.5") == "127.0.0.5"
    assert registrable("[2001:db8::1]") == "2001:db8::1"
