"""A site rule's `mx_suffixes` and `domains` are lists of names: anything else is refused at load,
never read so that the rule claims nearly every site (and its limits and require_tls with it)."""

from __future__ import annotations

import pytest

from services.core.config import ConfigError
from services.delivery.shaping import parse_shaping


@pytest.mark.parametrize(
    "line",
    [
        'mx_suffixes = ".mx.example.test"',  # a string: read letter by letter, "t" ends most hosts
        'mx_suffixes = [".mx.example.test", ""]',  # "" ends every host name
        'mx_suffixes = ["."]',
        'domains = "example.test"',
        "domains = [1]",
    ],
)
def test_a_site_rule_s_names_must_be_a_list_of_names(line: str) -> None:
    with pytest.raises(ConfigError, match=r"site\.example\.(mx_suffixes|domains)"):
        parse_shaping(f"[site.example]\nrequire_tls = true\n{line}\n")


def test_listed_names_claim_only_their_sites() -> None:
    shaping = parse_shaping(
        '[site.example]\nmx_suffixes = [".mx.example.test"]\ndomains = ["example.test"]\n'
    )
    assert shaping.site_for("mx1.mx.example.test", "other.test", "mx1.mx.example.test") == "example"
    assert shaping.site_for("somewhere.test", "example.test") == "example"
    assert shaping.site_for("mx.alpha.test", "alpha.test", "mx.alpha.test") == "mx.alpha.test"
