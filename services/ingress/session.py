"""What the ingress knows about one SMTP session beyond aiosmtpd's Session."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from aiosmtpd.proxy_protocol import V2_CMD
from aiosmtpd.smtp import Session

log = logging.getLogger(__name__)


@dataclass
class SessionFacts:
    """What the ingress learned about one SMTP session beyond aiosmtpd's Session."""

    client_ip: str = ""
    account: str = ""  # authenticated, or the relay-networks account
    holds_session_slot: bool = False


def facts(session: Session) -> SessionFacts:
    found = getattr(session, "relais", None)
    if found is None:
        found = SessionFacts(client_ip=peer_ip(session))
        session.relais = found  # type: ignore[attr-defined]
    return found


def peer_ip(session: Session) -> str:
    """The client's address: the PROXY header's when there is one, else the socket's.

    "" when a PROXY header names no IP address (v1 UNKNOWN, v2 LOCAL, UNSPEC or AF_UNIX): the
    client is then unknown, not the load balancer, whose address may well be in relay_networks.
    """
    proxy = session.proxy_data
    if proxy is None:
        return socket_peer_ip(session)
    if getattr(proxy, "command", None) == V2_CMD.LOCAL:
        return ""  # PROXY protocol 2.2: the addresses, if any, are to be ignored
    source = getattr(proxy, "src_addr", None)
    return str(unmapped(source)) if isinstance(source, IPv4Address | IPv6Address) else ""


def unmapped(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """An IPv4 client written as ::ffff:a.b.c.d (by a dual-stack load balancer or socket) is
    a.b.c.d, for relay_networks, limits and Received: (Postfix's PROXY reader does the same)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def socket_peer_ip(session: Session) -> str:
    """The address at the other end of the socket (a load balancer's, behind PROXY protocol)."""
    return str(session.peer[0]) if session.peer else ""


def tls_facts(session: Session) -> tuple[str, str] | None:
    ssl_info = session.ssl
    if not ssl_info:
        return None
    try:
        obj = ssl_info.get("ssl_object") if isinstance(ssl_info, dict) else None
        if obj is not None:
            cipher = obj.cipher()
            return obj.version() or "TLS", cipher[0] if cipher else "unknown"
    except Exception:  # pragma: no cover - purely informational
        log.debug("could not read TLS facts", exc_info=True)
    return ("TLS", "unknown")
