"""One delivery attempt of a job: MX hosts in order, each of their addresses in turn (at most
MX_ADDRESS_LIMIT in all), over pooled connections, until one host gives a verdict for every
recipient. With an address check (delivery.public_mx_only) the addresses it refuses are
skipped, never connected to and not counted.

Protocol and connection choice only: no JetStream. The caller has already taken the shaping
slot; this module takes the connection (lease, reuse) and reports what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import dns.asyncresolver

from services.core import dns as relais_dns
from services.core.envelope import MAX_MX_HOSTS
from services.core.outcome import NO_ROUTE, Bounced, Deferred, Outcome, Reply
from services.delivery.connections import ConnectionPool
from services.delivery.draining import Stopping
from services.delivery.public_addresses import AddressCheck
from services.delivery.shaping import Limits
from services.delivery.smtp_session import Connection, Source, StaleConnection, TransactionResult, TryNextHost
from services.delivery.tls_policy import MX_NOT_IN_POLICY, TlsPolicy

log = logging.getLogger(__name__)


@dataclass
class AttemptResult:
    outcomes: list[Outcome]
    mx_host: str = ""
    address: str = ""
    tls_version: str = ""
    tls_cipher: str = ""
    source_ip: str = ""
    # Non-2xx replies the remote servers sent (push-back rules look at these, never at ours).
    remote_replies: list[Reply] = field(default_factory=list)
    bind_failed: bool = False
    notes: list[str] = field(default_factory=list)
    # Deferred after its final dot got no reply that could be read: the MX may have taken it
    # (TransactionResult.maybe_taken).
    maybe_taken: bool = False


# Reused connections found closed at MAIL that one message replaces by another idle one; each
# one is dropped, so idle connections a restarted server left behind are cleared a few at a
# time. The try after them goes over a new connection: only a failure there is the message's
# own (deferred), never one of a connection the server had given up before it was used.
_STALE_RETRIES = 3


async def _transact(
    pool: ConnectionPool,
    source: Source,
    site: str,
    host: str,
    address: str,
    limits: Limits,
    policy: TlsPolicy,
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    stopping: Callable[[], bool] | None,
    smtputf8: bool,
) -> tuple[Connection, TransactionResult]:
    """A connection to `address` and the transaction over it; raises TryNextHost (connect or
    MAIL). A reused connection that turns out closed is dropped and another one taken."""
    for attempt in range(_STALE_RETRIES + 1):
        last = attempt == _STALE_RETRIES
        conn = await pool.checkout(source, site, host, address, limits, policy, fresh=last)
        try:
            return conn, await conn.transact(
                sender, recipients, body, stale_is_retryable=not last, stopping=stopping, smtputf8=smtputf8
            )
        except StaleConnection as exc:
            log.debug("reused connection to %s[%s] was closed (%s); taking another", host, address, exc)
            await pool.checkin(conn, limits, reusable=False)
        except BaseException:
            await pool.checkin(conn, limits, reusable=False)
            raise
    raise AssertionError("unreachable: the last attempt does not raise StaleConnection")


# Postfix's smtp_mx_address_limit: the addresses one attempt tries, over all MX hosts. Without
# it a domain whose MXs list many black-holed addresses holds a delivery slot for each one's
# connect timeout.
MX_ADDRESS_LIMIT = 5


def host_not_found(not_found: Sequence[str], no_address: Sequence[str] = ()) -> Reply:
    """Every MX host of the domain is NXDOMAIN or has no A/AAAA record: no retry finds an
    address until the domain's DNS changes. Postfix (smtp_defer_if_no_mx_address_found=no, its
    default) and Exim bounce such mail at once; retrying it for days only delays the bounce."""
    return Reply(550, "5.4.4", f"Host not found: {_unresolved(not_found, no_address)}", "DNS")


def no_public_address(
    hosts: Sequence[str], not_found: Sequence[str], no_address: Sequence[str] = ()
) -> Reply:
    """No MX host of the route has an address delivery may connect to (delivery.public_mx_only):
    like a host that does not exist, no retry changes that until the domain's DNS does."""
    text = f"No public address: MX host {', '.join(hosts)} has only non-public addresses"
    return Reply(550, "5.4.4", text + _unresolved_notes(not_found, no_address), "DNS")


def _unresolved(not_found: Sequence[str], no_address: Sequence[str]) -> str:
    parts = []
    if not_found:
        parts.append(f"MX host {', '.join(not_found)} does not exist")
    if no_address:
        parts.append(f"MX host {', '.join(no_address)} has no address record")
    return "; ".join(parts)


def _unresolved_notes(not_found: Sequence[str], no_address: Sequence[str]) -> str:
    """What a reply about other hosts adds for the ones DNS gave no address."""
    text = f"; host not found: {', '.join(not_found)}" if not_found else ""
    return text + (f"; no address record: {', '.join(no_address)}" if no_address else "")


