"""How a listener lets a connection in, from the moment it is accepted.

The connection gate counts a connection before anything is read from it: before an implicit-TLS
handshake (up to `handshake_timeout`) and before a PROXY header (up to aiosmtpd's PROXY timeout),
or one address could hold any number of sockets in those windows.

- Without PROXY protocol the socket's peer is the client: it counts against
  `max_connections_per_ip` at once, and keeps counting through the TLS handshake and the session.
  A TLS client refused is closed without a word: it expects a handshake, and doing one just to
  say 421 is the work the limit is there to save.
- With PROXY protocol the peer is a load balancer, shared by every client behind it: counted
  against its clients' per-IP limit it would refuse legitimate traffic, counted nowhere it lets
  anyone hold sockets. So it counts apart, per peer, against `max_proxy_pending_per_peer`, until
  the header names the client, whose IP then counts instead. A peer outside the listener's
  `proxy_from` is closed at once: its header would not be believed anyway.
- Every connection admitted also takes a seat on its listener, whatever its address, against
  `ingress.max_connections`: many addresses together must not exhaust the process either.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass

from services.ingress.limits import ConnectionGate, GatePass
from services.ingress.policy import in_networks
from services.ingress.replies import LISTENER_FULL, TOO_MANY_CONNECTIONS, Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Door:
    """One listener's rules for a just-accepted connection."""

    gate: ConnectionGate
    # The listen address: its connections count apart from the replica's other listeners'.
    listener: str
    # TLS from the first byte (implicit TLS): the SMTP session starts once the handshake is done.
    tls: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0
    # A PROXY header comes first, taken only from `proxy_from` (CIDRs) when that is not empty.
    proxy: bool = False
    proxy_from: tuple[str, ...] = ()

    def enter(self, transport: asyncio.BaseTransport) -> GatePass | Verdict | None:
        """The connection's count in the gate; else the reply to give before closing it, or None
        to close it without one."""
        peer = peer_address(transport)
        admitted = GatePass(self.gate)
        if self.proxy:
            if self.proxy_from and not in_networks(peer, self.proxy_from):
                log.warning("PROXY listener: connection from %s, not a load balancer: closed", peer)
                return None
            # The load balancer relays a refusal to its client: a plain temporary one.
            counted = admitted.wait(peer)
        else:
            counted = admitted.admit(peer)
        if not counted:
            refusal = TOO_MANY_CONNECTIONS
        elif not admitted.sit(self.listener):
            admitted.release()
            refusal = LISTENER_FULL
        else:
            return admitted
        return None if self.tls is not None else refusal


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else ""


def start_tls(
    protocol: asyncio.BaseProtocol,
    transport: asyncio.Transport,
    door: Door,
    over: Callable[[], None],
) -> None:
    """Put TLS between `transport` and `protocol` as asyncio's `create_server(ssl=...)` does,
    only after the gate has counted the connection: `protocol.connection_made` is called again,
    with the TLS transport, when the handshake is done. `over` is called once the handshake is
    over either way (done, failed, timed out, the client gone)."""
    assert door.tls is not None
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    tls = sslproto.SSLProtocol(
        loop, protocol, door.tls, waiter, server_side=True, ssl_handshake_timeout=door.handshake_timeout
    )
    transport.set_protocol(tls)
    tls.connection_made(transport)

    def done(future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            future.exception()  # a failed handshake is routine here, not an unretrieved error
        over()

    waiter.add_done_callback(done)
