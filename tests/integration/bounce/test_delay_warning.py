"""A message still undelivered after retry.delay_warning_after gets one "delayed" DSN
(RFC 3464 action delayed, 4.x.x status, Will-Retry-Until), unless NOTIFY excludes DELAY."""

from __future__ import annotations

import email

from services.bounce.dsn import SUBJECT_DELAYED
from services.core.envelope import BodyRef, Envelope, new_message_id
from tests.integration.bounce.conftest import publish_submission, wait_settled
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, asubmit, message, wait_for_events

RETRY = {"base_delay": 1.0, "max_delay": 1.0, "jitter": 0.0, "max_age": 3600.0, "delay_warning_after": 0.5}


async def test_one_delay_warning_while_retries_go_on(make_stack, make_sink, sender_mx) -> None:
    stack = await make_stack(retry=RETRY)
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 100
    assert (await asubmit(stack.smtp_address, recipients=["slow@alpha.test"], data=message()))[0] == 250
    (dsn,) = await sender_mx.async_wait_for(1, timeout=30)
    parsed = email.message_from_bytes(dsn.data)
    assert parsed["Subject"] == SUBJECT_DELAYED
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    (block,) = status.get_payload()[1:]
    assert block["Action"] == "delayed" and block["Status"].startswith("4.")
    assert block["Will-Retry-Until"] is not None
    # Two more retries, then their notices (if any), windows and DSNs are through.
    url = stack.config.nats.url
    deferred = len(await wait_for_events(url, "deferred", 1))
    await wait_for_events(url, "deferred", deferred + 2)
    await wait_settled(url, retries=False)
    assert len(sender_mx.messages) == 1, "one warning, not one per retry"
    assert sink.messages == []


async def test_notify_failure_only_gets_no_delay_warning(make_stack, make_sink, sender_mx) -> None:
    stack = await make_stack(retry=RETRY)
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 100
    data = message()
    env = Envelope(
        id=new_message_id(),
        sender=f"news@{SENDER_DOMAIN}",
        recipients=("slow@alpha.test",),
        account=ACCOUNT,
        sender_domain=SENDER_DOMAIN,
        body=BodyRef(size=len(data), inline=data),
        dsn_notify={"slow@alpha.test": "FAILURE"},
    )
    await publish_submission(stack.config.nats.url, env)
    await wait_for_events(stack.config.nats.url, "deferred", 3)  # warned at the second, were it due
    await wait_settled(stack.config.nats.url, retries=False)
    assert sender_mx.messages == []
