"""One DSN per message also when its failures come from different stages: the router settles
a null-MX domain and a domain that does not exist itself (no delivery attempt), delivery gets a
5xx from a third domain's MX. The three jobs' notices join one window, and the sender gets one
DSN with one block per recipient, each with its own status and diagnostic type."""

from __future__ import annotations

import email

import pytest
from flufl.bounce import all_failures

from services.core.outcome import NO_SUCH_DOMAIN, NULL_MX
from tests.integration.bounce.conftest import hold_dsn_windows, wait_settled
from tests.support.relais import asubmit, message, wait_for_events

REJECT = "550 5.1.1 No such user here"
RECIPIENTS = ["n@nullmx.test", "x@nowhere.test", "bob@alpha.test"]


async def test_router_and_delivery_failures_of_one_message_share_one_dsn(
    make_stack, make_sink, zone, sender_mx, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window stays open until the three notices joined, however slow the machine: the test
    # is about what one window reports, not about its length.
    hold_dsn_windows(monkeypatch, len(RECIPIENTS))
    zone.add("nullmx.test", "MX", "0 .")
    make_sink("127.0.0.2").rcpt_default = REJECT
    stack = await make_stack(bounce={"dsn_window": 3.0})
    code, _ = await asubmit(stack.smtp_address, recipients=RECIPIENTS, data=message(subject="Mixed"))
    assert code == 250

    bounced = await wait_for_events(stack.config.nats.url, "bounced", 3)
    assert sorted(r for e in bounced for r in e.recipients) == sorted(RECIPIENTS)
    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    _, permanent = all_failures(parsed)
    assert permanent == {r.encode() for r in RECIPIENTS}
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    blocks = {str(b["Final-Recipient"]): b for b in status.get_payload()[1:]}
    assert {k: b["Status"] for k, b in blocks.items()} == {
        "rfc822; n@nullmx.test": NULL_MX.enhanced_status,
        "rfc822; x@nowhere.test": NO_SUCH_DOMAIN.enhanced_status,
        "rfc822; bob@alpha.test": "5.1.1",
    }
    assert all(b["Action"] == "failed" for b in blocks.values())
    diagnostic_types = {k: str(b["Diagnostic-Code"]).partition(";")[0] for k, b in blocks.items()}
    assert diagnostic_types == {
        "rfc822; n@nullmx.test": "x-relais",
        "rfc822; x@nowhere.test": "x-relais",
        "rfc822; bob@alpha.test": "smtp",
    }
    assert "Subject: Mixed" in dsn.data.decode()

    await wait_settled(stack.config.nats.url)
    assert len(sender_mx.messages) == 1, "no second DSN follows"
