#!/usr/bin/env python3
"""First simple run: how fast `relais up` is ready, and delivered/s for 1,000 messages.

Starts `relais up` in a temporary data dir (embedded nats-server, four service processes,
capture mode), submits N messages over SMTP with AUTH from C concurrent clients, and waits
until all of them are in the local mailbox. Prints a table; nothing here is a test.

    python bench/first_run.py [--messages 1000] [--clients 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.embedded import free_port, wait_for_port  # noqa: E402
from tests.support.relais import relais_up  # noqa: E402
from tests.support.signals import unwind_on_sigterm  # noqa: E402


def message(i: int) -> bytes:
    body = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n" * 24
    return (
        f"From: bench@example.com\r\nTo: r{i}@example.net\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}@example.com>\r\n\r\n{body}"
    ).encode()


async def submit_all(port: int, password: str, total: int, clients: int) -> tuple[float, int]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    failures = 0

    async def client() -> None:
        nonlocal failures
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await smtp.connect()
        await smtp.login("demo", password)
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            try:
                await smtp.sendmail("bench@example.com", [f"r{i}@example.net"], message(i))
            except aiosmtplib.SMTPException:
                failures += 1
        await smtp.quit()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.monotonic() - started, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="relais-bench-") as tmp:
        data = Path(tmp) / "relais-data"
        port = free_port()
        started = time.monotonic()
        with relais_up(data, port, Path(tmp)):
            wait_for_port("127.0.0.1", port, timeout=60)
            ready = time.monotonic() - started
            password = (data / "demo-password.txt").read_text().strip()
            t0 = time.monotonic()
            submit_secs, failures = asyncio.run(submit_all(port, password, args.messages, args.clients))
            mailbox = data / "mailbox"
            deadline = time.monotonic() + 300
            delivered = 0
            while time.monotonic() < deadline:
                delivered = len(list(mailbox.glob("*.eml"))) if mailbox.exists() else 0
                if delivered >= args.messages - failures:
                    break
                time.sleep(0.05)
            total_secs = time.monotonic() - t0

    rows = [
        ("relais up ready (s)", f"{ready:.2f}"),
        ("messages submitted", f"{args.messages - failures} ({failures} refused)"),
        ("concurrent SMTP clients", str(args.clients)),
        ("accepted msg/s", f"{(args.messages - failures) / submit_secs:.0f}"),
        ("delivered (captured)", str(delivered)),
        ("delivered msg/s (submit start -> last in mailbox)", f"{delivered / total_secs:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({"ready_s": ready, "delivered": delivered, "delivered_per_s": delivered / total_secs}))
    return 0 if delivered >= args.messages - failures else 1


if __name__ == "__main__":
    unwind_on_sigterm()
    sys.exit(main())
