"""Credentials in a webhook URL are sent as HTTP basic auth, against a real HTTP receiver on
loopback."""

from __future__ import annotations

import asyncio
import base64

from services.bounce.webhooks import post


async def test_credentials_in_the_webhook_url_are_sent_as_basic_auth() -> None:
    # Postmark's way of protecting a webhook, and what receivers behind basic auth need:
    # https://<user>:<password>@host/path. They were cut from the Host field and sent nowhere, so
    # such a receiver answered 401 for ever and every event waited out the stream's max age.
    heads: list[bytes] = []

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        fields = dict(line.split(b": ", 1) for line in heads[-1].split(b"\r\n")[1:] if line)
        authorised = fields.get(b"Authorization") == b"Basic " + base64.b64encode(b"relais:s3cr:t@/")
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n" if authorised else b"HTTP/1.1 401 Nope\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        # Reserved characters in the password are percent-encoded in the URL (RFC 3986).
        url = f"http://relais:s3cr%3At%40%2F@127.0.0.1:{port}/hook?x=1"
        async with asyncio.timeout(10):
            status = await post(url, b"[]", {"Content-Type": "application/json"})
        (head,) = heads
        assert head.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
        assert f"\r\nHost: 127.0.0.1:{port}\r\n".encode() in head, "credentials stay out of Host"
        assert status == 204
    finally:
        server.close()
        await server.wait_closed()
