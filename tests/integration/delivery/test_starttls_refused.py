"""A reply refusing the STARTTLS command itself is the server's reply, not a failed handshake
(Postfix, smtp_proto.c smtp_helo): a 421 ends the try on that host (push-back rules apply to
it); any other refusal goes on in plaintext over the same connection when TLS is opportunistic
(no second connection, no memory of a broken TLS), and ends the try with the server's reply
when TLS is required."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.delivery.smtp_session import SessionSettings, Source, TryNextHost, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import ScriptedMX, serving

SOURCE = Source("", "relais.test")
CLOSING = b"421 4.3.2 Service not available, closing transmission channel\r\n"
NOT_NOW = b"454 4.7.0 TLS not available due to temporary reason\r\n"
NEVER = b"554 5.7.0 TLS not available\r\n"
OPPORTUNISTIC = [TlsPolicy(), TlsPolicy(verify=True, origin="config")]
REQUIRED = [TlsPolicy(require=True, origin="site"), TlsPolicy(require=True, verify=True, origin="mta-sts")]


class RefusesStarttls(ScriptedMX):
    """Offers STARTTLS and answers it with `refusal`. Counts `connections` and lists every
    command's verb but QUIT in `verbs`."""

    def __init__(self, *, refusal: bytes) -> None:
        super().__init__()
        self.refusal = refusal
        self.connections = 0
        self.verbs: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super()._serve(reader, writer)

    def ehlo_reply(self, tls: bool) -> bytes:
        self.verbs.append(b"EHLO")
        return b"250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"

    def reply_to(self, verb: bytes) -> bytes | None:
        self.verbs.append(verb)
        return self.refusal if verb == b"STARTTLS" else super().reply_to(verb)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        while await reader.readline() not in (b".\r\n", b""):
            pass
        self.verbs.append(b".")
        return b"250 2.0.0 queued\r\n"


@pytest.fixture
async def start() -> AsyncIterator:
    async with serving(RefusesStarttls) as start:
        yield start


def _settings(server: RefusesStarttls) -> SessionSettings:
    return SessionSettings(port=server.port, connect_timeout=5.0, command_timeout=5.0)


@pytest.mark.parametrize("policy", OPPORTUNISTIC + REQUIRED, ids=lambda p: p.origin)
async def test_a_421_to_starttls_is_the_servers_reply_and_no_plaintext_retry(
    start, policy: TlsPolicy
) -> None:
    server = await start(refusal=CLOSING)
    reconnects = 0

    async def reconnect() -> None:
        nonlocal reconnects
        reconnects += 1

    with pytest.raises(TryNextHost) as refused:
        conn = await open_connection(
            "127.0.0.1", "mx.test", SOURCE, _settings(server), policy, reconnect=reconnect
        )
        await conn.close()
    reply = refused.value.reply
    assert (reply.code, reply.enhanced_status, reply.command) == (421, "4.3.2", "STARTTLS"), reply
    assert refused.value.remote, "the server's own reply: push-back rules apply to it"
    await asyncio.sleep(0.1)  # let the server read whatever came before the close
    assert server.connections == 1 and reconnects == 0, "no plaintext retry on a new connection"
    assert server.verbs == [b"EHLO", b"STARTTLS"]


@pytest.mark.parametrize("refusal", [NOT_NOW, NEVER], ids=["454", "554"])
@pytest.mark.parametrize("policy", OPPORTUNISTIC, ids=lambda p: p.origin)
async def test_a_refused_starttls_goes_on_in_plaintext_on_the_same_connection(
    start, policy: TlsPolicy, refusal: bytes
) -> None:
    server = await start(refusal=refusal)
    reconnects = 0

    async def reconnect() -> None:
        nonlocal reconnects
        reconnects += 1

    conn = await open_connection(
        "127.0.0.1", "mx.test", SOURCE, _settings(server), policy, reconnect=reconnect
    )
    try:
        assert conn.tls_version == "" and conn.satisfies(policy)
        result = await conn.transact("a@relais.test", ["b@mx.test"], b"Subject: x\r\n\r\nhello\r\n")
        assert [o.reply.code for o in result.outcomes] == [250], result
    finally:
        await conn.close()
    # The paced reconnect is what marks TLS broken for the MX (connections.py): not called.
    assert server.connections == 1 and reconnects == 0
    assert server.verbs[:3] == [b"EHLO", b"STARTTLS", b"MAIL"], "no second EHLO, no new connection"
    assert b"." in server.verbs


@pytest.mark.parametrize("refusal", [NOT_NOW, NEVER], ids=["454", "554"])
@pytest.mark.parametrize("policy", REQUIRED, ids=lambda p: p.origin)
async def test_a_refused_starttls_under_required_tls_is_the_servers_reply(
    start, policy: TlsPolicy, refusal: bytes
) -> None:
    server = await start(refusal=refusal)
    with pytest.raises(TryNextHost) as refused:
        conn = await open_connection("127.0.0.1", "mx.test", SOURCE, _settings(server), policy)
        await conn.close()
    reply = refused.value.reply
    assert (reply.code, reply.command) == (int(refusal[:3]), "STARTTLS"), reply
    assert reply.enhanced_status == refusal[4:9].decode()
    assert refused.value.remote, "the server's own reply: push-back rules apply to it"
    await asyncio.sleep(0.1)
    assert server.connections == 1
    assert b"MAIL" not in server.verbs, "nothing goes in plaintext"
