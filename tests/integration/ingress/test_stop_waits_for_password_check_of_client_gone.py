"""A replica stopping (rolling update) while a password check goes on: `stop()` waits for it before
NATS is closed, so a right password's attempt, counted as a failed guess before scrypt, is
refunded rather than left counted.

The drain ends a session in AUTH at once (it is between transactions: `421 4.3.2`), but its check
runs on in a task of its own (`PasswordChecker`), shared with any session sending the same
credentials. Before, `stop()` did not wait for it: the refund met a closed connection, and the
owner's address stayed one failure nearer its lockout on every replica (with
`auth_max_failures = 1`, locked out for the window by one login during a rolling update).

The client, the ingress and nats-server are real. Only the moment is arranged: scrypt is held
until `stop()` either returned and closed the bus (what happened before) or says it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from services.ingress.replies import AUTH_OK
from tests.integration.ingress.helpers import ehlo_auth, in_thread, reply
from tests.integration.ingress.test_auth_client_leaves_during_check import (  # noqa: F401 - fixture
    HeldChecks,
    _auth,
    held,
)
from tests.integration.ingress.test_stop_waits_for_hand_off_of_client_gone import (  # noqa: F401 - fixture
    _WaitingForSessions,
    stop_until_it_waits,
    stop_waiting,
)

ONE_FAILURE_LOCKS = {"auth_max_failures": 1, "auth_lockout": 600.0}


async def test_stop_waits_for_the_password_check_of_a_client_that_left(
    make_ingress: Callable[..., Any],
    held: HeldChecks,  # noqa: F811 - the imported fixture
    stop_waiting: _WaitingForSessions,  # noqa: F811 - the imported fixture
) -> None:
    stack = await make_ingress(ingress=ONE_FAILURE_LOCKS)
    sock = socket.create_connection(stack.smtp_address, timeout=10)
    try:
        sock.sendall(ehlo_auth())  # the right password
        assert await asyncio.to_thread(held.entered.wait, 30), "the password was never checked"

        # The replica stops as `relais ingress` does: the service, then its NATS connection.
        stopping = await stop_until_it_waits(stack, stop_waiting)
    finally:
        held.release.set()
        with contextlib.suppress(OSError):
            sock.close()
    await asyncio.wait_for(stopping, 30)

    # The right password, from the same address, on another replica: not locked out.
    other = await make_ingress(ingress=ONE_FAILURE_LOCKS)
    assert await in_thread(_auth, other.smtp_address) == reply(AUTH_OK), "the owner's address is locked out"
