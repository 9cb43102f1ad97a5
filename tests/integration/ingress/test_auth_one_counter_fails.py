"""A right password whose attempt could be counted against only one of its two AUTH-failure
counters (per client IP, per username) leaves neither counted: the one JetStream acknowledged is
given back like any right password's.

An attempt is counted as failed before its password is checked. Before, when one counter failed
(a broker error) while the other succeeded, the attempt went on uncounted as far as the throttle
knew (the client was told 235, its login worked) but the acknowledged increment was never given
back: each such login was a failure on that counter, and a few of them with one typo locked the
owner's address (or, by username, the account from new addresses) out with 454 4.7.0.

The fault is real: the limits stream stops covering one counter kind's subjects, so JetStream
answers its increments with "no responders" while the other kind's still succeed.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from services.core.topology import LIMIT_KINDS, LIMITS_STREAM, PREFIX
from services.ingress.replies import AUTH_INVALID, AUTH_OK
from tests.integration.ingress.helpers import in_thread, plain, reply
from tests.support.relais import ACCOUNT, PASSWORD

LOCKOUT = 600.0
OWNER, NEW_ADDRESS = "127.0.0.31", "127.0.0.32"


@pytest.fixture
async def js(make_ingress: Callable[..., Any]) -> AsyncIterator[tuple[Any, JetStreamContext]]:
    """An ingress that locks an address or a username out after two failed AUTHs, and a
    JetStream client of its own."""
    stack = await make_ingress(ingress={"auth_max_failures": 2, "auth_lockout": LOCKOUT})
    nc = await nats.connect(stack.config.nats.url)
    try:
        yield stack, nc.jetstream()
    finally:
        await nc.close()


def _auth_plain_from(source: str, address: tuple[str, int], password: str) -> tuple[int, bytes]:
    with smtplib.SMTP(*address, timeout=15, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.test")
        return smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, password)}")


async def _limits_cover(js: JetStreamContext, kinds: tuple[str, ...]) -> None:
    info = await js.stream_info(LIMITS_STREAM)
    info.config.subjects = [f"{PREFIX}.limits.{kind}.>" for kind in kinds]
    await js.update_stream(info.config)


# Which counter fails, and where the owner then makes a typo and logs in: from the address it
# logged in from (locked by a leaked per-IP count), or from a new one (locked by the username's).
@pytest.mark.parametrize(
    ("failing", "later_from"),
    [("authfail-user", OWNER), ("authfail-ip", NEW_ADDRESS)],
    ids=["user-counter-fails", "ip-counter-fails"],
)
async def test_a_right_password_counted_on_one_counter_only_is_no_failure(
    js: tuple[Any, JetStreamContext], failing: str, later_from: str
) -> None:
    stack, client = js
    if time.time() % LOCKOUT > LOCKOUT - 20:  # the whole scenario inside one lockout window
        await asyncio.sleep(LOCKOUT - time.time() % LOCKOUT + 0.1)

    await _limits_cover(client, tuple(kind for kind in LIMIT_KINDS if kind != failing))
    # The throttle fails open: the right password logs in.
    assert await in_thread(_auth_plain_from, OWNER, stack.smtp_address, PASSWORD) == reply(AUTH_OK)
    await _limits_cover(client, LIMIT_KINDS)

    # One typo is one failure of the two allowed, not two: the right password still works.
    assert await in_thread(_auth_plain_from, later_from, stack.smtp_address, "typo") == reply(AUTH_INVALID)
    assert await in_thread(_auth_plain_from, later_from, stack.smtp_address, PASSWORD) == reply(AUTH_OK)
