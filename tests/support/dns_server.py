"""A small authoritative DNS server for tests: UDP and TCP on one loopback (host, port).

It runs its own asyncio loop in a daemon thread, so sync code, async tests and child
processes pointed at host:port all see the same records. Every name lives in one zone the
server owns: no recursion, no delegation, no wildcards.

    with DNSServer() as dns_server:
        dns_server.add("example.test", "MX", "10 mx1.example.test.")
        dns_server.add("mx1.example.test", "A", "127.0.0.2")
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
from types import TracebackType
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rrset

IN = dns.rdataclass.IN
NEGATIVE_TTL = 30
# Longer chains are almost certainly a loop the test set up by mistake.
_MAX_CNAME_CHAIN = 8
_TXT_STRING_MAX = 255
# A query without EDNS promises nothing beyond the RFC 1035 limit.
_UDP_CLASSIC_LIMIT = 512
_TCP_LIMIT = 65535


def to_name(name: str) -> dns.name.Name:
    """Absolute name, IDNA-encoded with dnspython's default codec.

    That codec is the one dnspython's resolver applies to a unicode query name (IDNA 2008
    when the `idna` package is installed), so records added as "münchen.test" answer
    queries for the same unicode name.
    """
    return dns.name.from_text(name, origin=dns.name.root)


def _rdtype(text: str) -> dns.rdatatype.RdataType:
    try:
        return dns.rdatatype.from_text(text)
    except dns.rdatatype.UnknownRdatatype:
        raise ValueError(f"unknown DNS record type {text!r}") from None


def _txt_rdata(value: str) -> dns.rdata.Rdata:
    # A DKIM key is one record split into several <=255-byte character-strings; callers
    # pass it whole. A value starting with a quote is zone-file syntax, for tests that want
    # to choose the split themselves. Raw text must not go through the zone-file parser,
    # which would treat the ';' in "v=DKIM1; k=rsa; p=..." as a comment.
    if value.startswith('"'):
        return dns.rdata.from_text(IN, dns.rdatatype.TXT, value)
    raw = value.encode()
    strings = [raw[i : i + _TXT_STRING_MAX] for i in range(0, len(raw), _TXT_STRING_MAX)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(IN, dns.rdatatype.TXT, strings)


def _rdata(rdtype: dns.rdatatype.RdataType, text: str) -> dns.rdata.Rdata:
    if rdtype == dns.rdatatype.TXT:
        return _txt_rdata(text)
    # origin=root makes a target written without its trailing dot absolute, as for owners.
    return dns.rdata.from_text(IN, rdtype, text, origin=dns.name.root, relativize=False)


def _negative_soa(name: dns.name.Name) -> dns.rrset.RRset:
    # Resolvers look for an SOA whose owner is an ancestor of the name; take the last two
    # labels as the apex ("example.test" for "a.b.example.test").
    apex = name.split(min(len(name), 3))[1]
    soa = dns.rdtypes.ANY.SOA.SOA(
        IN,
        dns.rdatatype.SOA,
        dns.name.Name([b"ns"]).concatenate(apex),
        dns.name.Name([b"hostmaster"]).concatenate(apex),
        1,
        3600,
        600,
        86400,
        NEGATIVE_TTL,
    )
    rrset = dns.rrset.RRset(apex, IN, dns.rdatatype.SOA)
    rrset.add(soa, NEGATIVE_TTL)
    return rrset


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets bound to the same (host, port); port 0 picks one free for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    attempts = 50 if port == 0 else 1
    for attempt in range(attempts):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # Lets a stopped server come back on its port despite TIME_WAIT connections.
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            udp.bind((host, tcp.getsockname()[1]))
        except OSError as error:
            tcp.close()
            udp.close()
            # The kernel's free TCP port can be taken for UDP; try another one.
            if error.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                continue
            raise
        tcp.listen(64)
        tcp.setblocking(False)
        udp.setblocking(False)
        return udp, tcp
    raise AssertionError("unreachable")


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance-checked: CPython's selector datagram transport does not subclass
        # asyncio.DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = self._server.handle_wire(data, tcp=False)
        if wire is not None and self._transport is not None:
            self._transport.sendto(wire, addr)


class DNSServer:
    """Authoritative answers from an in-memory record table; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._servfail_names: set[dns.name.Name] = set()
        self._servfail_all = False
        self._drop = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._tcp_clients: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}

    # -- records and behaviour (callable from any thread, before or after start) --------

    def add(self, name: str, rdtype: str, *rdatas: str, ttl: int = 60) -> None:
        """Add records to the name's RRset of that type (created if needed)."""
        if not rdatas:
            raise ValueError("add() needs at least one rdata")
        owner = to_name(name)
        rtype = _rdtype(rdtype)
        parsed = [_rdata(rtype, text) for text in rdatas]
        with self._lock:
            node = self._records.setdefault(owner, {})
            # A CNAME owner has no other data (RFC 1034 3.6.2); mixing them is a test bug.
            if node and (rtype == dns.rdatatype.CNAME) != (dns.rdatatype.CNAME in node):
                raise ValueError(f"{owner} cannot hold a CNAME together with other records")
            rrset = node.setdefault(rtype, dns.rrset.RRset(owner, IN, rtype))
            for rdata in parsed:
                rrset.add(rdata)
            rrset.ttl = ttl

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove one type's records of a name, or all of them when rdtype is None."""
        owner = to_name(name)
        with self._lock:
            node = self._records.get(owner)
            if node is None:
                return
            if rdtype is None:
                node.clear()
            else:
                node.pop(_rdtype(rdtype), None)
            if not node:
                del self._records[owner]

    def set_servfail(self, name: str | None, enabled: bool = True) -> None:
        """Answer SERVFAIL for queries of that name, or of every name when name is None."""
        with self._lock:
            if name is None:
                self._servfail_all = enabled
            elif enabled:
                self._servfail_names.add(to_name(name))
            else:
                self._servfail_names.discard(to_name(name))

    def set_drop(self, enabled: bool) -> None:
        """Ignore every query (still logged), so clients see a dead resolver and time out."""
        self._drop = enabled

    # -- answering (pure: usable in unit tests without sockets) --------------------------

    def build_response(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to a query, or None when it is to be dropped."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        with self._lock:
            self.queries.append(
                (question.name.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(question.rdtype))
            )
            if self._drop:
                return None
            if self._servfail_all or question.name in self._servfail_names:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            if question.rdclass != IN:
                response.set_rcode(dns.rcode.REFUSED)
                return response
            rcode, answer, authority = self._lookup(question.name, question.rdtype)
        response.set_rcode(rcode)
        response.answer.extend(answer)
        response.authority.extend(authority)
        return response

    def _lookup(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> tuple[dns.rcode.Rcode, list[dns.rrset.RRset], list[dns.rrset.RRset]]:
        # Caller holds the lock. RRsets are copied because add() mutates them in place
        # while the copy is rendered outside the lock.
        answer: list[dns.rrset.RRset] = []
        name = qname
        for _ in range(_MAX_CNAME_CHAIN + 1):
            node = self._records.get(name)
            if node is None:
                # An empty non-terminal ("_domainkey.example.test" above a DKIM key) exists.
                exists = any(owner.is_subdomain(name) for owner in self._records)
                rcode = dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN
                return rcode, answer, [_negative_soa(name)]
            if rdtype == dns.rdatatype.ANY:
                return dns.rcode.NOERROR, answer + [r.copy() for r in node.values()], []
            if rdtype in node:
                return dns.rcode.NOERROR, [*answer, node[rdtype].copy()], []
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None:
                return dns.rcode.NOERROR, answer, [_negative_soa(name)]
            answer.append(cname.copy())
            name = cname[0].target
        return dns.rcode.SERVFAIL, [], []

    def handle_wire(self, data: bytes, *, tcp: bool) -> bytes | None:
        """Wire-format response to a wire-format query (without TCP length prefix)."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None  # Not DNS; a test server has no one to report it to.
        response = self.build_response(query)
        if response is None:
            return None
        if tcp:
            # Explicit, or to_wire() would cap at the EDNS payload the query advertised.
            return response.to_wire(max_size=_TCP_LIMIT)
        limit = query.payload if query.edns >= 0 else _UDP_CLASSIC_LIMIT
        # Sets TC when the answer does not fit, so clients retry over TCP.
        return response.to_wire(max_size=limit, prefer_truncation=True)

    # -- network --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        udp, tcp = _bind_pair(self.host, self.port)
        # Remember the port so that a restart after stop() comes back on the same address.
        self.port = int(tcp.getsockname()[1])
        ready = threading.Event()
        self._startup_error = None
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(udp, tcp, ready),), name=f"dns-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or self._startup_error is not None:
            self.stop()
            raise RuntimeError(f"DNS server on {self.host}:{self.port} did not start") from (
                self._startup_error
            )

    def stop(self) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # The loop already ended.
                loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        self._thread = self._loop = self._stopping = None

    async def _serve(self, udp: socket.socket, tcp: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._stopping = loop, asyncio.Event()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _UDPProtocol(self), sock=udp)
            server = await asyncio.start_server(self._serve_tcp_client, sock=tcp)
        except Exception as error:
            # Reported by start() in the caller's thread rather than as a stray thread crash.
            udp.close()
            tcp.close()
            self._startup_error = error
            ready.set()
            return
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            transport.close()
            # Hang up on TCP clients (e.g. parked while dropping) and let their handlers see
            # EOF and return: Python 3.11 logs a spurious error for a cancelled stream handler.
            clients = dict(self._tcp_clients)
            for writer in clients:
                writer.close()
            if clients:
                await asyncio.wait(clients.values(), timeout=5)
            await server.wait_closed()

    async def _serve_tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tcp_clients[writer] = task
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                wire = self.handle_wire(await reader.readexactly(length), tcp=True)
                if wire is not None:
                    writer.write(struct.pack("!H", len(wire)) + wire)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # The client hung up, which is how DNS over TCP sessions end.
        finally:
            self._tcp_clients.pop(writer, None)
            writer.close()

    def __enter__(self) -> DNSServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
