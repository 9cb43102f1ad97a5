"""An MX that refuses EHLO with anything but 421 gets HELO, as Postfix does, and then is taken to
offer no extension: no PIPELINING, STARTTLS, SIZE, 8BITMIME or SMTPUTF8. What needs one of
them then ends as it does with any server lacking it: TLS required by policy defers (4.7.10), a
non-ASCII local part bounces (5.6.7). A 421 to EHLO closes: the next host is tried. A server
that hangs up after refusing EHLO is not asked again: its refusal is the attempt's reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.delivery.smtp_session import SessionSettings, Source, TryNextHost, open_connection
from services.delivery.tls_policy import TLS_NOT_OFFERED, TlsPolicy
from tests.integration.delivery.conftest import one_transaction
from tests.support.raw_smtp import RawServer, serving
from tests.support.relais import asubmit, message, wait_for_events

EHLO_UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
HELO_REFUSED = b"550 5.7.1 go away\r\n"
EIGHT_BIT = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nSch\xc3\xb6ne Gr\xc3\xbc\xc3\x9fe.\r\n"
REQUIRE_TLS = '[site."alpha.test"]\nrequire_tls = true\n'


class HeloOnlyServer(RawServer):
    """Answers EHLO with `ehlo`, HELO with `helo`, everything else as a sound server does, and
    records every command line and message body."""

    def __init__(self, ehlo: bytes = EHLO_UNKNOWN, helo: bytes = b"250 old.test\r\n") -> None:
        super().__init__()
        self.ehlo = ehlo
        self.helo = helo
        self.lines: list[bytes] = []
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test SMTP\r\n")
        try:
            while line := await reader.readline():
                self.lines.append(line.rstrip(b"\r\n"))
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
                if verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                writer.write(self._reply(verb))
                if verb == b"DATA":
                    await writer.drain()
                    body = b""
                    while (data := await reader.readline()) and data != b".\r\n":
                        body += data
                    self.bodies.append(body)
                    writer.write(b"250 2.0.0 queued\r\n")
                await writer.drain()
        finally:
            writer.close()

    def _reply(self, verb: bytes) -> bytes:
        return {b"EHLO": self.ehlo, b"HELO": self.helo, b"DATA": b"354 go ahead\r\n"}.get(verb, b"250 ok\r\n")

    def verbs(self) -> list[bytes]:
        return [line.split(b" ", 1)[0].split(b":", 1)[0].upper() for line in self.lines]


@pytest.fixture
async def old_server() -> AsyncIterator:
    async with serving(HeloOnlyServer) as start:
        yield start


def _settings(server: HeloOnlyServer) -> SessionSettings:
    return SessionSettings(port=server.port, starttls=True, command_timeout=5.0)


async def test_ehlo_refused_then_helo_and_the_message_goes_without_extensions(old_server) -> None:
    server = await old_server()
    conn = await open_connection(
        "127.0.0.1", "mx.test", Source("", "relais.test"), _settings(server), TlsPolicy()
    )
    try:
        result = await conn.transact("a@acme.test", ["x@bücher.test", "y@b.test"], EIGHT_BIT)
    finally:
        await conn.close()
    assert [o.kind for o in result.outcomes] == ["delivered", "delivered"], result
    assert server.lines[:2] == [b"EHLO relais.test", b"HELO relais.test"]
    # No SIZE=, BODY=8BITMIME or SMTPUTF8; an IDN domain as A-labels; 8-bit data as it is.
    assert server.lines[2:5] == [
        b"MAIL FROM:<a@acme.test>",
        b"RCPT TO:<x@xn--bcher-kva.test>",
        b"RCPT TO:<y@b.test>",
    ]
    assert server.bodies == [EIGHT_BIT]
    assert not conn.tls_version


@pytest.mark.parametrize(
    "policy",
    [TlsPolicy(require=True, origin="site"), TlsPolicy(require=True, verify=True, mx_patterns=("mx.test",))],
    ids=["site-requires-tls", "mta-sts-enforce"],
)
async def test_required_tls_defers_at_a_helo_only_server(old_server, policy: TlsPolicy) -> None:
    server = await old_server()
    with pytest.raises(TryNextHost) as refused:
        await open_connection("127.0.0.1", "mx.test", Source("", "relais.test"), _settings(server), policy)
    assert refused.value.reply == TLS_NOT_OFFERED
    assert b"MAIL" not in server.verbs()


async def test_a_non_ascii_local_part_bounces_at_a_helo_only_server(old_server) -> None:
    server = await old_server()
    result = await one_transaction(_settings(server), EIGHT_BIT, ["jöran@b.test"])
    ((kind, enhanced),) = [(o.kind, o.reply.enhanced_status) for o in result.outcomes]
    assert (kind, enhanced) == ("bounced", "5.6.7")
    assert b"MAIL" not in server.verbs()


@pytest.mark.parametrize(
    ("ehlo", "helo", "expected"),
    [
        (b"421 4.3.2 closing\r\n", None, (421, "EHLO")),
        (EHLO_UNKNOWN, HELO_REFUSED, (550, "HELO")),
    ],
    ids=["421-to-EHLO", "HELO-refused-too"],
)
async def test_no_helo_after_a_421_and_the_next_host_after_a_refused_helo(
    old_server, ehlo: bytes, helo: bytes | None, expected: tuple[int, str]
) -> None:
    server = await old_server(ehlo=ehlo, helo=helo or b"250 old.test\r\n")
    with pytest.raises(TryNextHost) as refused:
        await open_connection(
            "127.0.0.1", "mx.test", Source("", "relais.test"), _settings(server), TlsPolicy()
        )
    assert (refused.value.reply.code, refused.value.reply.command) == expected
    assert refused.value.remote, "the server's own reply: push-back rules apply to it"
    await asyncio.sleep(0.1)  # let the server read whatever came before the close
    assert (b"HELO" in server.verbs()) == (helo is not None)


async def test_a_4xx_to_ehlo_gets_helo_too(old_server) -> None:
    server = await old_server(ehlo=b"450 4.3.2 busy, try later\r\n")
    conn = await open_connection(
        "127.0.0.1", "mx.test", Source("", "relais.test"), _settings(server), TlsPolicy()
    )
    try:
        assert server.verbs() == [b"EHLO", b"HELO"]
        assert not conn.smtp.supports_extension("pipelining")
    finally:
        await conn.close()


class RefuseAndHangUp(RawServer):
    """Refuses EHLO with a 5xx and closes, as some block-listing servers do."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 strict.test SMTP\r\n")
        await reader.readline()
        writer.write(b"554 5.7.1 your address is listed\r\n")
        await writer.drain()
        writer.close()


