"""Security regression: a stored hash whose digest was cut short (a copy that lost its tail, a
hand-made record) must not turn into a password that many guesses match. A digest of one octet
matches one wrong password in 256; the check refuses any digest shorter than the 32 octets
`hash_password` writes, rather than accept a wrong password."""

from __future__ import annotations

import base64

import pytest

from services.core.accounts import hash_password, verify_password

RIGHT = "the right password"
# The scrypt digest of RIGHT under this salt, cut to its first octet; "guess-344" has the same one.
ONE_OCTET = "scrypt$16384$8$1$cmVsYWlzLXJldmlldy1zYWx0$tQ=="
COLLIDING_GUESS = "guess-344"


def test_a_digest_cut_to_one_octet_accepts_no_wrong_password() -> None:
    assert not verify_password(COLLIDING_GUESS, ONE_OCTET)


@pytest.mark.parametrize("octets", [1, 4, 16, 31])
def test_every_digest_shorter_than_hash_password_s_is_refused(octets: int) -> None:
    scheme, n, r, p, salt, digest = hash_password(RIGHT).split("$")
    short = base64.b64encode(base64.b64decode(digest)[:octets]).decode()
    assert not verify_password(RIGHT, "$".join([scheme, n, r, p, salt, short]))


def test_a_whole_hash_still_verifies() -> None:
    encoded = hash_password(RIGHT)
    assert verify_password(RIGHT, encoded) and not verify_password(COLLIDING_GUESS, encoded)
