"""Delivery's own "every MX host missing" bounce is classified as a bad domain."""

from __future__ import annotations

from services.bounce.classify import BounceCategory, classify
from services.delivery.sending import host_not_found


def test_our_own_host_not_found_bounce_is_a_bad_domain_not_an_unknown_user() -> None:
    # Delivery's reply when every MX host of a domain is NXDOMAIN says "... does not exist",
    # which the recipient rules read as "user unknown": the event and metrics blamed the mailbox
    # for the domain's DNS. Postfix's wording for the same case is already a bad domain.
    reply = host_not_found(["mx1.gone.test", "mx2.gone.test"])
    assert classify(reply.code, reply.enhanced_status, reply.text) is BounceCategory.BAD_DOMAIN


def test_our_own_no_address_bounce_is_a_bad_domain_too() -> None:
    reply = host_not_found(["mx1.gone.test"], ["mx2.gone.test"])
    assert reply.text.startswith("Host not found: MX host mx1.gone.test does not exist; MX host mx2")
    assert classify(reply.code, reply.enhanced_status, reply.text) is BounceCategory.BAD_DOMAIN
