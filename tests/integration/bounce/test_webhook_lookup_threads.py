"""Each webhook host is looked up on a thread of its own, so that hung lookups of one receiver's
name hold back no other's (test_webhook_dns_isolation.py); that thread must end once its host
has no lookup left. It never did: the bounce service kept one idle thread for every host it had
ever posted to (every account's receiver, every URL a webhook was re-pointed from), for as long
as it ran.

Real DNS: in a mount and network namespace of its own (root only), /etc/hosts names each
receiver host, all of them a receiver on loopback.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support import namespaces

HOSTS = 60

SCRIPT = textwrap.dedent(
    f"""
    import asyncio, threading
    from services.bounce.webhooks import post

    async def main() -> None:
        async def ok(reader, writer):
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(ok, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        before = threading.active_count()
        statuses = set()
        for i in range({HOSTS}):  # one POST to each account's receiver
            statuses.add(await post(f"http://receiver{{i}}.hooks.test:{{port}}/hook", b"[]", {{}}))
        await asyncio.sleep(0.5)  # a lookup thread ends once its last lookup is done
        print("statuses:", sorted(statuses), flush=True)
        print("threads added:", threading.active_count() - before, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not namespaces.available(), reason="needs root and unshare (mount + network namespace)")
def test_a_lookup_thread_ends_with_its_host_s_last_lookup(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"127.0.0.1 receiver{i}.hooks.test\n" for i in range(HOSTS)))
    script = tmp_path / "lookup_threads.py"
    script.write_text(SCRIPT)
    done = namespaces.run_isolated(script, {hosts: "/etc/hosts"})
    assert "statuses: [200]" in done.stdout, done.stdout + done.stderr
    added = int(done.stdout.split("threads added:")[1].split()[0])
    assert added <= 1, done.stdout  # not one per host posted to
