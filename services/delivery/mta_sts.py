"""MTA-STS (RFC 8461): discover, fetch, cache and parse a recipient domain's TLS policy.

Discovery is the `_mta-sts.<domain>` TXT record ("v=STSv1; id=..."); the policy itself comes
over HTTPS with a verified certificate from a URL template (`delivery.mta_sts_url`, normally
https://mta-sts.{domain}/.well-known/mta-sts.txt) so tests can serve it on loopback. A policy
is cached until its max_age and re-fetched when the TXT id changes, or when it is in use and
REFRESH_AFTER (a day) or half its max_age old (section 3.3: refreshed before it expires, so that
it does not lapse max_age after its first fetch for whoever blocks the policy host then); a
failed refresh keeps the cached policy (section 5.1), and no policy at all means opportunistic TLS.

The fetch is asyncio all the way, with no worker thread, under one deadline (`timeout`, the
delivery connect_timeout): the policy host's lookup, the connection, TLS, the request and the
whole response. A per-read timeout would let a host that sends a byte now and then hold the
fetch, and every message to the domain waiting on it, for as long as it likes. The policy host
is resolved with the Relais resolver (not getaddrinfo: no /etc/hosts, no https_proxy) and the
request is HTTP/1.0, so the body ends at Content-Length or the end of the connection, never in
chunks. With an address check (delivery.public_mx_only) a host without a public address
counts as a failed fetch, and the fetch connects only to addresses that were checked.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver

from services.core import dns as relais_dns
from services.delivery.public_addresses import AddressCheck

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 64 * 1024
MAX_HEAD_BYTES = 16 * 1024  # status line and headers of the policy response
MAX_POLICY_ADDRESSES = 3  # of the policy host's, tried in turn within the one deadline
CLOSE_GRACE = 1.0  # for the TLS close after a complete response
MAX_AGE_CAP = 31557600  # RFC 8461: at most one year
REFRESH_AFTER = 86400.0  # RFC 8461 3.3: "a suggested refresh frequency is once per day"


@dataclass(frozen=True, slots=True)
class StsPolicy:
    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]
    max_age: int
    id: str = ""


class PolicyError(ValueError):
    """A policy file that is not a valid STSv1 policy."""


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the single STSv1 TXT record, or None (none, or several: section 3.1)."""
    found = [r for r in records if r.replace(" ", "").startswith("v=STSv1;") or r.strip() == "v=STSv1"]
    if len(found) != 1:
        return None
    fields = dict(part.strip().split("=", 1) for part in found[0].split(";") if "=" in part and part.strip())
    return fields.get("id") or None


def parse_policy(text: str, policy_id: str = "") -> StsPolicy:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"unknown mode {mode!r}")
    try:
        max_age = int((fields.get("max_age") or [""])[0])
    except ValueError as exc:
        raise PolicyError("max_age is not a number") from exc
    mx = tuple(fields.get("mx", ()))
    if mode != "none" and not mx:
        raise PolicyError("no mx patterns")
    return StsPolicy(mode, mx, min(max(max_age, 0), MAX_AGE_CAP), policy_id)


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a policy URL points: `host` is the name checked in the certificate (and sent as
    SNI) and the one resolved; `authority` the Host header; `path` the request target."""

    host: str
    port: int
    authority: str
    path: str


def _target(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise PolicyError(f"not an https URL: {url!r}")
    literal = relais_dns.ip_literal(parts.hostname)
    host = literal or relais_dns.to_ascii(parts.hostname)  # SNI and DNS want the A-label
    port = parts.port or 443  # ValueError for a port that is not one
    shown = f"[{host}]" if literal and ":" in literal else host
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = shown if port == 443 else f"{shown}:{port}"
    # The domain comes from a recipient address: none of it may break out of the request.
    if not (authority + path).isascii() or any(c <= " " or c == "\x7f" for c in authority + path):
        raise PolicyError(f"{authority + path!r} is not plain printable ASCII")
    return _Target(host, port, authority, path)


async def _connect(
    addresses: Sequence[str], target: _Target, context: ssl.SSLContext, deadline: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS to the first of `addresses` that answers (at most MAX_POLICY_ADDRESSES are tried),
    verified for `target.host`: the name is not looked up again. Each address gets an equal
    share of what is left until `deadline` (the event loop's clock), so one that never answers
    leaves time for the next."""
    tried = list(addresses[:MAX_POLICY_ADDRESSES])
    loop = asyncio.get_running_loop()
    error: OSError = OSError(f"no address for {target.host}")
    for n, address in enumerate(tried):
        share = (deadline - loop.time()) / (len(tried) - n)
        try:
            async with asyncio.timeout(share):
                return await asyncio.open_connection(
                    address, target.port, ssl=context, server_hostname=target.host, limit=MAX_HEAD_BYTES
                )
        except TimeoutError:
            error = OSError(f"{address}: no TLS connection within {share:.1f}s")
        except OSError as exc:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
            error = exc
    raise error


