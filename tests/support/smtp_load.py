"""A small, cheap SMTP load client: many concurrent sessions, one new connection per message.

Used by the cluster fault tests and by bench/e2e.py. It speaks plain SMTP over asyncio streams
(no aiosmtplib) so that on a 2-core machine the load driver costs little next to the services it
measures. Each result records the final DATA reply and the wall-clock time it arrived, which is
the "250 time" from which end-to-end latency is measured.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

QUEUED_PREFIX = "queued as "


@dataclass(frozen=True, slots=True)
class Submission:
    """One message to send: envelope, bytes, and the tag that finds it again at the sinks."""

    tag: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class Result:
    submission: Submission
    code: int | None  # None: no DATA reply (connection failed or dropped); outcome unknown
    reply: str
    replied_at: float  # wall clock (time.time()) when the final reply arrived
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.code == 250

    @property
    def refused(self) -> bool:
        """The server said no (4xx/5xx) at some step: the client still owns the message."""
        return self.code is not None and self.code >= 400

    @property
    def queue_id(self) -> str:
        _, _, rest = self.reply.partition(QUEUED_PREFIX)
        return rest.split()[0] if rest else ""


class SmtpReplyError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines: list[str] = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text[4:])
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), "\n".join(lines)


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, expect: int
) -> tuple[int, str]:
    writer.write(line + b"\r\n")
    code, text = await _reply(reader)
    if code != expect:
        raise SmtpReplyError(code, text)
    return code, text


def dot_stuff(data: bytes) -> bytes:
    """Message bytes as they go on the wire after DATA, terminator included."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def send_one(
    address: tuple[str, int],
    sub: Submission,
    *,
    auth: tuple[str, str] | None,
    helo: str = "load.test",
    timeout: float = 30.0,  # noqa: ASYNC109 - one budget for the whole transaction
) -> Result:
    """One connection, one transaction; never raises: failures become a Result."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*address)
            code, text = await _reply(reader)
            if code != 220:
                raise SmtpReplyError(code, text)
            await _command(reader, writer, b"EHLO " + helo.encode(), 250)
            if auth is not None:
                token = base64.b64encode(b"\0" + auth[0].encode() + b"\0" + auth[1].encode())
                await _command(reader, writer, b"AUTH PLAIN " + token, 235)
            await _command(reader, writer, f"MAIL FROM:<{sub.sender}>".encode(), 250)
            for rcpt in sub.recipients:
                await _command(reader, writer, f"RCPT TO:<{rcpt}>".encode(), 250)
            await _command(reader, writer, b"DATA", 354)
            writer.write(dot_stuff(sub.data))
            code, text = await _reply(reader)
            replied_at = time.time()
            writer.write(b"QUIT\r\n")
            return Result(sub, code, text, replied_at)
    except SmtpReplyError as exc:
        return Result(sub, exc.code, exc.text, time.time(), error=str(exc))
    except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
        return Result(sub, None, "", time.time(), error=repr(exc))
    finally:
        if writer is not None:
            writer.close()


async def run_load(
    targets: Sequence[tuple[str, int]],
    submissions: Sequence[Submission],
    *,
    sessions: int = 20,
    auth: tuple[str, str] | None = None,
    rate: float | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Send every submission over `sessions` concurrent connections, round-robin over targets.

    `rate` (messages/s) paces the start of each message so that a fault injected at a given
    moment lands in the middle of a steady flow instead of after a burst.
    """
    results: list[Result] = []
    queue: asyncio.Queue[tuple[int, Submission]] = asyncio.Queue()
    for item in enumerate(submissions):
        queue.put_nowait(item)
    started = time.monotonic()

    async def worker() -> None:
        while True:
            try:
                index, sub = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if rate:
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            result = await send_one(targets[index % len(targets)], sub, auth=auth)
            results.append(result)
            if on_result is not None:
                on_result(result)

    await asyncio.gather(*(worker() for _ in range(max(1, min(sessions, len(submissions))))))
    return results
