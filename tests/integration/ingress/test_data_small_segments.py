"""A message that arrives in small TCP segments costs the process about what the DATA budget
counts for it. The reader used to keep one bytes object per segment read: for 2-octet segments
about 20 times the octets the budget counted (services/ingress/data.py)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import in_thread, plain
from tests.support.relais import ACCOUNT, PASSWORD

OCTETS = 100_000
SEGMENT = 2


_PACED = f"""
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
body = sys.stdin.buffer.read()
for i in range(0, len(body), {SEGMENT}):
    sock.send(body[i : i + {SEGMENT}])
    t = time.perf_counter() + 0.00005
    while time.perf_counter() < t:
        pass
sock.detach()
"""


def _send_slowly(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()
        + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
    )
    data = b""
    while b"354 " not in data:
        data += sock.recv(4096)
    body = b"Subject: s\r\n\r\n" + (b"y" * 78 + b"\r\n") * (OCTETS // 80)
    # A paced sender in its own process: one small segment at a time, as a remote client can.
    sender = subprocess.Popen(
        [sys.executable, "-c", _PACED, str(sock.fileno())], pass_fds=(sock.fileno(),), stdin=subprocess.PIPE
    )
    assert sender.stdin is not None
    sender.stdin.write(body)
    sender.stdin.close()
    sender.wait(60)
    return sock  # the end-of-data line not sent: the message is still being received


async def test_small_segments_cost_no_more_than_the_budget_says(
    make_ingress: Callable[..., Any],
) -> None:
    stack = await make_ingress(ingress={"max_message_size": 2 * OCTETS, "max_buffered_bytes": 4 * OCTETS})
    budget = stack.ingress.budget
    reads = [0, 0]  # reads, octets
    original = asyncio.StreamReader.read

    async def counting(self: asyncio.StreamReader, n: int = -1) -> bytes:
        block = await original(self, n)
        if n == sys.maxsize:
            reads[0] += 1
            reads[1] += len(block)
        return block

    asyncio.StreamReader.read = counting  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        sock = await in_thread(_send_slowly, stack.smtp_address)
        for _ in range(500):
            if budget.used >= OCTETS - 200:
                break
            await asyncio.sleep(0.02)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        asyncio.StreamReader.read = original  # type: ignore[method-assign]
    sock.close()
    print(
        f"budget.used={budget.used} reads={reads[0]} avg={reads[1] / max(1, reads[0]):.1f} "
        f"traced={current / 1e6:.1f} MB"
    )
    # What the process holds for the message stays near what the budget accounts for (about
    # 2x with tracemalloc's own records); one bytes object per segment read was about 20x.
    assert current < 4 * budget.used, (current, budget.used, reads)
