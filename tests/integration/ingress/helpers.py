"""Clients and read-backs for the ingress scenarios."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import socket
from collections.abc import Callable
from typing import Any

import nats

from services.core.config import ListenerConfig
from services.core.embedded import free_port
from services.core.envelope import Envelope
from services.core.topology import INBOUND_STREAM, SUBMIT_STREAM
from services.ingress.replies import Verdict
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, PASSWORD, RelaisStack, message


def tls_sections(pki: TestPKI, **ingress: Any) -> dict[str, Any]:
    return {"tls_cert_file": str(pki.server_pem), "tls_key_file": str(pki.server_key), **ingress}


def listener(stack: RelaisStack, listen: str) -> tuple[str, int]:
    assert stack.ingress is not None
    return stack.ingress.addresses[listen]


def free_listen() -> str:
    return f"127.0.0.1:{free_port()}"


async def listening(
    make_ingress: Callable[..., Any], ingress: dict[str, Any], *listeners: dict[str, Any]
) -> tuple[RelaisStack, list[tuple[str, int]]]:
    """An ingress with `ingress` settings and one listener per options in `listeners`, each on a
    free port: the stack and the listeners' addresses, in that order."""
    listens = [free_listen() for _ in listeners]
    configs = [
        ListenerConfig(listen=listen, **options) for listen, options in zip(listens, listeners, strict=True)
    ]
    stack = await make_ingress(ingress={**ingress, "listeners": configs})
    return stack, [listener(stack, listen) for listen in listens]


async def queued(nats_url: str, stream: str = SUBMIT_STREAM) -> list[Envelope]:
    """Every envelope currently in a work-queue stream, read by sequence (no consumer needed)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: list[Envelope] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_msg(stream, seq)
                out.append(Envelope.from_msgpack(msg.data))
        return out
    finally:
        await nc.close()


async def queued_inbound(nats_url: str) -> list[Envelope]:
    return await queued(nats_url, INBOUND_STREAM)


def client(address: tuple[str, int], *, pki: TestPKI | None = None, starttls: bool = False) -> smtplib.SMTP:
    """A connected smtplib client that said EHLO (and STARTTLS'd when asked)."""
    smtp = smtplib.SMTP(*address, timeout=15)
    smtp.ehlo("client.test")
    if starttls:
        assert pki is not None
        smtp.starttls(context=pki.client_context())
        smtp.ehlo("client.test")
    return smtp


def login(smtp: smtplib.SMTP, user: str = ACCOUNT, password: str = PASSWORD) -> None:
    smtp.login(user, password)


def submit(address: tuple[str, int], data: bytes, *, authenticate: bool = True) -> tuple[int, bytes]:
    """One message from news@acme.test to a@alpha.test in a session of its own: the reply to DATA."""
    with client(address) as smtp:
        if authenticate:
            login(smtp)
        smtp.mail("news@acme.test")
        smtp.rcpt("a@alpha.test")
        return smtp.data(data)


def send_counted(address: tuple[str, int], pki: TestPKI | None = None) -> tuple[int, bytes]:
    """One message counted against acme's rate limits, in a session of its own (over STARTTLS
    with `pki`): the reply to DATA, or to MAIL when that refuses at the limit."""
    with client(address, pki=pki, starttls=pki is not None) as smtp:
        login(smtp)
        code, text = smtp.mail("news@acme.test")
        if code != 250:
            return code, text
        smtp.rcpt("a@alpha.test")
        return smtp.data(message())


def hung_up(smtp: smtplib.SMTP) -> bool:
    """Whether the server has closed the session: the next command finds no connection."""
    try:
        smtp.noop()
    except smtplib.SMTPServerDisconnected:
        return True
    return False


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# Raw-socket clients, for what smtplib cannot do: pipeline, stall mid-message, hang up anywhere.

SUBMISSION_TO_DATA = b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
INBOUND_TO_DATA = b"EHLO anyone.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n"


def ehlo_auth() -> bytes:
    """EHLO, then AUTH PLAIN as the test account with its initial response: two command lines."""
    return f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """The last lines of the next `count` replies, or more that came with them (fewer if the
    server closes first). Each call reads afresh: a reply cut by its last read is not kept."""
    data = b""
    while len(_reply_ends(data)) < count and (chunk := sock.recv(65536)):
        data += chunk
    return _reply_ends(data)


def _reply_ends(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n")[:-1] if line[3:4] == b" "]


def reply_after_auth(address: tuple[str, int], line: str) -> bytes:
    """The reply to `line` in a session that said EHLO and authenticated (its last line)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(ehlo_auth())
        read_replies(sock, 3)
        sock.sendall(line.encode() + b"\r\n")
        return (read_replies(sock, 1) or [b""])[0]


def to_data(sock: socket.socket, commands: bytes) -> None:
    """Pipeline `commands`, which end with DATA, before the greeting is read: the greeting and a
    reply per command line come back, the last a 354."""
    sock.sendall(commands)
    replies = read_replies(sock, commands.count(b"\r\n") + 1)
    assert replies and replies[-1].startswith(b"354"), replies


def hold_data(address: tuple[str, int], content: bytes, commands: bytes | None = None) -> socket.socket:
    """A client that gets to DATA (by default authenticated, from news@acme.test to a@alpha.test),
    sends `content` without the end-of-data line and stalls: what it sent holds part of the
    DATA budget until the socket is closed."""
    sock = socket.create_connection(address, timeout=10)
    to_data(sock, ehlo_auth() + SUBMISSION_TO_DATA if commands is None else commands)
    sock.sendall(content)
    return sock


def inbound_message(octets: int) -> bytes:
    """About `octets` octets of a message to postmaster, without its end-of-data line."""
    return b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * (octets // 80)


def hold_inbound(address: tuple[str, int], octets: int) -> socket.socket:
    """An anonymous port-25 client that sends most of a message to postmaster and stalls."""
    return hold_data(address, inbound_message(octets), INBOUND_TO_DATA)


def hold_silent(address: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    """A connection that sends nothing: a handshake or a PROXY header that never comes."""
    return socket.create_connection(address, timeout=5, source_address=(source, 0))


def closed_at_once(sock: socket.socket) -> bytes:
    """What the server said before closing `sock` (a socket timeout when it did not close)."""
    sock.settimeout(3)
    with sock:
        data = b""
        while chunk := sock.recv(200):
            data += chunk
        return data


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Blocking smtplib clients run in a thread so the in-process ingress keeps serving."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def settle(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Whether `condition` holds within `seconds`, polled while the in-process ingress runs."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def reply(verdict: Verdict) -> tuple[int, bytes]:
    """A verdict as smtplib reports it: (code, b"<enhanced status> <text>")."""
    return verdict.code, f"{verdict.enhanced_status} {verdict.text}".encode()
