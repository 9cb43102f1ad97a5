"""The policy host's addresses each get a share of the fetch's one deadline: a first address
that drops SYNs (or never completes TLS) leaves time for the next one. A body delimited by the
end of the connection counts only when the TLS connection ended cleanly."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.delivery.mta_sts import MtaSts
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer
from tests.support.policy_hosts import RawTlsHost

HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
FULL = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: mx2.example.test\r\nmax_age: 86400\r\n"
)
CUT = FULL[: FULL.index(b"mx: mx2")]  # what an on-path attacker lets through


class OneShotTls(RawTlsHost):
    """Reads the request, sends `response`, then ends the TCP connection without close_notify
    (`truncate`) or with it."""

    def __init__(self, context: ssl.SSLContext, response: bytes, *, truncate: bool) -> None:
        super().__init__(context)
        self._response = response
        self._truncate = truncate
        self.requests = 0

    def _answer(self, sock: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(sock, server_side=True)
            tls.recv(4096)
            self.requests += 1
            tls.sendall(self._response)
            if self._truncate:
                sock.shutdown(socket.SHUT_RDWR)  # FIN, no close_notify
                time.sleep(0.5)
                sock.close()
            else:
                tls.unwrap()
                tls.close()
        except OSError:
            pass


@pytest.fixture
def zone(dns_server: DNSServer) -> DNSServer:
    dns_server.add("_mta-sts.example.test", "TXT", "v=STSv1; id=1;")
    return dns_server


def _sts(zone: DNSServer, pki: TestPKI, url: str, timeout: float) -> MtaSts:
    resolver = relais_dns.make_resolver(DnsConfig(servers=[f"{zone.host}:{zone.port}"]))
    return MtaSts(resolver, url_template=url, context=pki.client_context(), timeout=timeout)


@pytest.fixture
def truncating(pki: TestPKI) -> Iterator[OneShotTls]:
    with OneShotTls(pki.server_context(), HEAD + CUT, truncate=True) as server:
        yield server


async def test_a_truncated_eof_delimited_body_is_no_policy(
    zone: DNSServer, pki: TestPKI, truncating: OneShotTls
) -> None:
    zone.add("mta-sts.example.test", "A", "127.0.0.1")
    url = f"https://mta-sts.{{domain}}:{truncating.port}/"
    policy = await _sts(zone, pki, url, 3.0).policy("example.test")
    assert truncating.requests == 1
    assert policy is None, f"a policy cut off without close_notify was taken: {policy}"


@pytest.mark.parametrize("first", ["syn-dropped", "tls-silent"])
async def test_a_dead_first_address_leaves_no_time_for_the_next(
    zone: DNSServer, pki: TestPKI, first: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OneShotTls(pki.server_context(), HEAD + FULL, truncate=False) as good:
        # 127.0.0.5:<same port>: either drops SYNs (accept queue full), or accepts TCP and never
        # says a TLS word.
        dead = socket.socket()
        dead.bind(("127.0.0.5", good.port))
        dead.listen(0)
        filler = socket.create_connection(("127.0.0.5", good.port)) if first == "syn-dropped" else None
        try:
            zone.add("mta-sts.example.test", "A", "127.0.0.5")
            zone.add("mta-sts.example.test", "A", "127.0.0.1")
            # The test DNS server answers the RRset in any order; pin the dead address first, as
            # a resolver that rotates answers does every other time.
            found = relais_dns.addresses

            async def dead_first(resolver, host):  # type: ignore[no-untyped-def]
                return sorted(await found(resolver, host), key=lambda a: a != "127.0.0.5")

            monkeypatch.setattr(relais_dns, "addresses", dead_first)
            url = f"https://mta-sts.{{domain}}:{good.port}/"
            started = time.monotonic()
            policy = await _sts(zone, pki, url, 2.0).policy("example.test")
            elapsed = time.monotonic() - started
        finally:
            if filler is not None:
                filler.close()
            dead.close()
    assert policy is not None, (
        f"no policy after {elapsed:.1f}s; requests at the good address: {good.requests}"
    )


async def test_an_eof_delimited_body_ended_cleanly_is_the_policy(zone: DNSServer, pki: TestPKI) -> None:
    # Control for the truncation test: same server, body ended by close_notify (and FIN).
    with OneShotTls(pki.server_context(), HEAD + FULL, truncate=False) as server:
        zone.add("mta-sts.example.test", "A", "127.0.0.1")
        url = f"https://mta-sts.{{domain}}:{server.port}/"
        started = time.monotonic()
        policy = await _sts(zone, pki, url, 3.0).policy("example.test")
        elapsed = time.monotonic() - started
    assert policy is not None and policy.mx == ("mx1.example.test", "mx2.example.test"), (policy, elapsed)
    assert elapsed < 1.0, f"took {elapsed:.1f}s of a 3 s deadline"
