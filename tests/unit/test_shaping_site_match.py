"""Which shaping site a job falls under when rules overlap: the most specific claim wins, and
an MX suffix matches whole labels however it is written."""

from __future__ import annotations

from services.delivery.shaping import default_shaping, merge, parse_shaping

# A customer domain hosted by Microsoft 365, with limits of its own.
HOSTED = "acme-test.mail.protection.outlook.com"


def test_an_operator_s_domain_rule_beats_a_built_in_mx_suffix() -> None:
    rules = merge(default_shaping(), parse_shaping('[site.acme]\ndomains = ["acme.test"]\nconnections = 2\n'))
    assert rules.site_for("outlook.com", "acme.test", HOSTED) == "acme"
    assert rules.site_for("microsoft", "acme.test", HOSTED) == "acme", "over the router's provider name too"
    assert rules.limits(rules.site_for("outlook.com", "acme.test", HOSTED)).connections == 2
    other = "other-test.mail.protection.outlook.com"
    assert rules.site_for("outlook.com", "other.test", other) == "microsoft"


def test_the_longest_mx_suffix_wins_whatever_the_rule_order() -> None:
    operator = parse_shaping('[site.acme]\nmx_suffixes = [".acme-test.mail.protection.outlook.com"]\n')
    rules = merge(default_shaping(), operator)
    assert rules.site_for("outlook.com", "acme.test", HOSTED) == "acme"
    assert rules.site_for("outlook.com", "b.test", "b-test.mail.protection.outlook.com") == "microsoft"


def test_an_mx_suffix_matches_whole_labels_with_or_without_dots() -> None:
    rules = parse_shaping(
        '[site.example]\nmx_suffixes = ["mx.example.test"]\n[site.other]\nmx_suffixes = [".Other.Test."]\n'
    )
    assert rules.site_for("mx.example.test", "a.test", "in1.mx.example.test") == "example"
    assert rules.site_for("example.test", "b.test", "in1.notmx.example.test") == "example.test", (
        "a host that only ends in the same letters is another provider"
    )
    assert rules.site_for("other.test", "c.test", "MX1.other.test.") == "other", "case and trailing dots"
