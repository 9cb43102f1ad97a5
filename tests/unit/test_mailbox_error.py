"""`mailbox_error`: what an operator's command refuses as no mail address, and what it must take
(every form the ingress accepts for a recipient)."""

from __future__ import annotations

import pytest

from services.core.addresses import mailbox_error


@pytest.mark.parametrize(
    "address",
    [
        "ann@alpha.test",
        "Ann+tag@Alpha.Test",
        "x@alpha.test.",  # the root's dot, as `<x@alpha.test.>` is taken
        "jöran@bücher.test",  # SMTPUTF8
        "δοκιμή@παράδειγμα.δοκιμή",
        '"john doe"@alpha.test',
        '"a@b"@alpha.test',
        "x@[192.0.2.1]",
    ],
)
def test_addresses_pass(address: str) -> None:
    assert mailbox_error(address) == ""


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("", "'@'"),
        ("nobody", "'@'"),
        ("@alpha.test", "local part"),
        ("x@", "domain"),
        ("x@.", "domain"),
        ("x@alpha..test", "domain"),
        ("x\t@alpha.test", "control character"),
        ("x@alpha.test\r\nRCPT TO:<y@beta.test>", "control character"),
        ("x\u00a0y@alpha.test", "control character"),  # a no-break space is no space to quote
        ("a b@alpha.test", "space"),
        ("x@alpha .test", "space"),
        ("a@b@alpha.test", "'@'"),
    ],
)
def test_what_is_no_address_says_why(address: str, says: str) -> None:
    assert says in mailbox_error(address)
