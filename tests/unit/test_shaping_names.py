"""Names in a shaping file are written as operators write them: a site with a trailing dot, a
source IPv6 address in capitals or with its zeros spelt out. Each used to be kept as written,
so the rule silently never applied (its site and source never compared equal), and a typo that
is no address at all was taken without a word."""

from __future__ import annotations

import pytest

from services.core.config import ConfigError
from services.core.outcome import Reply
from services.delivery.shaping import parse_shaping


def test_a_site_written_with_a_trailing_dot_is_that_site() -> None:
    rules = parse_shaping('[site."Mx.Example.Test."]\nconnections = 3\n')
    assert rules.limits("mx.example.test").connections == 3


def test_a_pushback_for_a_site_written_with_a_trailing_dot_applies_to_it() -> None:
    rules = parse_shaping('[[pushback]]\nmatch = "slow down"\nsite = "Example.Test."\n')
    assert rules.pushback_for(Reply(421, "4.7.0", "slow down"), "example.test") is not None


@pytest.mark.parametrize("written", ["2001:DB8::1", "2001:0db8:0000::0001", "2001:db8::1"])
def test_a_source_address_is_one_address_however_it_is_spelt(written: str) -> None:
    rules = parse_shaping(
        f'[site.example]\nconnections = 5\n[site.example.source."{written}"]\nconnections = 1\n'
    )
    assert rules.limits("example", "2001:db8::1").connections == 1
    assert rules.limits("example", "2001:DB8:0::1").connections == 1, "the pool may spell it otherwise"
    assert rules.limits("example", "2001:db8::2").connections == 5


def test_a_source_that_is_no_address_is_refused() -> None:
    with pytest.raises(ConfigError, match="source"):
        parse_shaping('[site.example.source."10.0.0.300"]\nconnections = 1\n')
