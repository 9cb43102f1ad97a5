"""Outcome events number the attempt that decided them from 1, whichever service decided."""

from __future__ import annotations

from tests.integration.router.test_suppression import _suppress
from tests.support.relais import SENDER_DOMAIN, asubmit, message, wait_for_events


async def test_a_recipient_suppressed_on_the_first_pass_is_attempt_one(make_stack, make_sink) -> None:
    # As a job the router bounces itself on that pass (no MX: attempt 1), and as a delivery
    # on the first try: attempt 0 read as "before any attempt" and `relais message` left it out.
    stack = await make_stack()
    url = stack.config.nats.url
    await _suppress(url, ("s@alpha.test", "manual"))
    make_sink("127.0.0.2")
    code, _ = await asubmit(
        stack.smtp_address,
        sender=f"news@{SENDER_DOMAIN}",
        recipients=["s@alpha.test", "x@no-such-domain.test"],
        data=message(),
    )
    assert code == 250
    (suppressed,) = await wait_for_events(url, "suppressed", 1)
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert bounced.attempt == 1
    assert suppressed.attempt == 1
