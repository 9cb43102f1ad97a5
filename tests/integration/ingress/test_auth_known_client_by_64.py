"""The per-user AUTH lock spares an address that logged in as the user recently; for IPv6 that is
its /64, as every other AUTH count is. A client with temporary addresses (RFC 8981, the default
on desktops and phones) writes from a new one each day, or sooner: spared only at the exact
address, its owner would be locked out by anyone's guesses, while a guesser inside that /64
gains nothing from the /64 being known (its failures are counted per /64 anyway)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.ingress.replies import AUTH_INVALID, AUTH_OK, AUTH_THROTTLED
from tests.integration.ingress.helpers import in_thread
from tests.integration.ingress.test_auth_client_forms import LOCKOUT, _guess, proxied  # noqa: F401
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, PASSWORD


async def test_the_owner_s_64_is_spared_at_a_new_address(
    proxied: tuple[Any, tuple[str, int]],  # noqa: F811
    pki: TestPKI,
) -> None:
    _, address = proxied  # auth_max_failures = 2
    tls = pki.client_context()
    if time.time() % LOCKOUT > LOCKOUT - 15:  # the whole scenario inside one lockout window
        await asyncio.sleep(LOCKOUT - time.time() % LOCKOUT + 0.1)

    owner = await in_thread(_guess, address, tls, "2001:db8:1:2::1", ACCOUNT, PASSWORD)
    assert owner == str(AUTH_OK).encode(), owner
    for guesser in ("2001:db8:9::1", "2001:db8:a::1"):  # two /64s, two guesses: the user is locked
        answer = await in_thread(_guess, address, tls, guesser, ACCOUNT)
        assert answer == str(AUTH_INVALID).encode(), answer

    # The owner's machine, with the temporary address it has moved to since.
    owner = await in_thread(_guess, address, tls, "2001:db8:1:2:8d1e:44ff:fe21:9a07", ACCOUNT, PASSWORD)
    assert owner == str(AUTH_OK).encode(), owner
    # A /64 never seen with this user stays locked, right password or not.
    stranger = await in_thread(_guess, address, tls, "2001:db8:b::1", ACCOUNT, PASSWORD)
    assert stranger == str(AUTH_THROTTLED).encode(), stranger
