"""MX resolution per RFC 5321 section 5.1, RFC 7505 (null MX)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver

from services.core import dns as relais_dns
from services.core.envelope import MAX_MX_HOSTS
from services.core.outcome import DNS_TEMPFAIL, NO_SUCH_DOMAIN, NULL_MX, Reply


@dataclass(frozen=True, slots=True)
class MxRoute:
    """Where a domain's mail goes: MX hosts in the order to try them, or why it cannot go.

    `primary` holds the most preferred hosts in a stable (sorted) order, for naming the site
    without depending on the shuffle among equal preferences.
    """

    hosts: tuple[str, ...] = ()
    failure: Reply | None = None
    primary: tuple[str, ...] = ()

    @property
    def is_permanent_failure(self) -> bool:
        return self.failure is not None and self.failure.is_permanent


# Shuffling needs no fresh generator per domain (seeding one from os.urandom cost more than the
# shuffle); tests pass their own `rng`.
_RNG = random.Random()

NO_MAIL_HOST = Reply(550, "5.1.2", "Recipient domain has no MX and no address records", "DNS")
INVALID_DOMAIN = Reply(550, "5.1.2", "Recipient domain is not a valid domain name", "DNS")


def order_mx(records: list[tuple[int, str]], rng: random.Random | None = None) -> tuple[str, ...]:
    """Lowest preference first; hosts of equal preference shuffled to spread load (RFC 5321 5.1)."""
    rng = rng or _RNG
    shuffled = list(records)
    rng.shuffle(shuffled)
    shuffled.sort(key=lambda r: r[0])
    # Each host once, where it first comes. A dict, not a list scan: a zone may list thousands
    # of hosts, and every message to the domain is ordered anew (quadratic, 2800 took 50 ms).
    return tuple(dict.fromkeys(host for _, host in shuffled))


def mx_route(records: list[tuple[int, str]], *, ip_literals: bool = True) -> MxRoute:
    """The route for a non-empty MX RRset (pure, so the rules unit-test without DNS).

    A target that is an IP address is not a host name (RFC 5321 5.1 wants names), but mail
    systems commonly deliver to it anyway; `ip_literals=False` treats such records as absent.
    """
    if any(host in ("", ".") for _, host in records):
        # RFC 7505: a "0 ." record means the domain accepts no mail at all.
        return MxRoute(failure=NULL_MX)
    if not ip_literals:
        records = [(p, h) for p, h in records if relais_dns.ip_literal(h) is None]
        if not records:
            return MxRoute(failure=NO_MAIL_HOST)
    best = min(p for p, _ in records)
    primary = tuple(sorted({h for p, h in records if p == best}))
    # Cut after the shuffle, so when more than MAX_MX_HOSTS share the best preference, which
    # ones are kept varies.
    return MxRoute(hosts=order_mx(records)[:MAX_MX_HOSTS], primary=primary)


async def resolve_mx(
    resolver: dns.asyncresolver.Resolver, domain: str, *, ip_literals: bool = True
) -> MxRoute:
    """MX hosts of a (possibly non-ASCII) domain, or a permanent or temporary failure reply.

    MX targets that are CNAMEs are kept as names: delivery's address lookup follows the alias
    (RFC 2181 10.3 forbids the alias but tells receivers to cope).
    """
    try:
        name = relais_dns.to_ascii(domain)
    except ValueError:
        return MxRoute(failure=INVALID_DOMAIN)
    try:
        records = await relais_dns.query(resolver, name, "MX")
        if records is None:
            return MxRoute(failure=NO_SUCH_DOMAIN)
        mx = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in records]  # type: ignore[attr-defined]
        if mx:
            return mx_route(mx, ip_literals=ip_literals)
        # No MX: the domain itself is the implicit MX, if it has an address (RFC 5321 5.1).
        if await relais_dns.addresses(resolver, name):
            return MxRoute(hosts=(name,), primary=(name,))
        return MxRoute(failure=NO_MAIL_HOST)
    except relais_dns.DnsTemporaryError as exc:
        return MxRoute(failure=dns_tempfail(exc))


def dns_tempfail(exc: relais_dns.DnsTemporaryError) -> Reply:
    """The reply to a failed lookup: it names the query and the kind of failure, never the resolver
    (senders read it in DSNs and webhooks)."""
    return Reply(DNS_TEMPFAIL.code, DNS_TEMPFAIL.enhanced_status, f"{DNS_TEMPFAIL.text}. {exc}", "DNS")
