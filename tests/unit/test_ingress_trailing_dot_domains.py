"""`without_root_dot`: one trailing dot after a domain's last label is dropped from a MAIL/RCPT
argument before it is parsed; every other form is left for the parser to refuse as before."""

from __future__ import annotations

import pytest

from services.ingress.commands import plain_angle_addr, without_root_dot


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<a@example.com.>", "<a@example.com>"),
        ("<a@example.com.> SIZE=10 BODY=8BITMIME", "<a@example.com> SIZE=10 BODY=8BITMIME"),
        ("<a@Example.COM.>", "<a@Example.COM>"),
        ("<ü@bücher.test.>", "<ü@bücher.test>"),  # SMTPUTF8: still for aiosmtpd's parser
        ('<"a b"@example.com.>', '<"a b"@example.com>'),
        ("<a@example..com.>", "<a@example..com>"),  # the empty label is still there to refuse
        ("<a@example.com>", "<a@example.com>"),
        ("<a@example.com> X=a.>", "<a@example.com> X=a.>"),  # a dot in the parameters stays
        ("a@example.com.", "a@example.com"),  # without <>, as aiosmtpd and Postfix take it
        ("a@example.com. SIZE=10", "a@example.com SIZE=10"),
        ("a@example.com SIZE=1.", "a@example.com SIZE=1."),
    ],
)
def test_one_dot_after_a_label_is_dropped(arg: str, expected: str) -> None:
    assert without_root_dot(arg) == expected


@pytest.mark.parametrize(
    "arg",
    [
        "<a@example.com..>",
        "<a@.>",
        "<a@[192.0.2.1].>",  # an address literal
        "<postmaster.>",
        "<a.@example.com>",
        "<>",
        "a@example.com..",
        "a@.",
        "a@[192.0.2.1].",
        "postmaster.",
        "a@example.com.>",  # an unbalanced bracket is the parser's to refuse
    ],
)
def test_other_dots_are_left_for_the_parser(arg: str) -> None:
    assert without_root_dot(arg) == arg


def test_the_plain_address_is_the_one_without_the_dot() -> None:
    assert plain_angle_addr(without_root_dot("<news@acme.test.> SIZE=1")) == ("news@acme.test", "SIZE=1")
