"""How a destination's site is named when no rule names it: the registrable part of its primary
MX host ("mx1.mail.example.co.uk" -> "example.co.uk").

The router names sites so (`services.router.sites`), and delivery holds the mail of a paused site
by that name; the admin CLI must know the same rule to tell a site's name from an MX host's,
which pauses nothing. So it lives here, in core, owned once.
"""

from __future__ import annotations

from services.core.dns import ip_literal

# Second-level labels under which registrations happen one level deeper (co.uk, com.au, ...).
# A small stand-in for the Public Suffix List: good enough to name a provider, never used for
# anything security relevant.
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "gov", "edu", "ac", "ne", "or", "go", "gob"})


def registrable(host: str) -> str:
    """The provider-ish part of a host name: its last two labels, three under co.uk-like suffixes."""
    if ip_literal(host) is not None:
        return ip_literal(host) or host
    labels = host.lower().rstrip(".").split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL else 2
    return ".".join(labels[-keep:])


def site_of_host(name: str) -> str | None:
    """The site a dotted name that can be no site's name is in, as an MX host: its registrable
    part ("mx.example.test" -> "example.test"); None for a name the router may give a site.

    `name` is spelt as sites are (lower case, A-labels, no trailing dot). [sites] rule names hold
    no dots (config validation), an IP literal names its own site, and a registrable part is
    itself: any other dotted name is below the registrable part of an MX host, never a site's.
    """
    if "." not in name or ip_literal(name) is not None:
        return None
    site = registrable(name)
    return None if site == name else site