async def _read_line(reader: asyncio.StreamReader, budget: int) -> str:
    line = await reader.readline()  # ValueError past the reader's limit (MAX_HEAD_BYTES)
    if not line.endswith(b"\n") or len(line) > budget:
        raise PolicyError("response head cut short or too long")
    return line.decode("latin-1").rstrip("\r\n")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lower-cased) of a response, MAX_HEAD_BYTES at most."""
    budget = MAX_HEAD_BYTES
    status_line = await _read_line(reader, budget)
    budget -= len(status_line) + 2
    version, _, rest = status_line.partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not (code.isascii() and code.isdigit()):
        raise PolicyError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while line := await _read_line(reader, budget):
        budget -= len(line) + 2
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():  # obsolete line folding, or junk
            raise PolicyError(f"malformed header line {line[:80]!r}")
        name, value = name.lower(), value.strip()
        if name == "content-length" and headers.get(name, value) != value:
            raise PolicyError("conflicting Content-Length headers")
        headers[name] = value
    return int(code), headers


async def _read_policy(reader: asyncio.StreamReader) -> str:
    """The body of a 200 text/plain response, cut at MAX_POLICY_BYTES. The request was HTTP/1.0,
    so the body is delimited by Content-Length or by the end of the connection, never chunked."""
    status, headers = await _read_head(reader)
    if status != 200:  # 3xx included: section 3.3, "redirects MUST NOT be followed"
        raise PolicyError(f"HTTP {status}")
    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith("text/plain"):
        raise PolicyError(f"content type {ctype!r} is not text/plain")
    if headers.get("transfer-encoding", "identity").lower() != "identity":
        raise PolicyError("a transfer coding in answer to an HTTP/1.0 request")
    length = headers.get("content-length")
    if length is None:
        body = b""
        while len(body) < MAX_POLICY_BYTES and (chunk := await reader.read(MAX_POLICY_BYTES - len(body))):
            body += chunk
    else:
        if not (length.isascii() and length.isdigit()):
            raise PolicyError(f"Content-Length {length[:20]!r}")
        try:
            body = await reader.readexactly(min(int(length), MAX_POLICY_BYTES))
        except asyncio.IncompleteReadError as exc:
            # What is missing may be mx lines: a policy cut short is no policy.
            raise PolicyError(f"body cut short ({len(exc.partial)} of {length} bytes)") from None
    return body.decode("utf-8", "replace")


async def _close(writer: asyncio.StreamWriter, grace: float) -> None:
    """Close after a complete response: TLS close_notify, waited for at most `grace` seconds
    (a peer that never answers it would hold the socket for ssl_shutdown_timeout, 30 s)."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), grace)
    except (OSError, TimeoutError):
        pass  # the policy is read: how the peer ends the connection changes nothing
    finally:
        writer.transport.abort()  # no-op when closed; cuts it off otherwise


class NoPublicAddress(Exception):
    """The policy host resolves to no address the address check allows."""


# How long a policy that could not be fetched is not asked for again (the cached one, or none,
# applies meanwhile, as RFC 8461 5.1 has it for a failed refresh).
FAILED_FETCH_MEMORY = 300.0
_FAILED_MAX = 10_000
# Policies kept per worker (each may hold up to MAX_POLICY_BYTES of mx patterns): past it, the
# expired ones go, then those fetched longest ago (a policy in use is fetched again daily).
_CACHE_MAX = 10_000