async def send_job(
    pool: ConnectionPool,
    resolver: dns.asyncresolver.Resolver,
    mx_hosts: Sequence[str],
    *,
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    source: Source,
    site: str,
    limits: Limits,
    policy: TlsPolicy,
    address_limit: int = MX_ADDRESS_LIMIT,
    address_check: AddressCheck | None = None,
    stopping: Callable[[], bool] | None = None,
    smtputf8: bool = False,
) -> AttemptResult:
    """Deliver to the first MX that answers; every recipient gets its own outcome.

    `address_check` (None: every address goes) names why an address may not be connected to;
    such addresses are skipped, and a route with no other address left bounces. Once `stopping`
    says so, Stopping is raised instead of trying another address or sending a final dot.
    `smtputf8`: the sender submitted the message with SMTPUTF8."""
    last = NO_ROUTE
    remote: list[Reply] = []
    notes: list[str] = []
    not_found: list[str] = []
    no_address: list[str] = []
    not_public: list[str] = []
    bind_failed = False
    tried = 0
    for host in mx_hosts:
        if tried >= address_limit:
            notes.append(f"{host} and later MX hosts not tried: {address_limit} addresses tried already")
            break
        if not policy.allows_host(host):
            notes.append(f"{host}: not in the MTA-STS policy")
            last = MX_NOT_IN_POLICY
            continue
        try:
            addresses = await relais_dns.host_addresses(resolver, host)
        except relais_dns.DnsTemporaryError as exc:
            notes.append(f"{host}: {exc}")
            last = Reply(451, "4.4.3", f"Cannot resolve MX host {host}", "CONNECT")
            continue
        if addresses is None:
            notes.append(f"{host}: host not found")
            not_found.append(host)
            continue
        if not addresses:
            notes.append(f"{host}: no address record")
            no_address.append(host)
            continue
        if address_check is not None:
            addresses = _allowed(host, addresses, address_check, notes)
            if not addresses:
                not_public.append(host)
                continue
        for address in _within_limit(host, addresses, address_limit - tried, notes):
            if stopping is not None and stopping():
                raise Stopping(f"worker stopping before {host}[{address}]")
            tried += 1
            try:
                conn, done = await _transact(
                    pool,
                    source,
                    site,
                    host,
                    address,
                    limits,
                    policy,
                    sender,
                    recipients,
                    body,
                    stopping,
                    smtputf8,
                )
            except TryNextHost as exc:
                notes.append(f"{host}[{address}]: {exc.reply}")
                last = exc.reply
                if exc.remote:
                    remote.append(exc.reply)
                if exc.bind_failed:
                    bind_failed = True
                    break
                continue
            await pool.checkin(conn, limits, reusable=not done.broken)
            return AttemptResult(
                done.outcomes,
                mx_host=host,
                address=address,
                tls_version=conn.tls_version,
                tls_cipher=conn.tls_cipher,
                source_ip=source.address,
                remote_replies=remote + done.remote_replies,
                notes=notes,
                maybe_taken=done.maybe_taken,
            )
        if bind_failed:
            break
    outcomes: list[Outcome]
    unusable = bool(mx_hosts) and len(not_found) + len(no_address) + len(not_public) == len(mx_hosts)
    # A job holds at most MAX_MX_HOSTS of its domain's MX hosts: when it holds that many, a host
    # left out may have an address, and only a domain whose every MX host was looked up bounces.
    if unusable and len(mx_hosts) < MAX_MX_HOSTS:
        reply = (
            no_public_address(not_public, not_found, no_address)
            if not_public
            else host_not_found(not_found, no_address)
        )
        outcomes = [Bounced(r, reply) for r in recipients]
    else:
        # Deferred for the hosts that may answer later; the ones that cannot are named.
        if not_found or no_address:
            last = replace(last, text=last.text + _unresolved_notes(not_found, no_address))
        if not_public:
            last = replace(last, text=f"{last.text}; no public address: {', '.join(not_public)}")
        if unusable:
            cut = f"any MX hosts after the best {MAX_MX_HOSTS} not looked up"
            last = replace(last, text=f"{last.text}; {cut}")
        outcomes = [Deferred(r, last) for r in recipients]
    return AttemptResult(
        outcomes, source_ip=source.address, remote_replies=remote, bind_failed=bind_failed, notes=notes
    )


def _within_limit(host: str, addresses: list[str], room: int, notes: list[str]) -> list[str]:
    """The addresses of `host` this attempt may still try; the rest are noted as skipped."""
    room = max(room, 0)
    if len(addresses) > room:
        notes.append(f"{host}: {len(addresses) - room} of its addresses not tried (MX address limit)")
    return addresses[:room]


def _allowed(host: str, addresses: list[str], check: AddressCheck, notes: list[str]) -> list[str]:
    """The addresses of `host` that `check` lets this attempt connect to; each refused one is
    noted (and logged: a domain aimed at the operator's network is worth an operator's look)."""
    allowed: list[str] = []
    skipped: list[str] = []
    for address in addresses:
        why = check(address)
        if why is None:
            allowed.append(address)
        else:
            skipped.append(address)
            notes.append(f"{host}[{address}]: skipped, {why}")
    if skipped:
        log.info("MX host %s: skipped its non-public addresses %s", host, ", ".join(skipped))
    return allowed
