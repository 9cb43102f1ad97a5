"""MX resolution per RFC 5321 section 5.1, RFC 7505 (null MX)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver

from services.core import dns as relais_dns
from services.core.outcome import DNS_TEMPFAIL, NO_SUCH_DOMAIN, NULL_MX, Reply


@dataclass(frozen=True, slots=True)
class MxRoute:
    """Where a domain's mail goes: MX hosts in the order to try them, or why it cannot go."""

    hosts: tuple[str, ...] = ()
    failure: Reply | None = None

    @property
    def is_permanent_failure(self) -> bool:
        return self.failure is not None and self.failure.is_permanent


NO_MAIL_HOST = Reply(550, "5.1.2", "Recipient domain has no MX and no address records", "DNS")


def order_mx(records: list[tuple[int, str]], rng: random.Random | None = None) -> tuple[str, ...]:
    """Lowest preference first; hosts of equal preference shuffled to spread load (RFC 5321 5.1)."""
    rng = rng or random.Random()
    shuffled = list(records)
    rng.shuffle(shuffled)
    shuffled.sort(key=lambda r: r[0])
    seen: list[str] = []
    for _, host in shuffled:
        if host not in seen:
            seen.append(host)
    return tuple(seen)


async def resolve_mx(resolver: dns.asyncresolver.Resolver, domain: str) -> MxRoute:
    try:
        name = relais_dns.to_ascii(domain)
    except Exception:
        return MxRoute(failure=NO_SUCH_DOMAIN)
    try:
        records = await relais_dns.query(resolver, name, "MX")
        if records is None:
            return MxRoute(failure=NO_SUCH_DOMAIN)
        mx = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in records]  # type: ignore[attr-defined]
        if any(host in ("", ".") for _, host in mx):
            # RFC 7505: a single "0 ." record means the domain accepts no mail at all.
            return MxRoute(failure=NULL_MX)
        if mx:
            return MxRoute(hosts=order_mx(mx))
        # No MX: the domain itself is the implicit MX, if it has an address (RFC 5321 5.1).
        if await relais_dns.addresses(resolver, name):
            return MxRoute(hosts=(name,))
        return MxRoute(failure=NO_MAIL_HOST)
    except relais_dns.DnsTemporaryError as exc:
        return MxRoute(
            failure=Reply(
                DNS_TEMPFAIL.code, DNS_TEMPFAIL.enhanced_status, f"{DNS_TEMPFAIL.text}: {exc}", "DNS"
            )
        )
