"""MTA-STS (RFC 8461): discover, fetch, cache and parse a recipient domain's TLS policy.

Discovery is the `_mta-sts.<domain>` TXT record ("v=STSv1; id=..."); the policy itself comes
over HTTPS with a verified certificate from a URL template (`delivery.mta_sts_url`, normally
https://mta-sts.{domain}/.well-known/mta-sts.txt) so tests can serve it on loopback. A policy
is cached until its max_age and re-fetched when the TXT id changes; a failed refresh keeps the
cached policy (section 5.1), and no policy at all means opportunistic TLS.

With an address check (delivery.public_mx_only) the policy host is resolved here, and a host
without a public address counts as a failed fetch; the fetch then connects to an address that
was checked, never to what a second lookup (by urllib) might answer.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver

from services.core import dns as relais_dns
from services.delivery.public_addresses import AddressCheck

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 64 * 1024
MAX_AGE_CAP = 31557600  # RFC 8461: at most one year


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Section 3.3: "HTTP 3xx redirects MUST NOT be followed".
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _fetch(url: str, context: ssl.SSLContext, timeout: float) -> str:
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)
    with opener.open(url, timeout=timeout) as response:
        return _policy_text(response)


def _policy_text(response: http.client.HTTPResponse) -> str:
    if response.status != 200:
        raise PolicyError(f"HTTP {response.status}")
    ctype = response.headers.get("Content-Type", "")
    if not ctype.lower().startswith("text/plain"):
        raise PolicyError(f"content type {ctype!r} is not text/plain")
    return response.read(MAX_POLICY_BYTES + 1)[:MAX_POLICY_BYTES].decode("utf-8", "replace")


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the URL's host name (SNI, certificate check, Host header) over a TCP connection
    to one of `addresses`, which were checked: the name is not looked up again."""

    def __init__(
        self, host: str, port: int, *, addresses: Sequence[str], context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._addresses = addresses
        self._tls = context

    def connect(self) -> None:
        error: OSError = OSError(f"no address for {self.host}")
        for address in self._addresses:  # in turn, as socket.create_connection does
            try:
                sock = socket.create_connection((address, self.port), self.timeout)
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _fetch_at(url: str, addresses: Sequence[str], context: ssl.SSLContext, timeout: float) -> str:
    """`_fetch`, connecting only to `addresses`. No redirects: http.client follows none."""
    parts = urllib.parse.urlsplit(url)
    conn = _PinnedHTTPSConnection(
        parts.hostname or "", parts.port or 443, addresses=addresses, context=context, timeout=timeout
    )
    try:
        conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
        return _policy_text(conn.getresponse())
    finally:
        conn.close()


class NoPublicAddress(Exception):
    """The policy host resolves to no address the address check allows."""


# How long a policy that could not be fetched is not asked for again (the cached one, or none,
# applies meanwhile, as RFC 8461 5.1 has it for a failed refresh).
FAILED_FETCH_MEMORY = 300.0
_FAILED_MAX = 10_000


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
        self._cache: dict[str, tuple[StsPolicy, float]] = {}
        # (domain, policy id) -> when fetching it last failed. Without it, every message to a
        # domain whose policy host hangs waited the whole fetch timeout again, in a thread.
        self._failed: dict[tuple[str, str], float] = {}
        # One fetch per (domain, policy id) at a time: the messages arriving meanwhile share it.
        self._fetching: dict[tuple[str, str], asyncio.Future[StsPolicy | None]] = {}

    def _cached(self, domain: str, now: float) -> StsPolicy | None:
        hit = self._cache.get(domain)
        if hit is None or now - hit[1] > hit[0].max_age:
            return None
        return hit[0]

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
        if cached is not None and cached.id == policy_id:
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
            if self._address_check is None:
                text = await asyncio.to_thread(_fetch, url, self._context, self._timeout)
            else:
                addresses = await self._allowed_addresses(url, self._address_check)
                text = await asyncio.to_thread(_fetch_at, url, addresses, self._context, self._timeout)
            policy = parse_policy(text, policy_id)
        except Exception as exc:
            log.warning("MTA-STS policy of %s from %s unusable: %r", domain, url, exc)
            if len(self._failed) > _FAILED_MAX:
                self._failed.clear()
            self._failed[(domain, policy_id)] = now
            return None
        self._failed.pop((domain, policy_id), None)
        self._cache[domain] = (policy, now)
        return policy

    async def _allowed_addresses(self, url: str, check: AddressCheck) -> list[str]:
        """The policy host's addresses `check` allows (raises NoPublicAddress when none is)."""
        host = urllib.parse.urlsplit(url).hostname or ""
        addresses = await relais_dns.addresses(self._resolver, host)
        allowed = [a for a in addresses if check(a) is None]
        if not allowed:
            refused = ", ".join(f"{a}: {check(a)}" for a in addresses) or "no address"
            raise NoPublicAddress(f"policy host {host} has no public address ({refused})")
        return allowed
