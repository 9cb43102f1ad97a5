"""domain_key spells a domain as the DNS is asked for it: one domain, one key, never another's."""

from __future__ import annotations

import pytest

from services.core.addresses import domain_key, recipient_key
from services.core.dns import to_ascii


@pytest.mark.parametrize(
    "domain", ["faß.de", "βόλος.gr", "Bücher.test", "bücher.test.", "xn--bcher-kva.test", "مثال.test"]
)
def test_the_key_is_the_name_the_resolver_asks_for(domain: str) -> None:
    assert domain_key(domain) == to_ascii(domain)


def test_a_sharp_s_is_not_folded_into_another_registered_domain() -> None:
    # IDNA 2003 (Python's own codec) turns faß.de into fass.de, a different domain: its MX would
    # be asked, and an MX without SMTPUTF8 would have been given jo@fass.de.
    assert domain_key("faß.de") == "xn--fa-hia.de" != domain_key("fass.de")
    assert recipient_key("jo@faß.de") != recipient_key("jo@fass.de")


def test_a_name_idna_refuses_is_only_lower_cased() -> None:
    assert domain_key("☃.TEST") == "☃.test"
