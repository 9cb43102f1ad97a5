"""MAIL FROM / RCPT TO arguments: the fast path for plain addresses must quote exactly as
aiosmtplib does, and everything else must still go through aiosmtplib."""

from __future__ import annotations

import random

import pytest
from aiosmtplib.email import quote_address

from services.delivery.pipelining import command_line, quoted

ATEXT = "abcXYZ0189!#$%&'*+/=?^_`{|}~-"


def _atom(rng: random.Random, chars: str) -> str:
    return "".join(rng.choice(chars) for _ in range(rng.randint(1, 8)))


def test_plain_addresses_are_quoted_as_aiosmtplib_quotes_them() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        local = ".".join(_atom(rng, ATEXT) for _ in range(rng.randint(1, 3)))
        domain = ".".join(_atom(rng, "abz09-") for _ in range(rng.randint(1, 4)))
        address = f"{local}@{domain}"
        assert quoted(address) == quote_address(address) == f"<{address}>"


@pytest.mark.parametrize(
    "address",
    [
        "",
        "Jane Doe <jane@example.com>",
        '"john doe"@example.com',
        "jöhn@exämple.com",
        "a..b@example.com",
        ".a@example.com",
        "a@[192.0.2.1]",
        "postmaster",
        " spaced@example.com ",
    ],
)
def test_other_addresses_go_through_aiosmtplib(address: str) -> None:
    assert quoted(address) == quote_address(address)


@pytest.mark.parametrize("address", ["a@example.com>\r\nRSET", "a\r\n@example.com", "a@example.com\nDATA"])
def test_a_smuggled_command_never_reaches_the_line(address: str) -> None:
    line = command_line(b"RCPT TO:", address, [], "ascii")
    assert line == b"RCPT TO:" + quote_address(address).encode() + b"\r\n"
    assert b"\r" not in line[:-2] and b"\n" not in line[:-2]


def test_options_follow_the_address() -> None:
    assert command_line(b"MAIL FROM:", "a@example.com", ["SIZE=10"], "ascii") == (
        b"MAIL FROM:<a@example.com> SIZE=10\r\n"
    )
