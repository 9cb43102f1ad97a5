"""A policy host that hangs costs one fetch timeout, not one per message: the failure is
remembered for a while, and messages arriving during the fetch share it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.delivery.mta_sts import FAILED_FETCH_MEMORY, MtaSts
from tests.support.dns_server import DNSServer

TIMEOUT = 1.0


@pytest.fixture
def hanging_policy_host() -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts connections and never says a word: the TLS handshake of the fetch times out."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = False

    def accept() -> None:
        while not stop:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}/{{domain}}", accepted
    finally:
        stop = True
        thread.join(2)
        for sock in accepted:
            sock.close()
        listener.close()


async def test_a_hanging_policy_host_is_asked_once(
    dns_server: DNSServer, hanging_policy_host: tuple[str, list[socket.socket]]
) -> None:
    url, accepted = hanging_policy_host
    dns_server.add("_mta-sts.slow.test", "TXT", "v=STSv1; id=1;")
    resolver = relais_dns.make_resolver(DnsConfig(servers=[f"{dns_server.host}:{dns_server.port}"]))
    sts = MtaSts(resolver, url_template=url, context=ssl.create_default_context(), timeout=TIMEOUT)

    started = time.monotonic()
    # Five messages at once, then five more after the failure: one fetch in all.
    assert await asyncio.gather(*(sts.policy("slow.test") for _ in range(5))) == [None] * 5
    first = time.monotonic() - started
    again = time.monotonic()
    assert [await sts.policy("slow.test") for _ in range(5)] == [None] * 5
    assert time.monotonic() - again < TIMEOUT, "a failure is remembered"
    assert TIMEOUT <= first < 4 * TIMEOUT
    assert len(accepted) == 1, f"{len(accepted)} fetches"
    assert FAILED_FETCH_MEMORY >= 60
