"""delivery.public_mx_only holds for every kind of host the router hands over, not only MX names
and IP-literal targets (tests/integration/delivery/test_public_mx_only.py): the recipient
domain itself when it has no MX (implicit MX), and an MX target that is an alias (CNAME) of a
host inside. Each is looked up by delivery and its loopback address skipped, so the mail
bounces 5.4.4 without a connection."""

from __future__ import annotations

import pytest

from tests.support.dns_server import DNSServer
from tests.support.relais import asubmit, message, wait_for_events

NO_PUBLIC_ADDRESS = (550, "5.4.4")
INSIDE = "127.0.0.5"  # a sink standing for a host in the operator's network


def _implicit(zone: DNSServer) -> None:
    zone.add("inside.test", "A", INSIDE)  # no MX: the domain is its own MX (RFC 5321 5.1)


def _alias(zone: DNSServer) -> None:
    zone.add("inside.test", "MX", "10 mx.inside.test.")
    zone.add("mx.inside.test", "CNAME", "box.hoster.test.")
    zone.add("box.hoster.test", "A", INSIDE)


@pytest.mark.parametrize("records", [_implicit, _alias], ids=["implicit-mx", "cname-target"])
async def test_a_route_to_an_address_inside_bounces_without_a_connection(
    make_stack, make_sink, zone: DNSServer, records
) -> None:
    records(zone)
    sink = make_sink(INSIDE)
    stack = await make_stack(delivery={"public_mx_only": True})
    assert (await asubmit(stack.smtp_address, recipients=["r@inside.test"], data=message()))[0] == 250

    bounced = await wait_for_events(stack.config.nats.url, "bounced", 1)
    (event,) = [e for e in bounced if e.recipients == ["r@inside.test"]]
    assert event.reply is not None
    assert (event.reply["code"], event.reply["enhanced"]) == NO_PUBLIC_ADDRESS
    assert sink.connections == 0 and sink.messages == []
