"""Receivers whose DNS hangs must not hold back another account's webhook.

Webhook hosts were looked up on the event loop's default thread pool (min(32, cores + 4)
threads), where every lookup of the process waits its turn: a few accounts whose receiver's
domain has dead name servers filled it with hung lookups (a new one at every retry), and the
POSTs of every other account timed out waiting for a thread to look up theirs.

Real DNS: in a mount and network namespace of its own (root only), the system resolver is
pointed at a name server on loopback that never answers, and `localhost` (from /etc/hosts)
stands for a healthy receiver's name.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support import namespaces

DEAD_HOSTS = 40  # more than the default pool's 32 threads on any machine

SCRIPT = textwrap.dedent(
    f"""
    import asyncio, socket, time
    from services.bounce.webhooks import post

    async def main() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 53))  # a name server that takes every query and answers none

        async def ok(reader, writer):
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(ok, "127.0.0.1", 0)
        healthy = f"http://localhost:{{server.sockets[0].getsockname()[1]}}/hook"

        async def attempt(url):
            try:
                async with asyncio.timeout(2):
                    return await post(url, b"[]", {{}})
            except TimeoutError:
                return "timeout"

        tries = [0] * {DEAD_HOSTS}

        async def dead_receiver(i):  # as its account's loop does: POST, time out, back off, again
            while True:
                tries[i] += 1  # its lookup is asked for before this task next yields
                await attempt(f"http://dead{{i}}.example.test/hook")
                await asyncio.sleep(0.2)

        dead = [asyncio.create_task(dead_receiver(i)) for i in range({DEAD_HOSTS})]
        # Until every dead receiver has tried twice: its first lookup hung and timed out, the
        # second asked for behind it. Counted, not slept for: on a slow machine some might not
        # have tried yet, and the healthy receiver's lookup would not queue behind theirs.
        async with asyncio.timeout(30):
            while min(tries) < 2:
                await asyncio.sleep(0.05)
        print("healthy:", await attempt(healthy), flush=True)
        for task in dead:
            task.cancel()

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not namespaces.available(), reason="needs root and unshare (mount + network namespace)")
def test_receivers_hung_in_dns_do_not_hold_back_another_account_s_webhook(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
    script = tmp_path / "dns_isolation.py"
    script.write_text(SCRIPT)
    # The namespaces, the silent name server and the receiver all end with the process.
    done = namespaces.run_isolated(script, {resolv: "/etc/resolv.conf"})
    assert "healthy: 200" in done.stdout, done.stdout + done.stderr
