"""The DNS resolver every service shares: configured servers (with port), timeouts, TTL cache.

Answers are classified once here into what they mean for mail: records, "definitely not"
(NXDOMAIN / no data), or "try later" (SERVFAIL, timeout) — never a bare dnspython exception.

The cache is dnspython's LRU cache with two operator caps: a record's TTL is honoured but never
beyond `cache_max_ttl` (a mistyped week-long TTL must not pin a dead MX), and negative answers
(NXDOMAIN, no data; TTL from the zone's SOA per RFC 2308) at most `negative_ttl`. Temporary
failures are never cached, so a SERVFAIL heals as soon as the authority does. `cache_size`
counts an answer once per `ANSWER_OCTETS` of its DNS message, so that it bounds memory too.

Lookups that miss the cache together share one query: when a busy domain's answer expires,
every job in flight for it misses at once, and each would otherwise ask the same question.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine
from functools import lru_cache
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from services.core import metrics
from services.core.config import DnsConfig, split_server

log = logging.getLogger(__name__)


class DnsTemporaryError(Exception):
    """SERVFAIL, timeout or no reachable server: the answer may be different later.

    Its text names the query and the kind of failure, as Postfix's "Name service error for
    name=... type=MX: ..." does, and never the resolver: it reaches senders (DSNs, delay warnings)
    and webhooks, and which server answered what (dnspython's text) is for the service's log."""

    def __init__(self, name: str, rdtype: str, kind: str) -> None:
        super().__init__(f"Name service error for name={name} type={rdtype}: {kind}")
        self.name = name
        self.rdtype = rdtype
        self.kind = kind


class NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


# A cached answer counts once per this many octets (started) of the DNS message it came in. A
# message may hold 64 KiB: a few thousand MX records, 1.25 MB once parsed, that a zone anyone can
# set up serves for every name under it. Counted once each, like the few hundred octets of an
# answer mail needs, `cache_size` of them would outgrow any process.
ANSWER_OCTETS = 512


def answer_weight(answer: dns.resolver.Answer) -> int:
    """How many of `cache_size` a cached answer takes: 1, or more for a large one."""
    wire = getattr(answer.response, "wire", None) or b""
    return max(1, -(-len(wire) // ANSWER_OCTETS))


class CappedCache(dns.resolver.LRUCache):
    """LRU answer cache whose entries expire at min(record TTL, cap); negative ones at a lower cap.

    `max_size` bounds the answers held counted by `answer_weight`, not one each."""

    def __init__(self, max_size: int, max_ttl: float, negative_ttl: float) -> None:
        super().__init__(max_size)
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.weight = 0  # of the answers held
        self._weights: dict[dns.resolver.CacheKey, int] = {}
        # What `query` made of a cached answer, by (name, type), until that answer expires: a hit
        # through dnspython still builds names, a resolution and, for "no data", an exception
        # (a fifth of the router's and a tenth of delivery's CPU per message went there). It
        # holds the answers' records too, so it is bounded by their weight as well.
        self.decoded: dict[tuple[str, str], tuple[float, list[dns.rdata.Rdata] | None, int]] = {}
        self.decoded_weight = 0

        self._asking: dict[tuple[str, str], asyncio.Task[list[dns.rdata.Rdata] | None]] = {}

    def flush(self, key: dns.resolver.CacheKey | None = None) -> None:
        super().flush(key)
        with self.lock:
            if key is None:
                self._weights.clear()
                self.weight = 0
            else:
                self.weight -= self._weights.pop(key, 0)
        self.decoded.clear()
        self.decoded_weight = 0

    def get(self, key: dns.resolver.CacheKey) -> dns.resolver.Answer | None:
        answer = super().get(key)
        if answer is None:
            with self.lock:
                if key not in self.data:  # expired, and let go by dnspython
                    self.weight -= self._weights.pop(key, 0)
        return answer

    def _drop(self, key: dns.resolver.CacheKey) -> None:
        # The caller holds the lock.
        node = self.data.pop(key, None)
        if node is not None:
            node.unlink()
        self.weight -= self._weights.pop(key, 0)

    def asking(
        self, name: str, rdtype: str, ask: Callable[[], Coroutine[Any, Any, list[dns.rdata.Rdata] | None]]
    ) -> asyncio.Task[list[dns.rdata.Rdata] | None]:
        """The query for (name, type) in flight on this event loop, started with `ask` if none is."""
        key = (name, rdtype)
        loop = asyncio.get_running_loop()
        task = self._asking.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(ask())
            self._asking[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def _finished(self, key: tuple[str, str], task: asyncio.Task[list[dns.rdata.Rdata] | None]) -> None:
        if self._asking.get(key) is task:
            del self._asking[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller was cancelled meanwhile

    def remember(
        self,
        name: str,
        rdtype: str,
        expiration: float,
        result: list[dns.rdata.Rdata] | None,
        weight: int = 1,
    ) -> None:
        if weight > self.max_size:
            return  # not cached by dnspython either
        old = self.decoded.pop((name, rdtype), None)
        self.decoded_weight -= old[2] if old else 0
        if self.decoded_weight + weight > self.max_size:
            self.decoded.clear()  # rare (a full cache of live answers): start afresh
            self.decoded_weight = 0
        self.decoded[(name, rdtype)] = (expiration, result, weight)
        self.decoded_weight += weight

    def recall(self, name: str, rdtype: str) -> tuple[bool, list[dns.rdata.Rdata] | None]:
        hit = self.decoded.get((name, rdtype))
        if hit is None or hit[0] <= time.time():
            return False, None
        self.statistics.hits += 1
        return True, hit[1]

    def expiration_of(self, name: str, rdtype: str) -> float:
        """When dnspython's cached answer for `name` expires (0: not cached, e.g. TTL 0).
        NXDOMAIN is cached under type ANY."""
        qname = dns.name.from_text(name)
        for kind in (dns.rdatatype.from_text(rdtype), dns.rdatatype.ANY):
            node = self.data.get((qname, kind, dns.rdataclass.IN))
            if node is not None:
                return node.value.expiration
        return 0.0

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        # NXDOMAIN is stored under rdtype ANY; "no data" is an answer without an rrset.
        negative = value.rrset is None or key[1] == dns.rdatatype.ANY
        cap = self.negative_ttl if negative else self.max_ttl
        value.expiration = min(value.expiration, time.time() + cap)
        weight = answer_weight(value)
        with self.lock:
            self._drop(key)
            if weight > self.max_size:
                return  # larger than the whole cache: asked again each time
            while self.data and self.weight + weight > self.max_size:
                self._drop(self.sentinel.prev.key)  # least recently used first
            self._weights[key] = weight
            self.weight += weight
        # Never evicts now: the answers held weigh at least one each.
        super().put(key, value)


def make_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    if config.servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in map(split_server, config.servers)
        ]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = config.timeout
    resolver.timeout = min(config.timeout, 2.0)
    resolver.cache = CappedCache(config.cache_size, config.cache_max_ttl, config.negative_ttl)
    metrics.DNS_CACHE.track(resolver.cache)  # hit rate on /metrics
    return resolver


@lru_cache(maxsize=16384)  # pure, and called for every recipient domain of every message
def to_ascii(domain: str) -> str:
    """IDNA (punycode) form of a possibly non-ASCII domain, without the trailing dot.

    Raises ValueError for a name that cannot exist in the DNS (empty or over-long labels).
    """
    try:
        return dns.name.from_text(domain.rstrip(".")).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ValueError(f"not a valid domain name: {domain!r}") from exc


async def query(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
    """Records of a type; [] when the name exists without such records; None for NXDOMAIN."""
    cache = resolver.cache if isinstance(resolver.cache, CappedCache) else None
    if cache is None:
        return await _ask(resolver, None, name, rdtype)
    known, records = cache.recall(name, rdtype)
    if not known:
        # Shielded: a caller that gives up must not cancel the query for the others.
        shared = cache.asking(name, rdtype, lambda: _ask(resolver, cache, name, rdtype))
        records = await asyncio.shield(shared)
    return None if records is None else list(records)


async def _ask(
    resolver: dns.asyncresolver.Resolver, cache: CappedCache | None, name: str, rdtype: str
) -> list[dns.rdata.Rdata] | None:
    result: list[dns.rdata.Rdata] | None
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        result = None
    except dns.resolver.NoAnswer:
        result = []
    except dns.exception.DNSException as exc:
        # NoNameservers (SERVFAIL/REFUSED everywhere), timeouts, malformed answers.
        log.info("DNS lookup of %s %s failed: %s", name, rdtype, exc)
        raise temporary_error(name, rdtype, exc) from exc
    else:
        result = list(answer)
        if cache is not None:
            cache.remember(name, rdtype, answer.expiration, result, answer_weight(answer))
        return list(result)
    if cache is not None:
        # A negative answer expires when dnspython's cached copy does (SOA TTL, capped).
        expiration = cache.expiration_of(name, rdtype)
        if expiration > time.time():
            cache.remember(name, rdtype, expiration, result)
    return result


def temporary_error(name: str, rdtype: str, exc: dns.exception.DNSException) -> DnsTemporaryError:
    """`exc`, a failed lookup of (name, type), told by its kind: "timeout", the rcodes the servers
    answered ("SERVFAIL", "REFUSED"), "connection refused", "bad answer"."""
    if isinstance(exc, dns.exception.Timeout):
        kind = "timeout"
    elif isinstance(exc, dns.resolver.NoNameservers):
        # One (server, tcp, port, answer) per try: an rcode's text, or what went wrong.
        kinds = dict.fromkeys(_answer_kind(error[3]) for error in exc.kwargs.get("errors") or ())
        kind = ", ".join(kinds) or "no name server to ask"
    elif isinstance(exc, dns.resolver.YXDOMAIN):
        kind = "YXDOMAIN"
    else:
        kind = "bad answer"
    return DnsTemporaryError(name, rdtype, kind)


def _answer_kind(answer: object) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, dns.exception.Timeout):
        return "timeout"
    if isinstance(answer, ConnectionRefusedError):
        return "connection refused"
    if isinstance(answer, OSError | EOFError):
        return "network error"
    return "bad answer"


def ip_literal(host: str) -> str | None:
    """The address when `host` is an IP literal ("192.0.2.1", "[2001:db8::1]"), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """IPv4 then IPv6 addresses of a host (CNAMEs followed); an IP literal is returned as is."""
    return await host_addresses(resolver, host) or []


async def host_addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str] | None:
    """`addresses`, but None when the host does not exist (NXDOMAIN), so that a caller can name
    it apart from a host that exists without an address ([])."""
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    found: list[str] = []
    temporary: DnsTemporaryError | None = None
    for rdtype in ("A", "AAAA"):
        try:
            records = await query(resolver, host, rdtype)
        except DnsTemporaryError as exc:
            temporary = exc
            continue
        if records is None:
            if temporary is None and not found:
                return None
            break
        found.extend(r.to_text() for r in records)
    if not found and temporary is not None:
        raise temporary
    return found
