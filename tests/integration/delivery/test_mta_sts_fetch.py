"""The MTA-STS policy fetch over real HTTPS on loopback: one deadline for the whole fetch, no
worker thread, and the response rules of RFC 8461 3.3 (200, text/plain, no redirects, a
bounded body), on both paths: the policy host resolved by the Relais resolver, and
(delivery.public_mx_only) connected only at an address that was checked."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.delivery.mta_sts import MAX_POLICY_BYTES, MtaSts
from services.delivery.public_addresses import why_not_public
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer
from tests.support.policy_hosts import (
    LITERAL,
    NAMED,
    PolicyServer,
    RawTlsHost,
    Response,
    serving_policies,
    text_plain,
)

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: *.example.test\r\nmax_age: 86400\r\n"
PLAIN_POLICY = text_plain(POLICY.encode(), "text/plain; charset=utf-8")
PATHS = ["resolved", "pinned"]
DRIP = 0.3  # seconds between two bytes of the dripping host's response
TIMEOUT = 1.0


@pytest.fixture
def zone(dns_server: DNSServer) -> DNSServer:
    dns_server.add("_mta-sts.example.test", "TXT", "v=STSv1; id=1;")
    dns_server.add("mta-sts.example.test", "A", "127.0.0.1")
    return dns_server


def _sts(zone: DNSServer, pki: TestPKI, url: str, path: str, timeout: float = TIMEOUT) -> MtaSts:
    """The "pinned" path is delivery.public_mx_only's, with 127.0.0.1 standing in for a public
    address; the "resolved" one is the default's."""
    resolver = relais_dns.make_resolver(DnsConfig(servers=[f"{zone.host}:{zone.port}"]))
    if path == "pinned":
        return MtaSts(
            resolver,
            url_template=url,
            context=pki.client_context(),
            timeout=timeout,
            address_check=lambda a: None if a == "127.0.0.1" else why_not_public(a),
        )
    return MtaSts(resolver, url_template=url, context=pki.client_context(), timeout=timeout)


def _template(path: str) -> str:
    return NAMED if path == "pinned" else LITERAL


# --- a policy host that answers, slowly enough never to trip a per-read timeout ----------------


class DrippingHost(RawTlsHost):
    """Completes the handshake, reads the request, then sends a valid policy response one byte
    every DRIP seconds. `closed` is set when the client went away."""

    RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nversion: STSv1\nmode: none\nmax_age: 1\n"

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context)
        self.closed = threading.Event()

    def _answer(self, sock: socket.socket) -> None:
        try:
            with self.context.wrap_socket(sock, server_side=True) as tls:
                tls.recv(4096)
                for byte in self.RESPONSE:
                    if self.stopping.is_set():
                        return
                    tls.sendall(bytes([byte]))
                    time.sleep(DRIP)
        except OSError:
            self.closed.set()


@pytest.fixture
def dripping_host(pki: TestPKI) -> Iterator[DrippingHost]:
    with DrippingHost(pki.server_context()) as host:
        yield host


@pytest.mark.parametrize("path", PATHS)
async def test_a_dripping_policy_host_costs_one_timeout_not_one_per_byte(
    zone: DNSServer, pki: TestPKI, dripping_host: DrippingHost, path: str
) -> None:
    # Each byte comes well within the 1 s timeout: only a deadline on the whole fetch ends it.
    sts = _sts(zone, pki, _template(path).format(port=dripping_host.port, domain="{domain}"), path)
    started = time.monotonic()
    assert await sts.policy("example.test") is None
    elapsed = time.monotonic() - started
    assert dripping_host.connections == 1
    assert elapsed < 3 * TIMEOUT, f"the fetch took {elapsed:.1f}s"
    # Waited for in a thread: the loop must run for the close to happen.
    assert await asyncio.to_thread(dripping_host.closed.wait, 2 * TIMEOUT), "the connection is closed"


# --- a policy server with canned responses ----------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_a_policy_is_fetched_with_the_policy_host_as_tls_name_and_host(
    zone: DNSServer, pki: TestPKI, policy_server: PolicyServer, path: str
) -> None:
    policy_server.routes["/example.test"] = PLAIN_POLICY
    policy = await _sts(zone, pki, policy_server.url(_template(path)), path).policy("example.test")
    assert policy is not None and policy.mx == ("*.example.test",)
    port = policy_server.server_address[1]
    host = "mta-sts.example.test" if path == "pinned" else "127.0.0.1"
    assert policy_server.requests == [(f"{host}:{port}", "/example.test")]
    # No SNI for an IP literal (RFC 6066 3); the certificate is still checked against it.
    assert policy_server.server_names == (["mta-sts.example.test"] if path == "pinned" else [None])


