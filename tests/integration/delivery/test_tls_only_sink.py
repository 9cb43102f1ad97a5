"""TLS: opportunistic STARTTLS to a TLS-only MX, and a per-site require-TLS rule against a plaintext one."""

from __future__ import annotations

import asyncio
import itertools
import ssl

from tests.integration.delivery.conftest import submit_many
from tests.support.relais import asubmit, message, wait_for_events

REQUIRE_TLS = """
[site."alpha.test"]
require_tls = true
"""


async def test_tls_only_sink_gets_the_message_over_tls_and_the_event_says_so(
    make_stack, make_sink, pki
) -> None:
    sink = make_sink("127.0.0.2", tls_context=pki.server_context(), require_tls=True)
    stack = await make_stack()
    assert (await asubmit(stack.smtp_address, recipients=["s@alpha.test"], data=message()))[0] == 250
    (got,) = await sink.async_wait_for(1)
    assert got.tls
    (event,) = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert event.tls_version in ("TLSv1.2", "TLSv1.3")
    assert event.tls_cipher


async def test_site_requiring_tls_is_never_sent_plaintext(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")  # offers no STARTTLS
    stack = await make_stack(delivery={"shaping_file": shaping_file(REQUIRE_TLS)})
    assert (await asubmit(stack.smtp_address, recipients=["p@alpha.test"], data=message()))[0] == 250
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 2)
    assert {e.reply["enhanced"] for e in deferred} == {"4.7.10"}
    await asyncio.sleep(0.5)
    assert sink.messages == [] and sink.data_commands == 0


async def test_a_certificate_that_fails_tls_verify_defers_and_never_goes_plaintext(
    make_stack, make_sink, pki
) -> None:
    sink = make_sink("127.0.0.2", tls_context=pki.wrong_server_context())  # for wrong.example
    stack = await make_stack(delivery={"tls_verify": True, "tls_ca_file": str(pki.ca_pem)})
    assert (await asubmit(stack.smtp_address, recipients=["v@alpha.test"], data=message()))[0] == 250
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred[0].reply["enhanced"] == "4.7.5"
    await asyncio.sleep(0.5)
    assert sink.messages == [] and sink.data_commands == 0


async def test_tls_verify_still_reuses_a_plaintext_connection(make_stack, make_sink, shaping_file) -> None:
    # An MX without STARTTLS gets plaintext (no policy requires TLS), and that connection is as
    # reusable as under opportunistic TLS: not one new connection per message.
    sink = make_sink("127.0.0.2")
    one_connection = '[site."alpha.test"]\nconnections = 1\nmessages_per_connection = 100\n'
    stack = await make_stack(delivery={"tls_verify": True, "shaping_file": shaping_file(one_connection)})
    await submit_many(stack, 4)
    got = await sink.async_wait_for(4)
    assert not any(m.tls for m in got)
    assert sink.connections == 1


def broken_starttls(pki) -> ssl.SSLContext:
    """Offers STARTTLS, but wants a client certificate that delivery does not have."""
    context = pki.server_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(pki.ca_pem))
    return context


async def test_plaintext_retry_after_a_failed_starttls_is_paced_as_a_new_connection(
    make_stack, make_sink, pki, shaping_file
) -> None:
    # Opportunistic TLS gives up and connects again in plaintext: that second connection counts
    # against the site's new-connection rate like any other. Later messages to that MX go
    # plaintext at once, without a failed handshake first.
    sink = make_sink("127.0.0.2", tls_context=broken_starttls(pki))
    rate = '[site."alpha.test"]\nmessages_per_connection = 1\nnew_connections_per_minute = 120\n'
    stack = await make_stack(delivery={"shaping_file": shaping_file(rate)})
    await submit_many(stack, 3)
    got = await sink.async_wait_for(3, timeout=60)
    assert not any(m.tls for m in got)
    assert sink.connections == 4, "a failed STARTTLS, then plaintext, then plaintext only"
    # 120/min: a new connection every 0.5 s at most.
    gaps = [b - a for a, b in itertools.pairwise(sink.connected_at)]
    assert min(gaps) >= 0.4, gaps


async def test_a_broken_starttls_does_not_stop_mail_at_a_slow_connection_rate(
    make_stack, make_sink, pki, shaping_file
) -> None:
    # 6 new connections a minute: the plaintext retry's slot is 10 s off, too far to wait for.
    # The attempt is postponed, and the next goes plaintext at once on one slot; were it to try
    # STARTTLS again, every attempt would end the same way until the message expired.
    sink = make_sink("127.0.0.2", tls_context=broken_starttls(pki))
    rate = '[site."alpha.test"]\nmessages_per_connection = 1\nnew_connections_per_minute = 6\n'
    stack = await make_stack(delivery={"shaping_file": shaping_file(rate)})
    await submit_many(stack, 1)
    (got,) = await sink.async_wait_for(1, timeout=60)
    assert not got.tls
