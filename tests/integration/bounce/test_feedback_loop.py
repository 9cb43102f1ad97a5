"""An ARF (RFC 5965) report from a mailbox provider's feedback loop: a complaint event tied to
the original message and recipient, and the address suppressed for the account."""

from __future__ import annotations

from tests.integration.bounce.conftest import (
    FBL_ADDRESS,
    VERP,
    publish_inbound,
    suppression_entry,
    wait_settled,
)
from tests.support.bounce_samples import arf_report
from tests.support.relais import ACCOUNT, asubmit, message, wait_for_events


async def test_arf_report_creates_a_complaint_and_a_suppression(make_stack, make_sink) -> None:
    stack = await make_stack(bounce=VERP)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.4")
    assert (await asubmit(stack.smtp_address, recipients=["angry@gamma.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)
    (delivered,) = await wait_for_events(url, "delivered", 1)

    report = arf_report(to=FBL_ADDRESS, recipient="angry@gamma.test", return_path=sent.mail_from)
    await publish_inbound(url, report, [FBL_ADDRESS], sender="fbl@gamma.test")
    (complaint,) = await wait_for_events(url, "complained", 1)
    assert (complaint.message_id, complaint.account, complaint.recipients) == (
        delivered.message_id,
        ACCOUNT,
        ["angry@gamma.test"],
    )
    assert complaint.detail["feedback_type"] == "abuse" and complaint.detail["source"] == "fbl"
    entry = await suppression_entry(url, ACCOUNT, "angry@gamma.test")
    assert entry is not None and entry.reason == "complaint" and entry.source == delivered.message_id

    assert (await asubmit(stack.smtp_address, recipients=["angry@gamma.test"], data=message()))[0] == 250
    await wait_for_events(url, "suppressed", 1)
    await wait_settled(url)
    assert len(sink.messages) == 1
