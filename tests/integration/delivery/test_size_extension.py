"""SIZE (RFC 1870): MAIL declares the message's octets to an MX that offers SIZE, and a message
over the MX's limit is never sent there: every recipient bounces with 552 5.3.4, the next MX is
not tried, as Postfix does (that limit is the destination's, not a passing problem)."""

from __future__ import annotations

import pytest

from services.core.outcome import Bounced, Delivered
from services.delivery.connections import ConnectionPool
from services.delivery.message_data import message_data
from services.delivery.smtp_session import SessionSettings
from services.delivery.wire_addresses import size_exceeded
from tests.integration.delivery.conftest import attempt, one_transaction, resolver_of
from tests.support.dns_server import DNSServer

# Bare LF line ends and leading dots: the size is what goes on the wire, not what was stored,
# and the dots doubled for transport are not part of it.
BODY = b"Subject: size\n\n.leading dot\n..two dots\nhello\n"
ATTEMPT_BODY = b"Subject: x\r\n\r\nhello\r\n"  # what conftest's `attempt` sends: 21 octets
MESSAGE_SIZE_EXCEEDED = (552, "5.3.4")


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
async def test_mail_declares_the_octets_the_server_then_receives(make_sink, pipelining: bool) -> None:
    sink = make_sink("127.0.0.2", pipelining=pipelining)
    settings = SessionSettings(port=sink.port, starttls=False, command_timeout=10.0)
    result = await one_transaction(
        settings, BODY, ["x@alpha.test", "y@alpha.test"], host=sink.host, mx="mx.alpha.test"
    )
    assert all(isinstance(o, Delivered) for o in result.outcomes), result
    (got,) = sink.messages
    assert f"SIZE={len(got.data)}" in got.mail_options, got.mail_options
    assert len(got.data) == message_data(BODY).size == len(BODY.replace(b"\n", b"\r\n"))


async def test_a_message_over_the_limit_bounces_and_no_other_mx_is_tried(
    make_sink, dns_server: DNSServer, sink_port: int
) -> None:
    dns_server.add("mx1.big.test", "A", "127.0.0.4")
    dns_server.add("mx2.big.test", "A", "127.0.0.5")
    small = make_sink("127.0.0.4", size_limit=10)
    roomy = make_sink("127.0.0.5")
    pool = ConnectionPool(None, SessionSettings(port=sink_port, starttls=False, connect_timeout=5.0))  # type: ignore[arg-type]
    try:
        result = await attempt(
            pool, resolver_of(dns_server), ["mx1.big.test", "mx2.big.test"], "r@big.test", "big.test"
        )
    finally:
        await pool.close()
    (outcome,) = result.outcomes
    assert isinstance(outcome, Bounced), outcome
    assert outcome.reply == size_exceeded(len(ATTEMPT_BODY), 10, "mx1.big.test[127.0.0.4]")
    assert (outcome.reply.code, outcome.reply.enhanced_status) == MESSAGE_SIZE_EXCEEDED
    assert outcome.reply.text == "message size 21 exceeds size limit 10 of server mx1.big.test[127.0.0.4]"
    assert small.mail_reads == [], "no transaction is opened for a message the server cannot take"
    assert result.remote_replies == [], "Relais' own verdict: no push-back rule may match it"
    assert roomy.connections == 0, "the next MX is not tried"


async def test_size_is_declared_only_where_offered_and_a_larger_limit_takes_the_message(make_sink) -> None:
    # "SIZE" with no limit, or SIZE 0, is read in tests/unit/test_delivery_data.py.
    without = make_sink("127.0.0.2", size_limit=0)  # aiosmtpd then offers no SIZE at all
    larger = make_sink("127.0.0.3", size_limit=len(BODY) * 2)
    for server, declared in ((without, False), (larger, True)):
        settings = SessionSettings(port=server.port, starttls=False, command_timeout=10.0)
        result = await one_transaction(settings, BODY, ["x@alpha.test"], host=server.host)
        assert [o.kind for o in result.outcomes] == ["delivered"]
        (got,) = server.messages
        assert any(o.startswith("SIZE=") for o in got.mail_options) == declared, got.mail_options
