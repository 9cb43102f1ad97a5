"""Security: bounces and reports that the VERP MAC does not vouch for change nothing."""

from __future__ import annotations

from services.core.returnpath import verp_address
from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM
from tests.integration.bounce.conftest import (
    FBL_ADDRESS,
    RETURN_DOMAIN,
    VERP,
    publish_inbound,
    suppression_entry,
    wait_consumed,
)
from tests.support.bounce_samples import arf_report, exim_bounce, postfix_dsn
from tests.support.relais import ACCOUNT, asubmit, message, read_events


async def test_forged_and_replayed_reports_change_nothing(make_stack, make_sink) -> None:
    stack = await make_stack(bounce=VERP)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    # A real message whose recipient learns its Return-Path...
    assert (await asubmit(stack.smtp_address, recipients=["insider@alpha.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)
    forged = verp_address(
        prefix="b",
        domain=RETURN_DOMAIN,
        secret="guessed-secret-000000",
        account=ACCOUNT,
        message_id="0192a3b4c5d6e7f8091a2b3",
        recipients=["victim@alpha.test"],
    )
    attacks = [
        # a token minted with the wrong secret
        (postfix_dsn(to=forged, recipient="victim@alpha.test"), [forged]),
        # ...and reuses it to name someone else
        (postfix_dsn(to=sent.mail_from, recipient="victim@alpha.test"), [sent.mail_from]),
        # a complaint about someone else with the real token
        (
            arf_report(to=FBL_ADDRESS, recipient="victim@alpha.test", return_path=sent.mail_from),
            [FBL_ADDRESS],
        ),
        # a bounce to a plain local address, no token at all
        (
            postfix_dsn(to=f"postmaster@{RETURN_DOMAIN}", recipient="victim@alpha.test"),
            [f"postmaster@{RETURN_DOMAIN}"],
        ),
    ]
    for raw, rcpts in attacks:
        await publish_inbound(url, raw, rcpts)
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)

    events = await read_events(url)
    assert not [e for e in events if e.kind in ("bounced", "complained")]
    assert await suppression_entry(url, ACCOUNT, "victim@alpha.test") is None
    assert await suppression_entry(url, ACCOUNT, "insider@alpha.test") is None


async def test_a_message_the_parsers_choke_on_is_dropped_not_redelivered_forever(make_stack) -> None:
    # Port 25 takes mail from anyone: a message that makes parsing raise must not come back for
    # ever (a retry cannot mend it), nor stop the reports behind it.
    stack = await make_stack(bounce=VERP)
    url = stack.config.nats.url
    to = f"postmaster@{RETURN_DOMAIN}"
    unknown_codec = exim_bounce(to=to, recipient="x@alpha.test").replace(
        b"Auto-Submitted:", b"Content-Type: text/plain; charset=idna\r\nAuto-Submitted:"
    )
    nested = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(1200)
    )
    for raw in (unknown_codec, nested):
        await publish_inbound(url, raw, [to])
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)
    assert not [e for e in await read_events(url) if e.kind in ("bounced", "complained")]
