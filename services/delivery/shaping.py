"""Traffic shaping rules as data: per-site limits, per-source overrides, push-back and rewrites.

Pure: parse the TOML once at start, then answer "which limits apply to this (source, site)",
"does this reply mean the provider is pushing back" and "what does this reply really mean".
The format is documented in `shaping_default.toml`, which ships as package data; an operator's
`delivery.shaping_file` is merged over it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from services.core.addresses import domain_key, ip_key
from services.core.config import ConfigError, parse_duration
from services.core.outcome import Bounced, Deferred, Delivered, Outcome, Reply

_LIMIT_KEYS = (
    "connections",
    "messages_per_connection",
    "messages_per_minute",
    "messages_per_hour",
    "new_connections_per_minute",
    "require_tls",
)
_SITE_KEYS = (*_LIMIT_KEYS, "mx_suffixes", "domains", "source")
_PUSHBACK_KEYS = ("name", "site", "match", "duration", "messages_per_minute")
_REWRITE_KEYS = ("name", "match", "outcome")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one (source IP, site) may do, across every delivery worker together. 0 = unlimited."""

    connections: int = 10
    messages_per_connection: int = 100
    messages_per_minute: float = 0.0
    messages_per_hour: float = 0.0
    new_connections_per_minute: float = 0.0
    require_tls: bool = False

    def message_interval(self) -> float:
        """Seconds between two messages so both the minute and the hour rate hold (0 = no limit)."""
        intervals = [60.0 / self.messages_per_minute] if self.messages_per_minute > 0 else []
        if self.messages_per_hour > 0:
            intervals.append(3600.0 / self.messages_per_hour)
        return max(intervals, default=0.0)

    def connection_interval(self) -> float:
        return 60.0 / self.new_connections_per_minute if self.new_connections_per_minute > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SiteRule:
    name: str
    overrides: dict[str, Any]
    source_overrides: dict[str, dict[str, Any]]
    mx_suffixes: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pushback:
    """A reply that means "slow down": back off (source, site) for `duration` at a reduced rate."""

    name: str
    pattern: re.Pattern[str]
    duration: float
    messages_per_minute: float
    site: str = ""


@dataclass(frozen=True, slots=True)
class Rewrite:
    name: str
    pattern: re.Pattern[str]
    outcome: str  # "temporary" | "permanent"


@dataclass(frozen=True, slots=True)
class Shaping:
    default: dict[str, Any] = field(default_factory=dict)
    sites: tuple[SiteRule, ...] = ()
    pushbacks: tuple[Pushback, ...] = ()
    rewrites: tuple[Rewrite, ...] = ()

    def site_for(self, site: str, domain: str = "", mx_host: str = "") -> str:
        """The shaping site of a job: the rule that claims it, else the router's site name.

        All of a provider's MX hosts then share one budget, whatever the router named them.
        The most specific claim wins, not the first rule: a domain named outright, then the
        router's site name, then the longest MX suffix. An operator's rule for one customer
        domain hosted by a provider is merged after the provider's built-in rule and inside
        its MX suffix, and must not be shadowed by it.
        """
        site, domain, mx_host = site.lower(), domain_key(domain), mx_host.lower().rstrip(".")
        for rule in self.sites:
            if domain and domain in rule.domains:
                return rule.name
        for rule in self.sites:
            if rule.name == site:
                return rule.name
        best, longest = "", -1
        for rule in self.sites:
            for suffix in rule.mx_suffixes:
                if len(suffix) > longest and _under(mx_host, suffix):
                    best, longest = rule.name, len(suffix)
        return best or site or domain or mx_host

    def claiming_sites(self) -> frozenset[str]:
        """The names `site_for` may give a job besides the router's site name: those of the rules
        that claim recipient domains or MX hosts. Delivery holds a job while either is paused,
        and such a name may be any, an MX host's even, which the router never gives a site."""
        return frozenset(rule.name for rule in self.sites if rule.domains or rule.mx_suffixes)

    def limits(self, site: str, source: str = "") -> Limits:
        """Default, then the site's rule, then the site's override for this source IP."""
        values = dict(self.default)
        for rule in self.sites:
            if rule.name == site:
                values.update(rule.overrides)
                values.update(rule.source_overrides.get(ip_key(source), {}))
        return Limits(**values)

    def pushback_for(self, reply: Reply, site: str) -> Pushback | None:
        # Addresses the reply echoes are the senders' to choose: a recipient named
        # throttle@... or rate-limited@... must not slow its (source, site) for every account.
        text = _ADDRESS.sub("<address>", str(reply))
        for rule in self.pushbacks:
            if rule.site and rule.site != site:
                continue
            if rule.pattern.search(text):
                return rule
        return None

    def rewrite(self, outcome: Outcome) -> Outcome:
        """Apply the first matching rewrite rule: e.g. a "mailbox full" 5xx becomes a deferral."""
        if isinstance(outcome, Delivered):
            return outcome
        text = str(outcome.reply)
        for rule in self.rewrites:
            if rule.pattern.search(text):
                kind = Deferred if rule.outcome == "temporary" else Bounced
                return kind(outcome.recipient, outcome.reply, outcome.mx_host)
        return outcome


_ADDRESS = re.compile(r"[^\s<>]+@[^\s<>]+")


def _under(host: str, suffix: str) -> bool:
    """Whether `host` is `suffix` or a name below it: whole labels only, so "example.test"
    does not claim "notexample.test"."""
    return bool(host) and (host == suffix or host.endswith("." + suffix))


