"""MX preference, failover, implicit MX, and the DNS answers that mean "never" (null MX, NXDOMAIN)."""

from __future__ import annotations

import email

from flufl.bounce import all_failures

from tests.support.relais import RelaisStack, asubmit, message, wait_for_events


async def test_preferred_mx_refusing_connections_fails_over_to_next(
    stack: RelaisStack, zone, make_sink
) -> None:
    # 127.0.0.5 has nothing listening: connections are refused, so delivery must try mx2.
    zone.add("failover.test", "MX", "10 mx1.failover.test.", "20 mx2.failover.test.")
    zone.add("mx1.failover.test", "A", "127.0.0.5")
    zone.add("mx2.failover.test", "A", "127.0.0.6")
    backup = make_sink("127.0.0.6")
    code, _ = await asubmit(stack.smtp_address, recipients=["x@failover.test"], data=message())
    assert code == 250
    (got,) = await backup.async_wait_for(1)
    assert got.rcpt_tos == ["x@failover.test"]
    (event,) = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert event.mx_host == "mx2.failover.test"


async def test_lowest_preference_mx_is_used_first(stack: RelaisStack, zone, make_sink) -> None:
    zone.add("pref.test", "MX", "30 mx3.pref.test.", "10 mx1.pref.test.", "20 mx2.pref.test.")
    for i, ip in ((1, "127.0.0.5"), (2, "127.0.0.6"), (3, "127.0.0.7")):
        zone.add(f"mx{i}.pref.test", "A", ip)
    sinks = [make_sink(ip) for ip in ("127.0.0.5", "127.0.0.6", "127.0.0.7")]
    for _ in range(3):
        assert (await asubmit(stack.smtp_address, recipients=["p@pref.test"], data=message()))[0] == 250
    await sinks[0].async_wait_for(3)
    assert len(sinks[1].messages) == len(sinks[2].messages) == 0


async def test_implicit_mx_uses_the_domains_own_address(stack: RelaisStack, zone, make_sink) -> None:
    zone.add("implicit.test", "A", "127.0.0.7")  # no MX record at all (RFC 5321 5.1)
    sink = make_sink("127.0.0.7")
    assert (await asubmit(stack.smtp_address, recipients=["i@implicit.test"], data=message()))[0] == 250
    (got,) = await sink.async_wait_for(1)
    assert got.rcpt_tos == ["i@implicit.test"]


async def _assert_bounced_with_dsn(stack: RelaisStack, sender_mx, rcpt: str, status_prefix: str) -> None:
    (dsn,) = await sender_mx.async_wait_for(1)
    assert dsn.mail_from == "<>", "DSNs are sent from the null sender (aiosmtpd records it as <>)"
    assert dsn.rcpt_tos == ["news@acme.test"]
    parsed = email.message_from_bytes(dsn.data)
    assert parsed.get_content_type() == "multipart/report"
    _temporary, permanent = all_failures(parsed)  # flufl.bounce returns (temporary, permanent)
    assert rcpt.encode() in permanent
    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == [rcpt]
    assert bounced.reply is not None and bounced.reply["enhanced"].startswith(status_prefix)


async def test_null_mx_bounces_with_a_dsn(stack: RelaisStack, zone, sender_mx) -> None:
    zone.add("nullmx.test", "MX", "0 .")
    assert (await asubmit(stack.smtp_address, recipients=["n@nullmx.test"], data=message()))[0] == 250
    await _assert_bounced_with_dsn(stack, sender_mx, "n@nullmx.test", "5.1.10")


async def test_nxdomain_bounces_with_a_dsn(stack: RelaisStack, sender_mx) -> None:
    assert (await asubmit(stack.smtp_address, recipients=["n@nowhere.test"], data=message()))[0] == 250
    await _assert_bounced_with_dsn(stack, sender_mx, "n@nowhere.test", "5.1.2")
