"""Sites (MX rollup): one name for every destination domain hosted by the same provider.

Delivery shapes traffic per site, so ten thousand domains hosted by one mailbox provider share
one connection budget, as the provider sees them. Rules are data (`[sites.<name>] mx = [...]`):
a pattern "*.google.com" matches any MX host under google.com, any other pattern matches one
host exactly. A destination no rule names gets the registrable part of its primary MX host
("mx1.mail.example.co.uk" -> "example.co.uk", `services.core.sites.registrable`, which the admin
CLI shares to refuse pausing an MX host as a site), so domains sharing a provider's MX hosts
roll up even without a rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.core.config import SiteConfig
from services.core.sites import registrable


@dataclass(frozen=True, slots=True)
class SiteRules:
    """Compiled site patterns: exact hosts, and suffixes checked longest first."""

    exact: Mapping[str, str]
    suffixes: Sequence[tuple[str, str]]

    @classmethod
    def from_config(cls, sites: Mapping[str, SiteConfig]) -> SiteRules:
        exact: dict[str, str] = {}
        suffixes: list[tuple[str, str]] = []
        for name, site in sorted(sites.items()):
            for pattern in site.mx:
                pattern = pattern.strip().lower().rstrip(".")
                if pattern.startswith("*."):
                    suffixes.append((pattern[1:], name))  # ".google.com"
                else:
                    exact[pattern] = name
        suffixes.sort(key=lambda s: -len(s[0]))
        return cls(exact, tuple(suffixes))

    def match(self, host: str) -> str | None:
        host = host.lower().rstrip(".")
        site = self.exact.get(host)
        if site is not None:
            return site
        for suffix, name in self.suffixes:
            if host.endswith(suffix):
                return name
        return None


def site_for(domain: str, hosts: Sequence[str], primary: Sequence[str], rules: SiteRules) -> str:
    """The site of a destination: the first rule matching one of its MX hosts (in preference
    order), else the registrable domain of its first primary MX host, else the domain itself."""
    for host in hosts:
        site = rules.match(host)
        if site is not None:
            return site
    first = primary[0] if primary else (hosts[0] if hosts else "")
    return registrable(first) if first else domain.lower()