class MtaSts:
    """Per-worker policy cache. `policy(domain)` never raises: trouble means "no policy"."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        url_template: str,
        context: ssl.SSLContext,
        timeout: float = 10.0,
        address_check: AddressCheck | None = None,
    ) -> None:
        self._resolver = resolver
        self._address_check = address_check
        self._url = url_template
        self._context = context
        self._timeout = timeout
        # domain -> (policy, when fetched), in the order fetched: the oldest first.
        self._cache: dict[str, tuple[StsPolicy, float]] = {}
        # (domain, policy id) -> when fetching it last failed. Without it, every message to a
        # domain whose policy host hangs waited the whole fetch timeout again, in a thread.
        self._failed: dict[tuple[str, str], float] = {}
        # One fetch per (domain, policy id) at a time: the messages arriving meanwhile share it.
        self._fetching: dict[tuple[str, str], asyncio.Future[StsPolicy | None]] = {}

    def _cached(self, domain: str, now: float) -> StsPolicy | None:
        hit = self._cache.get(domain)
        if hit is None:
            return None
        if now - hit[1] > hit[0].max_age:
            del self._cache[domain]  # expired: no use for it any more (RFC 8461 5.1)
            return None
        return hit[0]

    def _young(self, domain: str, now: float) -> bool:
        """Whether the cached policy of `domain` is too recent to be refreshed: younger than a day
        and than half its max_age (a policy for a day is refreshed before it lapses too)."""
        hit = self._cache.get(domain)
        return hit is not None and now - hit[1] < min(REFRESH_AFTER, hit[0].max_age / 2)

    async def policy(self, domain: str) -> StsPolicy | None:
        domain = domain.lower().rstrip(".")
        now = time.time()
        cached = self._cached(domain, now)
        try:
            records = await relais_dns.query(self._resolver, f"_mta-sts.{domain}", "TXT")
        except relais_dns.DnsTemporaryError:
            return cached
        txts = [b"".join(r.strings).decode("utf-8", "replace") for r in records or []]  # type: ignore[attr-defined]
        policy_id = parse_txt(txts)
        if policy_id is None:
            return cached
        if cached is not None and cached.id == policy_id and self._young(domain, now):
            return cached
        key = (domain, policy_id)
        failed_at = self._failed.get(key)
        if failed_at is not None and now - failed_at < FAILED_FETCH_MEMORY:
            return cached
        running = self._fetching.get(key)
        if running is not None:
            fetched = await asyncio.shield(running)
            return fetched if fetched is not None else cached
        future: asyncio.Future[StsPolicy | None] = asyncio.get_running_loop().create_future()
        self._fetching[key] = future
        try:
            fetched = await self._fetch_policy(domain, policy_id, now)
            future.set_result(fetched)
        except BaseException:
            future.set_result(None)  # cancelled: the waiters use what is cached
            raise
        finally:
            del self._fetching[key]
        return fetched if fetched is not None else cached

    async def _fetch_policy(self, domain: str, policy_id: str, now: float) -> StsPolicy | None:
        url = self._url.format(domain=domain)
        try:
            policy = parse_policy(await self._fetch(url), policy_id)
        except Exception as exc:
            log.warning("MTA-STS policy of %s from %s unusable: %r", domain, url, exc)
            if len(self._failed) > _FAILED_MAX:
                self._failed.clear()
            self._failed[(domain, policy_id)] = now
            return None
        self._failed.pop((domain, policy_id), None)
        self._store(domain, policy, now)
        return policy

    def _store(self, domain: str, policy: StsPolicy, now: float) -> None:
        """Cache `policy` as the newest; at _CACHE_MAX, the expired policies go (never used
        again: `_cached`), then those fetched longest ago (one in use is fetched again within a
        day, or half its max_age, of its last fetch: `_young`)."""
        self._cache.pop(domain, None)  # re-inserted at the end: the dict keeps fetch order
        if len(self._cache) >= _CACHE_MAX:
            for stale in [d for d, (p, at) in self._cache.items() if now - at > p.max_age]:
                del self._cache[stale]
            while len(self._cache) >= _CACHE_MAX:
                del self._cache[next(iter(self._cache))]
        self._cache[domain] = (policy, now)

    async def _fetch(self, url: str) -> str:
        """The policy text at `url`. One deadline, `timeout`, covers the policy host's lookup,
        the connections tried, TLS, the request and the whole response: a host that sends a
        byte now and then cannot hold the fetch (and every message waiting on it) for longer."""
        target = _target(url)
        async with asyncio.timeout(self._timeout) as deadline:
            if self._address_check is None:
                addresses = await relais_dns.addresses(self._resolver, target.host)
            else:
                addresses = await self._allowed_addresses(target.host, self._address_check)
            reader, writer = await _connect(addresses, target, self._context, deadline.when() or 0.0)
            try:
                writer.write(
                    f"GET {target.path} HTTP/1.0\r\nHost: {target.authority}\r\n"
                    "User-Agent: relais\r\nAccept: text/plain\r\nConnection: close\r\n\r\n".encode()
                )
                text = await _read_policy(reader)
            except BaseException:
                # Given up (deadline included): no TLS goodbye to a peer that may never answer it.
                writer.transport.abort()
                raise
        await _close(writer, min(CLOSE_GRACE, self._timeout))
        return text

    async def _allowed_addresses(self, host: str, check: AddressCheck) -> list[str]:
        """The policy host's addresses `check` allows (raises NoPublicAddress when none is)."""
        addresses = await relais_dns.addresses(self._resolver, host)
        allowed = [a for a in addresses if check(a) is None]
        if not allowed:
            refused = ", ".join(f"{a}: {check(a)}" for a in addresses) or "no address"
            raise NoPublicAddress(f"policy host {host} has no public address ({refused})")
        return allowed
