"""Webhook receivers that answer oddly or hostilely, on loopback over real sockets and TLS: a
4xx is retried like a 5xx, a redirect is never followed (to another host or at all), an answer
that never ends or whose head is huge is read no further than its status, and a certificate
the trust store does not vouch for is refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from services.bounce import webhooks
from services.bounce.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookDispatcher,
    post,
    verify_signature,
)
from services.core.bus import Bus
from services.core.config import AccountConfig, BounceConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.events import event_for, publish_event
from services.core.topology import EVENTS_STREAM, ensure_topology, webhooks_binding
from tests.support.certs import TestPKI
from tests.support.relais import an_envelope

SECRET = "whsec-hostile-0123456789"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """An HTTP(S) receiver on loopback; yields its port."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    return headers, await reader.readexactly(int(headers["Content-Length"]))


async def test_a_4xx_and_a_redirect_are_retried_and_the_redirect_is_not_followed(
    nats_server: EmbeddedNats, topology_bus: Bus
) -> None:
    elsewhere_hits = 0

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal elsewhere_hits
        elsewhere_hits += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    posts: list[tuple[dict[str, str], bytes]] = []
    async with serving(elsewhere) as other_port:
        answers = [
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            f"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:{other_port}/hook\r\n"
            "Content-Length: 0\r\n\r\n".encode(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ]

        async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            posts.append(await read_request(reader))
            writer.write(answers.pop(0))
            await writer.drain()

        async with serving(receiver) as port:
            hooked = AccountConfig(
                password_hash="-", webhook_url=f"http://127.0.0.1:{port}/hook", webhook_secret=SECRET
            )
            config = Config(
                nats=NatsConfig(url=nats_server.url),
                accounts={"acme": hooked},
                bounce=BounceConfig(webhook_retry_base=0.2, webhook_retry_max=0.5),
            )
            await ensure_topology(topology_bus.js, config)
            binding = webhooks_binding("acme")
            sub = await topology_bus.js.pull_subscribe_bind(binding.durable, EVENTS_STREAM)
            dispatcher = WebhookDispatcher(config, topology_bus)
            await publish_event(topology_bus, event_for("bounced", an_envelope(), ["a@alpha.test"]))

            pauses = []
            for _ in range(3):
                (msg,) = await sub.fetch(1, timeout=10)  # the same event, back after its nak delay
                pauses.append(await dispatcher.deliver("acme", [msg]))
            assert pauses[0] > 0 and pauses[1] > 0, "404 and 307 are failures, retried"
            assert pauses[2] == 0
            assert msg.metadata.num_delivered == 3

            deadline = time.monotonic() + 10  # an ack is a publish: the server takes it soon after
            js = topology_bus.js
            while (info := await js.consumer_info(EVENTS_STREAM, binding.durable)).num_ack_pending:
                assert time.monotonic() < deadline, "the 200 did not ack the event"
                await asyncio.sleep(0.05)
            assert info.num_pending == 0
    assert elsewhere_hits == 0, "the redirect was followed"
    ids = set()
    for headers, body in posts:
        assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        ids.update(entry["event_id"] for entry in json.loads(body))
    assert len(posts) == 3 and len(ids) == 1, "every retry carries the same event_id"


async def test_a_never_ending_answer_is_read_no_further_than_its_status() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            writer.write(b"x" * 65536)
            await writer.drain()

    async with serving(endless) as port:
        started = time.monotonic()
        async with asyncio.timeout(10):
            assert await post(f"http://127.0.0.1:{port}/hook", b"[]", {}) == 200
        assert time.monotonic() - started < 5


async def test_a_2xx_whose_head_is_longer_than_a_read_is_still_a_2xx() -> None:
    # The status decides; the rest of the head is read only so as not to cut the receiver off.
    # A field over the reader's 64 KiB line limit (a large cookie or policy header) used to turn
    # the 200 into a failure: the batch the receiver had taken was posted again for as long as
    # the events stream kept it.
    async def big_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: c=" + b"x" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with serving(big_head) as port:
        async with asyncio.timeout(10):
            assert await post(f"http://127.0.0.1:{port}/hook", b"[]", {}) == 200


async def test_an_untrusted_certificate_is_refused_unless_its_ca_is_trusted(
    pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with serving(ok, pki.server_context()) as port:
        url = f"https://127.0.0.1:{port}/hook"
        async with asyncio.timeout(10):
            with pytest.raises(ssl.SSLCertVerificationError):
                await post(url, b"[]", {})
        # The trust store is the system's, which OpenSSL lets an operator extend with
        # SSL_CERT_FILE (read when the context is built, once per process).
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))
        webhooks._tls_context.cache_clear()
        try:
            async with asyncio.timeout(10):
                assert await post(url, b"[]", {}) == 200
        finally:
            monkeypatch.delenv("SSL_CERT_FILE")
            webhooks._tls_context.cache_clear()


async def test_an_answer_cut_off_before_its_status_code_is_a_failure() -> None:
    # A receiver that dies while it writes the status line has said nothing: the batch is retried.
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 2")
        await writer.drain()

    async with serving(cut) as port:
        async with asyncio.timeout(10):
            try:
                status = await post(f"http://127.0.0.1:{port}/hook", b"[]", {})
            except ValueError:
                return  # not an HTTP response
    # Read as status 2 (a code cut short at the end of the stream): not a 2xx either.
    assert not 200 <= status < 300
