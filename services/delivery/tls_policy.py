"""Which TLS a delivery needs: opportunistic, required, or required and verified (MTA-STS).

Pure decisions; the SMTP session carries them out and turns a violation into a deferral
(a TLS problem may be fixed by the receiver tomorrow, so it is never a bounce).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.outcome import Reply
from services.delivery.mta_sts import StsPolicy


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    # Never send in plaintext: no STARTTLS offered, or a failed handshake, defers the message.
    require: bool = False
    # The certificate must chain to a trusted CA and name the MX host.
    verify: bool = False
    # MTA-STS `mx` patterns the MX host must match (empty: any host).
    mx_patterns: tuple[str, ...] = ()
    # What asked for it, for logs and events: "opportunistic", "site", "mta-sts", "config".
    origin: str = "opportunistic"

    def allows_host(self, host: str) -> bool:
        return not self.mx_patterns or any(mx_matches(host, p) for p in self.mx_patterns)


def mx_matches(host: str, pattern: str) -> bool:
    """RFC 8461 section 4.1: exact name, or "*.example.com" matching exactly one more label."""
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return host == pattern


def tls_policy(*, site_requires: bool, verify_always: bool, sts: StsPolicy | None) -> TlsPolicy:
    """Combine the site's shaping rule, the global verify setting and a published MTA-STS policy."""
    if sts is not None and sts.mode == "enforce":
        return TlsPolicy(require=True, verify=True, mx_patterns=sts.mx, origin="mta-sts")
    if site_requires:
        return TlsPolicy(require=True, verify=verify_always, origin="site")
    if verify_always:
        return TlsPolicy(require=False, verify=True, origin="config")
    return TlsPolicy()


# Replies Relais produces when a TLS policy stops a delivery (deferred, never bounced).
TLS_NOT_OFFERED = Reply(
    451, "4.7.10", "TLS required by policy but the server does not offer STARTTLS", "EHLO"
)
TLS_FAILED = Reply(
    451, "4.7.5", "TLS required by policy but the handshake or certificate check failed", "STARTTLS"
)
MX_NOT_IN_POLICY = Reply(451, "4.7.5", "MX host is not listed in the domain's MTA-STS policy", "CONNECT")
