"""A client that hangs up while its password is being checked (a client-side timeout while scrypt
waits for a slot, a bulk sender's worker killed) must neither count as a failed guess nor take
the check away from other sessions sharing it. Were it counted, the owner would lock himself out
with as few drops as `auth_max_failures` (the right password is counted until it is refunded);
were the check taken away, every connection of a burst logging in at once would be dropped with
the one that left."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.ingress import auth
from services.ingress.auth import PasswordChecker
from services.ingress.replies import AUTH_OK
from tests.integration.ingress.helpers import client, ehlo_auth, in_thread, plain, read_replies, reply, settle
from tests.support.relais import ACCOUNT, PASSWORD


class HeldChecks:
    """scrypt held until `release`, and how many password checks sessions have asked for."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.asked = 0


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldChecks]:
    checks = HeldChecks()
    real_verify = auth.verify_password
    real_check = PasswordChecker.check

    def verify(password: str, encoded: str) -> bool:
        checks.entered.set()
        checks.release.wait(60)  # bounded only so that a broken test cannot hang the run
        return real_verify(password, encoded)

    async def check(self: PasswordChecker, *args: Any, **kwargs: Any) -> bool | None:
        checks.asked += 1  # counted before the check looks for one to share
        return await real_check(self, *args, **kwargs)

    monkeypatch.setattr(auth, "verify_password", verify)
    monkeypatch.setattr(PasswordChecker, "check", check)
    try:
        yield checks
    finally:
        checks.release.set()


def _auth(address: tuple[str, int]) -> tuple[int, bytes]:
    with client(address) as smtp:
        return smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")


async def _hang_up_during_the_check(ingress: Any, sock: socket.socket, staying: int = 0) -> None:
    """Close `sock` and wait until the ingress has seen it go (`staying`: connections left)."""
    sock.close()
    gate = ingress.ingress.gate
    assert await settle(lambda: gate.open_connections("127.0.0.1") == staying)


async def test_a_client_leaving_during_the_check_is_no_failed_guess(
    make_ingress: Callable[..., Any], held: HeldChecks
) -> None:
    ingress = await make_ingress(ingress={"auth_max_failures": 1, "auth_lockout": 600.0})
    sock = socket.create_connection(ingress.smtp_address, timeout=10)
    sock.sendall(ehlo_auth())
    assert await asyncio.to_thread(held.entered.wait, 30)
    await _hang_up_during_the_check(ingress, sock)
    held.release.set()
    # The right password, from the same address: not locked out by the one that left.
    for _ in range(50):
        if await in_thread(_auth, ingress.smtp_address) == reply(AUTH_OK):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the owner's address is locked out")


async def test_sessions_sharing_a_check_keep_it_when_the_first_leaves(
    make_ingress: Callable[..., Any], held: HeldChecks
) -> None:
    ingress = await make_ingress()
    first = socket.create_connection(ingress.smtp_address, timeout=10)
    second = socket.create_connection(ingress.smtp_address, timeout=10)
    try:
        first.sendall(ehlo_auth())
        assert await asyncio.to_thread(held.entered.wait, 30)
        second.sendall(ehlo_auth())
        assert await settle(lambda: held.asked == 2)  # the second shares the first's check
        await _hang_up_during_the_check(ingress, first, staying=1)
        held.release.set()
        replies = await asyncio.to_thread(read_replies, second, 3)
        assert replies[-1:] == [f"{AUTH_OK.code} {AUTH_OK.enhanced_status} {AUTH_OK.text}".encode()]
    finally:
        second.close()