async def test_a_refusal_then_hang_up_keeps_the_servers_reply() -> None:
    async with serving(RefuseAndHangUp) as start:
        server = await start()
        with pytest.raises(TryNextHost) as refused:
            await open_connection(
                "127.0.0.1", "mx.test", Source("", "relais.test"), _settings(server), TlsPolicy()
            )
    reply = refused.value.reply
    assert (reply.code, reply.enhanced_status, reply.command) == (554, "5.7.1", "EHLO"), reply
    assert refused.value.remote


async def test_a_helo_only_mx_gets_the_message_end_to_end(make_stack, make_sink, pki) -> None:
    # It would offer STARTTLS and PIPELINING to an EHLO; after HELO neither is used.
    sink = make_sink("127.0.0.2", tls_context=pki.server_context(), pipelining=True)
    sink.ehlo_reply = EHLO_UNKNOWN.decode().strip()
    stack = await make_stack()
    assert (await asubmit(stack.smtp_address, recipients=["old@alpha.test"], data=message()))[0] == 250
    (got,) = await sink.async_wait_for(1)
    assert got.helo == "out-21.relais.test" and got.mail_options == [] and not got.tls
    assert sink.mail_reads == [["MAIL"]]
    (delivered,) = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert delivered.recipients == ["old@alpha.test"] and not delivered.tls_version


async def test_a_helo_only_mx_of_a_site_requiring_tls_is_deferred_end_to_end(
    make_stack, make_sink, pki, shaping_file
) -> None:
    sink = make_sink("127.0.0.2", tls_context=pki.server_context())
    sink.ehlo_reply = EHLO_UNKNOWN.decode().strip()
    stack = await make_stack(delivery={"shaping_file": shaping_file(REQUIRE_TLS)})
    assert (await asubmit(stack.smtp_address, recipients=["old@alpha.test"], data=message()))[0] == 250
    (deferred, *_) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert (deferred.reply["code"], deferred.reply["enhanced"]) == (TLS_NOT_OFFERED.code, "4.7.10")
    assert sink.messages == [] and sink.data_commands == 0
