"""A server that completes the TLS handshake and then refuses the EHLO sent over TLS is answered
as any refused EHLO is (Postfix's smtp_start_tls recurses into smtp_helo): a 421 is the
server's own reply, closing this host for now (push-back rules apply), and any other refusal
gets HELO, over the TLS session. Neither is a failed handshake: no plaintext retry (which would
send the message unencrypted to a server whose TLS works, and remember it as broken)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.delivery.smtp_session import SessionSettings, Source, TryNextHost, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.certs import TestPKI
from tests.support.raw_smtp import ScriptedMX, serving

SOURCE = Source("", "relais.test")
CLOSING = b"421 4.7.0 mx.test too many connections, try again later\r\n"
UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
POLICIES = [TlsPolicy(), TlsPolicy(require=True, origin="site")]


class RefusesEhloOverTls(ScriptedMX):
    """Offers STARTTLS and completes the handshake, then answers the EHLO over TLS with
    `refusal` (plaintext EHLO as usual). Counts `connections`; `ehlos` says of each EHLO
    whether it came over TLS, `verbs` lists the other commands."""

    def __init__(self, context, *, refusal: bytes) -> None:
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
        return self.refusal if tls else super().ehlo_reply(tls)

    def reply_to(self, verb: bytes) -> bytes | None:
        self.verbs.append(verb)
        if verb == b"HELO" and self.refusal == CLOSING:
            return None
        return super().reply_to(verb)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        return None


@pytest.fixture
async def start() -> AsyncIterator:
    async with serving(RefusesEhloOverTls) as start:
        yield start


def _settings(server: RefusesEhloOverTls) -> SessionSettings:
    return SessionSettings(port=server.port, connect_timeout=5.0, command_timeout=5.0)


@pytest.mark.parametrize("policy", POLICIES, ids=["opportunistic", "site-requires-tls"])
async def test_a_421_to_the_ehlo_over_tls_is_the_servers_reply_not_a_plaintext_retry(
    start, pki: TestPKI, policy: TlsPolicy
) -> None:
    server = await start(pki.server_context(), refusal=CLOSING)
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
    assert (reply.code, reply.enhanced_status, reply.command) == (421, "4.7.0", "EHLO"), reply
    assert refused.value.remote, "the server's own reply: push-back rules apply to it"
    await asyncio.sleep(0.1)  # let the server read whatever came before the close
    assert server.ehlos == [False, True], "no EHLO on a plaintext connection after it"
    assert server.connections == 1 and reconnects == 0
    assert b"HELO" not in server.verbs


@pytest.mark.parametrize("policy", POLICIES, ids=["opportunistic", "site-requires-tls"])
async def test_another_refusal_of_the_ehlo_over_tls_gets_helo_over_tls(
    start, pki: TestPKI, policy: TlsPolicy
) -> None:
    server = await start(pki.server_context(), refusal=UNKNOWN)
    conn = await open_connection("127.0.0.1", "mx.test", SOURCE, _settings(server), policy)
    try:
        assert conn.tls_version in ("TLSv1.2", "TLSv1.3"), "the session stays encrypted"
        assert conn.satisfies(policy)
    finally:
        await conn.close()
    assert server.ehlos == [False, True] and server.verbs[:1] == [b"HELO"]
    assert server.connections == 1