async def test_without_public_mx_only_the_policy_host_is_resolved_by_the_relais_resolver(
    zone: DNSServer, pki: TestPKI, policy_server: PolicyServer
) -> None:
    # Only the test zone knows mta-sts.example.test: the system resolver (urllib's) does not.
    policy_server.routes["/example.test"] = PLAIN_POLICY
    url = NAMED.format(port=policy_server.server_address[1], domain="{domain}")
    policy = await _sts(zone, pki, url, "resolved").policy("example.test")
    assert policy is not None and policy.mode == "enforce"
    assert policy_server.server_names == ["mta-sts.example.test"]


async def test_a_wrong_certificate_is_refused(zone: DNSServer, pki: TestPKI) -> None:
    with serving_policies(pki.wrong_server_context()) as server:
        server.routes["/example.test"] = PLAIN_POLICY
        assert await _sts(zone, pki, server.url(NAMED), "pinned").policy("example.test") is None
    assert server.requests == []


REFUSED: dict[str, Callable[[int], Response]] = {
    # Section 3.3: "HTTP 3xx redirects MUST NOT be followed"; nor is a redirect's body a policy.
    "redirect": lambda port: (
        301,
        {"Location": f"https://127.0.0.1:{port}/moved", "Content-Type": "text/plain"},
        POLICY.encode(),
    ),
    "not-found": lambda port: (404, {"Content-Type": "text/plain"}, POLICY.encode()),
    "server-error": lambda port: (503, {"Content-Type": "text/plain"}, POLICY.encode()),
    "html": lambda port: (200, {"Content-Type": "text/html"}, POLICY.encode()),
    "no-content-type": lambda port: (200, {}, POLICY.encode()),
    # A body shorter than announced may have lost its mx lines: not a policy.
    "cut-short": lambda port: (200, {"Content-Type": "text/plain", "Content-Length": "400"}, POLICY.encode()),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("response", list(REFUSED))
async def test_a_response_other_than_a_plain_text_200_is_no_policy(
    zone: DNSServer, pki: TestPKI, policy_server: PolicyServer, path: str, response: str
) -> None:
    port = policy_server.server_address[1]
    policy_server.routes["/example.test"] = REFUSED[response](port)
    policy_server.routes["/moved"] = PLAIN_POLICY
    assert await _sts(zone, pki, policy_server.url(_template(path)), path).policy("example.test") is None
    assert [p for _, p in policy_server.requests] == ["/example.test"], "nothing else was asked"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("length", [True, False], ids=["content-length", "to-eof"])
async def test_an_oversized_body_is_cut_at_max_policy_bytes(
    zone: DNSServer, pki: TestPKI, policy_server: PolicyServer, path: str, length: bool
) -> None:
    # The policy, a long comment-like line, then an mx line past MAX_POLICY_BYTES.
    body = (POLICY + "x" * MAX_POLICY_BYTES + "\r\nmx: late.example.test\r\n").encode()
    headers = {"Content-Type": "text/plain"} | ({"Content-Length": str(len(body))} if length else {})
    policy_server.routes["/example.test"] = (200, headers, body)
    policy = await _sts(zone, pki, policy_server.url(_template(path)), path).policy("example.test")
    assert policy is not None and policy.mx == ("*.example.test",), policy


async def test_the_fetch_needs_no_worker_thread(
    zone: DNSServer, pki: TestPKI, policy_server: PolicyServer
) -> None:
    """Policy hosts that hang used to hold the default executor's threads; with all of them
    busy the fetch still goes."""
    policy_server.routes["/example.test"] = PLAIN_POLICY
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)
    busy = threading.Event()
    loop.run_in_executor(None, busy.wait, 30.0)
    try:
        for path in PATHS:
            sts = _sts(zone, pki, policy_server.url(_template(path)), path, timeout=2.0)
            assert await asyncio.wait_for(sts.policy("example.test"), 5.0) is not None, path
    finally:
        busy.set()
        executor.shutdown(wait=False)
