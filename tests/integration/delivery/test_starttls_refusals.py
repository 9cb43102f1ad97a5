"""A server's refusal around STARTTLS is the server's reply, not a failed handshake (Postfix,
smtp_proto.c: smtp_start_tls recurses into smtp_helo, which answers a refused STARTTLS too).
Only a failed handshake, or a session lost, is a cause to retry in plaintext on a new connection
(which also marks TLS broken for the MX, connections.py).

- A refusal of STARTTLS itself: a 421 ends the try on that host (push-back rules apply to it);
  any other refusal goes on in plaintext over the same connection when TLS is opportunistic (no
  second connection, no memory of a broken TLS), and ends the try with the server's reply when
  TLS is required.
- A refusal of the EHLO sent over a working TLS session is answered as any refused EHLO: a 421
  closes this host for now, any other refusal gets HELO, over the TLS session (no plaintext
  retry, which would send the message unencrypted to a server whose TLS works)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest

from services.delivery.smtp_session import (
    Connection,
    SessionSettings,
    Source,
    TryNextHost,
    open_connection,
)
from services.delivery.tls_policy import TlsPolicy
from tests.support.certs import TestPKI
from tests.support.raw_smtp import ScriptedMX, serving

SOURCE = Source("", "relais.test")
CLOSING = b"421 4.3.2 Service not available, closing transmission channel\r\n"
NOT_NOW = b"454 4.7.0 TLS not available due to temporary reason\r\n"
NEVER = b"554 5.7.0 TLS not available\r\n"
UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
OPPORTUNISTIC = [TlsPolicy(), TlsPolicy(verify=True, origin="config")]
REQUIRED = [TlsPolicy(require=True, origin="site"), TlsPolicy(require=True, verify=True, origin="mta-sts")]


def _origin(policy: TlsPolicy) -> str:
    return policy.origin


class Refusing(ScriptedMX):
    """Offers STARTTLS; counts `connections`, lists every command's verb but QUIT in `verbs`
    and says of each EHLO whether it came over TLS in `ehlos`."""

    def __init__(self, context: ssl.SSLContext | None = None, *, refusal: bytes) -> None:
        super().__init__(context)
        self.refusal = refusal
        self.connections = 0
        self.ehlos: list[bool] = []
        self.verbs: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super()._serve(reader, writer)

    def ehlo_reply(self, tls: bool) -> bytes:
        self.ehlos.append(tls)
        self.verbs.append(b"EHLO")
        return super().ehlo_reply(tls)

    def reply_to(self, verb: bytes) -> bytes | None:
        self.verbs.append(verb)
        return super().reply_to(verb)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        while await reader.readline() not in (b".\r\n", b""):
            pass
        self.verbs.append(b".")
        return b"250 2.0.0 queued\r\n"


class RefusesStarttls(Refusing):
    """Answers STARTTLS itself with `refusal`."""

    def ehlo_reply(self, tls: bool) -> bytes:
        super().ehlo_reply(tls)
        return b"250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"

    def reply_to(self, verb: bytes) -> bytes | None:
        reply = super().reply_to(verb)
        return self.refusal if verb == b"STARTTLS" else reply


class RefusesEhloOverTls(Refusing):
    """Completes the handshake, then answers the EHLO over TLS with `refusal` (and, after a 421,
    closes at HELO)."""

    def ehlo_reply(self, tls: bool) -> bytes:
        plain = super().ehlo_reply(tls)
        return self.refusal if tls else plain

    def reply_to(self, verb: bytes) -> bytes | None:
        if verb == b"HELO" and self.refusal == CLOSING:
            super().reply_to(verb)
            return None
        return super().reply_to(verb)


class Reconnects:
    """The `reconnect` open_connection awaits before a plaintext retry on a new connection."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


@pytest.fixture
async def refusing_starttls() -> AsyncIterator:
    async with serving(RefusesStarttls) as start:
        yield start


@pytest.fixture
async def refusing_ehlo_over_tls() -> AsyncIterator:
    async with serving(RefusesEhloOverTls) as start:
        yield start


async def _open(server: Refusing, policy: TlsPolicy, reconnect: Reconnects | None = None) -> Connection:
    settings = SessionSettings(port=server.port, connect_timeout=5.0, command_timeout=5.0)
    return await open_connection("127.0.0.1", "mx.test", SOURCE, settings, policy, reconnect=reconnect)


