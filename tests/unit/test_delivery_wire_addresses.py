"""RFC 6531: only a non-ASCII local part has no ASCII form; an internationalised domain goes as
A-labels to a server without SMTPUTF8."""

from __future__ import annotations

import pytest

from services.delivery.wire_addresses import ascii_form


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("ann@b.test", "ann@b.test"),
        ("Ann@B.Test", "Ann@B.Test"),  # an ASCII address goes exactly as given
        ("jo@bücher.test", "jo@xn--bcher-kva.test"),
        ("Jo@Bücher.Test", "Jo@xn--bcher-kva.test"),  # the local part keeps its case
        ('"a@b"@münchen.test', '"a@b"@xn--mnchen-3ya.test'),
        ("jöran@b.test", None),
        ("jöran@bücher.test", None),
        ("bücher", None),
    ],
)
def test_ascii_form(address: str, expected: str | None) -> None:
    assert ascii_form(address) == expected