def _site_name(name: str) -> str:
    """A site as the router names it: lower case, no trailing dot ("Example.Test." is example.test)."""
    return name.lower().rstrip(".")


def _source_key(key: str, where: str) -> str:
    """A `[site.<name>.source."<ip>"]` key in its one spelling; a key that is no IP address would
    silently never apply."""
    try:
        return str(ipaddress.ip_address(key))
    except ValueError:
        raise ConfigError(f"shaping: {where}.source.{key}: expected a source IP address") from None


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"shaping: unknown key(s) in {where}: {', '.join(unknown)}")


def _limit_values(table: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _LIMIT_KEYS:
        if key not in table:
            continue
        value = table[key]
        if key == "require_tls":
            if not isinstance(value, bool):
                raise ConfigError(f"shaping: {where}.{key}: expected true or false")
            out[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"shaping: {where}.{key}: expected a number >= 0")
        types = {f.name: f.type for f in dataclasses.fields(Limits)}
        out[key] = int(value) if types[key] in ("int", int) else float(value)
    return out


def _names(table: dict[str, Any], key: str, where: str) -> list[str]:
    """A site's `mx_suffixes` or `domains`: a list of non-empty strings. A bare string would be
    read letter by letter, and an empty suffix ends every host name: either would make the
    rule claim nearly every site, with its limits and require_tls."""
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip(".") for v in value):
        raise ConfigError(f'shaping: {where}.{key}: expected a list of names, like ["example.com"]')
    return value


def _pattern(value: Any, where: str) -> re.Pattern[str]:
    try:
        return re.compile(str(value), re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"shaping: {where}.match: {exc}") from exc


def _parse(data: dict[str, Any]) -> Shaping:
    _check_keys(data, ("default", "site", "pushback", "rewrite"), "the top level")
    default = _limit_values(data.get("default", {}), "default")
    _check_keys(data.get("default", {}), _LIMIT_KEYS, "[default]")
    sites = []
    for name, table in data.get("site", {}).items():
        where = f"site.{name}"
        _check_keys(table, _SITE_KEYS, f"[{where}]")
        sources: dict[str, dict[str, Any]] = {}
        for ip, t in table.get("source", {}).items():
            _check_keys(t, _LIMIT_KEYS, f"[{where}.source.{ip}]")
            sources.setdefault(_source_key(ip, where), {}).update(_limit_values(t, f"{where}.source.{ip}"))
        sites.append(
            SiteRule(
                name=_site_name(name),
                overrides=_limit_values(table, where),
                source_overrides=sources,
                # Written ".google.com", "google.com" or "google.com.": matched by whole labels.
                mx_suffixes=tuple(s.lower().strip(".") for s in _names(table, "mx_suffixes", where)),
                domains=tuple(domain_key(d) for d in _names(table, "domains", where)),
            )
        )
    pushbacks = []
    for i, table in enumerate(data.get("pushback", [])):
        where = f"pushback[{i}]"
        _check_keys(table, _PUSHBACK_KEYS, where)
        if "match" not in table:
            raise ConfigError(f"shaping: {where}: needs a match pattern")
        if float(table.get("messages_per_minute", 10)) <= 0:
            raise ConfigError(f"shaping: {where}: messages_per_minute must be > 0 (slower, not stopped)")
        pushbacks.append(
            Pushback(
                name=str(table.get("name", where)),
                pattern=_pattern(table["match"], where),
                duration=parse_duration(table.get("duration", "10m")),
                messages_per_minute=float(table.get("messages_per_minute", 10)),
                site=_site_name(str(table.get("site", ""))),
            )
        )
    rewrites = []
    for i, table in enumerate(data.get("rewrite", [])):
        where = f"rewrite[{i}]"
        _check_keys(table, _REWRITE_KEYS, where)
        if table.get("outcome") not in ("temporary", "permanent") or "match" not in table:
            raise ConfigError(f"shaping: {where}: needs match and outcome = 'temporary' or 'permanent'")
        rewrites.append(
            Rewrite(str(table.get("name", where)), _pattern(table["match"], where), table["outcome"])
        )
    return Shaping(default, tuple(sites), tuple(pushbacks), tuple(rewrites))


def merge(base: Shaping, extra: Shaping) -> Shaping:
    """The operator's rules over the built-in ones: site fields replaced, their rules tried first."""
    sites = {rule.name: rule for rule in base.sites}
    for rule in extra.sites:
        old = sites.get(rule.name)
        if old is None:
            sites[rule.name] = rule
            continue
        sources = {ip: dict(v) for ip, v in old.source_overrides.items()}
        for ip, values in rule.source_overrides.items():
            sources.setdefault(ip, {}).update(values)
        sites[rule.name] = SiteRule(
            rule.name,
            {**old.overrides, **rule.overrides},
            sources,
            rule.mx_suffixes or old.mx_suffixes,
            rule.domains or old.domains,
        )
    return Shaping(
        {**base.default, **extra.default},
        tuple(sites.values()),
        extra.pushbacks + base.pushbacks,
        extra.rewrites + base.rewrites,
    )


def parse_shaping(text: str) -> Shaping:
    try:
        return _parse(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"shaping: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"shaping: {exc}") from exc


def default_shaping() -> Shaping:
    return parse_shaping(resources.files(__package__).joinpath("shaping_default.toml").read_text())


def load_shaping(path: str | Path = "") -> Shaping:
    """Built-in rules, with the operator's file (if any) merged over them. Raises ConfigError."""
    base = default_shaping()
    if not path:
        return base
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read shaping file {path}: {exc}") from exc
    return merge(base, parse_shaping(text))