async def _refused(server: Refusing, policy: TlsPolicy, reconnect: Reconnects | None = None) -> TryNextHost:
    with pytest.raises(TryNextHost) as refused:
        await (await _open(server, policy, reconnect)).close()
    assert refused.value.remote, "the server's own reply: push-back rules apply to it"
    await asyncio.sleep(0.1)  # let the server read whatever came before the close
    return refused.value


@pytest.mark.parametrize("policy", OPPORTUNISTIC + REQUIRED, ids=_origin)
async def test_a_421_to_starttls_is_the_servers_reply_and_no_plaintext_retry(
    refusing_starttls, policy: TlsPolicy
) -> None:
    server = await refusing_starttls(refusal=CLOSING)
    reconnect = Reconnects()
    reply = (await _refused(server, policy, reconnect)).reply
    assert (reply.code, reply.enhanced_status, reply.command) == (421, "4.3.2", "STARTTLS"), reply
    assert server.connections == 1 and reconnect.count == 0, "no plaintext retry on a new connection"
    assert server.verbs == [b"EHLO", b"STARTTLS"]


@pytest.mark.parametrize("refusal", [NOT_NOW, NEVER], ids=["454", "554"])
@pytest.mark.parametrize("policy", OPPORTUNISTIC, ids=_origin)
async def test_a_refused_starttls_goes_on_in_plaintext_on_the_same_connection(
    refusing_starttls, policy: TlsPolicy, refusal: bytes
) -> None:
    server = await refusing_starttls(refusal=refusal)
    reconnect = Reconnects()
    conn = await _open(server, policy, reconnect)
    try:
        assert conn.tls_version == "" and conn.satisfies(policy)
        result = await conn.transact("a@relais.test", ["b@mx.test"], b"Subject: x\r\n\r\nhello\r\n")
        assert [o.reply.code for o in result.outcomes] == [250], result
    finally:
        await conn.close()
    # The paced reconnect is what marks TLS broken for the MX (connections.py): not called.
    assert server.connections == 1 and reconnect.count == 0
    assert server.verbs[:3] == [b"EHLO", b"STARTTLS", b"MAIL"], "no second EHLO, no new connection"
    assert b"." in server.verbs


@pytest.mark.parametrize("refusal", [NOT_NOW, NEVER], ids=["454", "554"])
@pytest.mark.parametrize("policy", REQUIRED, ids=_origin)
async def test_a_refused_starttls_under_required_tls_is_the_servers_reply(
    refusing_starttls, policy: TlsPolicy, refusal: bytes
) -> None:
    server = await refusing_starttls(refusal=refusal)
    reply = (await _refused(server, policy)).reply
    assert (reply.code, reply.command) == (int(refusal[:3]), "STARTTLS"), reply
    assert reply.enhanced_status == refusal[4:9].decode()
    assert server.connections == 1
    assert b"MAIL" not in server.verbs, "nothing goes in plaintext"


@pytest.mark.parametrize("policy", [TlsPolicy(), REQUIRED[0]], ids=_origin)
async def test_a_421_to_the_ehlo_over_tls_is_the_servers_reply_not_a_plaintext_retry(
    refusing_ehlo_over_tls, pki: TestPKI, policy: TlsPolicy
) -> None:
    server = await refusing_ehlo_over_tls(pki.server_context(), refusal=CLOSING)
    reconnect = Reconnects()
    reply = (await _refused(server, policy, reconnect)).reply
    assert (reply.code, reply.enhanced_status, reply.command) == (421, "4.3.2", "EHLO"), reply
    assert server.ehlos == [False, True], "no EHLO on a plaintext connection after it"
    assert server.connections == 1 and reconnect.count == 0
    assert b"HELO" not in server.verbs


@pytest.mark.parametrize("policy", [TlsPolicy(), REQUIRED[0]], ids=_origin)
async def test_another_refusal_of_the_ehlo_over_tls_gets_helo_over_tls(
    refusing_ehlo_over_tls, pki: TestPKI, policy: TlsPolicy
) -> None:
    server = await refusing_ehlo_over_tls(pki.server_context(), refusal=UNKNOWN)
    conn = await _open(server, policy)
    try:
        assert conn.tls_version in ("TLSv1.2", "TLSv1.3"), "the session stays encrypted"
        assert conn.satisfies(policy)
    finally:
        await conn.close()
    assert server.ehlos == [False, True]
    assert [v for v in server.verbs if v != b"EHLO"][:1] == [b"HELO"]
    assert server.connections == 1
