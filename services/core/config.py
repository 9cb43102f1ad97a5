"""The one configuration schema: typed, keyword-only settings with safe defaults.

Loaded from TOML, then overridden by `RELAIS_<SECTION>__<KEY>` environment variables (the way
Kubernetes manifests set things). Unknown keys, in the file or in the environment, are errors:
a typo must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "RELAIS_"
ENV_CONFIG_PATH = "RELAIS_CONFIG"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True, kw_only=True)
class NatsConfig:
    url: str = "nats://127.0.0.1:4222"
    # 1 on a laptop; 3 on a JetStream cluster so losing a node loses no mail.
    replicas: int = 1
    # How long the ingress waits for JetStream's ack before answering 451.
    publish_timeout: float = 5.0
    connect_timeout: float = 2.0
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    tls_ca_file: str = ""
    # Bodies up to this size travel inside the envelope; larger ones go to the Object Store
    # once and are referenced, so recipients and retries never copy them again.
    inline_body_max: int = 128 * 1024
    # How long consumers may hold a message before JetStream redelivers it elsewhere.
    ack_wait: float = 120.0
    events_max_age: float = 7 * 86400.0


LISTENER_MODES = ("submission", "implicit-tls", "inbound")


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    listen: str
    # "submission" (587/2525: STARTTLS, AUTH), "implicit-tls" (465: TLS from the first byte, AUTH),
    # "inbound" (25: no AUTH, mail for ingress.local_domains only).
    mode: str = "submission"
    # Expect a PROXY protocol v1/v2 header first (behind a Kubernetes LoadBalancer); off by default.
    proxy_protocol: bool = False


@dataclass(frozen=True, kw_only=True)
class IngressConfig:
    # The single submission listener used when `listeners` is empty (laptop, tests).
    listen: str = "127.0.0.1:2525"
    listeners: list[ListenerConfig] = field(default_factory=list)
    hostname: str = "relais.localhost"
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    # aiosmtpd's safe default; the exception is a loopback-only listener (see README).
    auth_require_tls: bool = True
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Certificate files are re-read when they change (Kubernetes secret rotation).
    tls_reload_interval: float = 30.0
    # "reject" bare CR/LF with 554 5.6.0 (smuggling defence); "normalise" rewrites them to CRLF.
    bare_line_endings: str = "reject"
    # Relais' own domains (bounce/return-path, feedback loops): the only mail the inbound listener takes.
    local_domains: list[str] = field(default_factory=list)
    # Client networks (CIDR) that may relay without AUTH, as `relay_networks_account`; off by default.
    relay_networks: list[str] = field(default_factory=list)
    relay_networks_account: str = ""
    # "reject" a From: header domain the account does not own at end of DATA, or only "report" it.
    from_header_check: str = "reject"
    max_header_size: int = 256 * 1024
    max_connections_per_ip: int = 50
    # Idle/command timeout: the longest silence (or one DATA transfer) before the session is closed.
    command_timeout: float = 300.0
    # Error replies in one session before it is closed with 421.
    max_errors: int = 10
    # AUTH failures per client IP or per username within auth_lockout before further attempts
    # are refused with 454 and the connection closed, until the window ends.
    auth_max_failures: int = 5
    auth_lockout: float = 900.0


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    # "ip" or "ip:port"; empty means the system resolver (/etc/resolv.conf).
    servers: list[str] = field(default_factory=list)
    timeout: float = 5.0
    # Answers are cached for their TTL, but never longer than these caps (NXDOMAIN / no data
    # for negative_ttl at most), in at most cache_size entries per process.
    cache_max_ttl: float = 3600.0
    negative_ttl: float = 300.0
    cache_size: int = 100_000


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    concurrency: int = 64
    # Deliver to MX targets that are IP addresses (a misconfiguration RFC 5321 does not allow,
    # but common); false treats such hosts as absent.
    mx_ip_literals: bool = True


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    # "mx": real delivery to the recipients' MX hosts; "capture": write to capture_dir (laptop mode).
    mode: str = "mx"
    smtp_port: int = 25
    capture_dir: str = "relais-data/mailbox"
    # Pools this worker serves; empty means every configured pool.
    pools: list[str] = field(default_factory=list)
    helo_name: str = ""
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    concurrency: int = 64
    # Opportunistic STARTTLS: try TLS when offered, fall back to plaintext if the handshake fails.
    starttls: bool = True
    tls_verify: bool = False
    # Extra CA bundle (PEM) trusted when a policy (MTA-STS enforce, tls_verify) checks certificates.
    tls_ca_file: str = ""
    # Shaping rules (TOML, see services/delivery/shaping_default.toml) merged over the built-in ones.
    shaping_file: str = ""
    # Idle connections kept open for reuse per (source IP, MX) are closed after this long.
    idle_timeout: float = 10.0
    # A shaping slot further away than this is not waited for in memory: the job is re-scheduled
    # (short, so that jobs for a slow site do not hold handler capacity other sites could use).
    max_shaping_wait: float = 5.0
    # How often paused mail (pool, source or site paused) comes back to check whether it may go.
    pause_recheck: float = 60.0
    # MTA-STS (RFC 8461): look up and enforce published policies; the fetch URL is a template
    # ({domain}) so tests can serve policies on loopback.
    mta_sts: bool = True
    mta_sts_url: str = "https://mta-sts.{domain}/.well-known/mta-sts.txt"


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    # First retry after about base_delay, doubling per attempt, capped at max_delay, with jitter.
    base_delay: float = 60.0
    max_delay: float = 3600.0
    jitter: float = 0.2
    max_age: float = 5 * 86400.0
    # Send one "delayed" DSN when a message is still undelivered after this long; 0 = never.
    delay_warning_after: float = 0.0


@dataclass(frozen=True, kw_only=True)
class BounceConfig:
    reporting_mta: str = ""
    dsn_from: str = "MAILER-DAEMON"
    # Include the whole original message in DSNs instead of its headers only.
    return_full: bool = False
    # VERP return path (services/core/returnpath.py): MAIL FROM <prefix>+<account>.<token>@domain,
    # so asynchronous bounces map back to account, message and recipient. The first secret signs,
    # all verify (key rotation). Mail to the domain must reach the ingress's inbound listener.
    verp: bool = False
    return_path_domain: str = ""
    verp_prefix: str = "b"
    verp_secrets: list[str] = field(default_factory=list)
    # How long a hard bounce or complaint keeps an address suppressed; 0 = until an operator removes it.
    suppression_expiry: float = 0.0
    # Classification rules tried before the built-in ones: [{category, code?, enhanced?, text?}].
    rules: list[dict[str, str]] = field(default_factory=list)
    # Webhooks (per account: accounts.<name>.webhook_url / webhook_secret): batch size, POST
    # timeout, and the retry backoff of a failing receiver (doubling from base up to max).
    webhook_batch: int = 100
    webhook_timeout: float = 10.0
    webhook_retry_base: float = 5.0
    webhook_retry_max: float = 600.0


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    address: str
    ehlo: str = ""
    weight: int = 1
    # Recipients per UTC day this source may send to, across every router replica; 0 = no cap.
    daily_cap: int = 0
    # Name of a [warmup.<name>] schedule, and the UTC date (YYYY-MM-DD) of its first day.
    warmup: str = ""
    warmup_start: str = ""


@dataclass(frozen=True, kw_only=True)
class WarmupConfig:
    # Cap for day 1, 2, ... of the schedule; after the last day the source counts as warm.
    daily: list[int] = field(default_factory=list)
    # Per-site schedules (site name -> caps per day) replacing `daily` for mail to that site.
    sites: dict[str, list[int]] = field(default_factory=dict)
    # When a warming source's cap is reached: "warm" sends from the pool's other sources that
    # have room, "defer" retries the job later (the cap resets at 00:00 UTC).
    overflow: str = "warm"


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    # MX host patterns: "*.google.com" matches any host under google.com, others match exactly.
    mx: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class DkimKeyConfig:
    selector: str
    # PEM private key (RSA, or Ed25519 PKCS#8), or dkimpy's base64 Ed25519 seed.
    key_file: str
    algorithm: str = "rsa-sha256"
    # Header fields to sign; empty means Relais' default set (From/Subject/Date over-signed).
    headers: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    # scrypt hash as produced by `relais account hash` (never a plaintext password).
    password_hash: str
    domains: list[str] = field(default_factory=list)
    pool: str = "default"
    disabled: bool = False
    # Further pools the sender may pick per message with the X-Relais-Pool header.
    pools: list[str] = field(default_factory=list)
    # 0 = unlimited. Enforced across ingress replicas (counters in JetStream).
    max_messages_per_hour: int = 0
    max_messages_per_day: int = 0
    max_sessions: int = 0
    # Event webhook: JSON batches POSTed here, signed with HMAC-SHA256 under webhook_secret.
    webhook_url: str = ""
    webhook_secret: str = ""


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    # "otlp" in production (configured by the standard OTEL_* variables), "none" to disable,
    # "console" for debugging, "jsonl" to keep spans in a local file for `relais trace`.
    traces: str = "none"
    traces_file: str = ""
    # HTTP endpoint of every service: /healthz, /readyz, /metrics (Prometheus). Empty disables it.
    http_listen: str = "0.0.0.0:9100"


@dataclass(frozen=True, kw_only=True)
class Config:
    data_dir: str = "relais-data"
    nats: NatsConfig = field(default_factory=NatsConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    pools: dict[str, PoolConfig] = field(default_factory=lambda: {"default": PoolConfig()})
    accounts: dict[str, AccountConfig] = field(default_factory=dict)
    # Sender domain -> pool; a domain listed here never sends from another pool's IPs.
    sender_domains: dict[str, str] = field(default_factory=dict)
    # Warm-up schedules referenced by sources.
    warmup: dict[str, WarmupConfig] = field(default_factory=dict)
    # MX rollup: destinations whose MX hosts match a site's patterns share that site name.
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    # Sender domain -> DKIM keys (several keys sign with several signatures, e.g. RSA + Ed25519).
    dkim: dict[str, list[DkimKeyConfig]] = field(default_factory=dict)

    def pool_for(self, sender_domain: str, account: str) -> str:
        pool = self.sender_domains.get(sender_domain.lower())
        if pool:
            return pool
        acct = self.accounts.get(account)
        return acct.pool if acct else "default"

    def served_pools(self) -> list[str]:
        return list(self.delivery.pools) or sorted(self.pools)


# ---------------------------------------------------------------------------------------------
# Loading


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use seconds or e.g. 30s, 10m, 2h, 5d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a table")
            return _build(tp, value, where)
        if origin is list:
            (item,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected a list")
            return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            _, item = typing.get_args(tp)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a table")
            return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false")
            return value
        if tp is int:
            if isinstance(value, bool):
                raise ConfigError(f"{where}: expected an integer")
            return int(value)
        if tp is float:
            return parse_duration(value)
        if tp is str:
            if not isinstance(value, str | int):
                raise ConfigError(f"{where}: expected a string")
            return str(value)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    if isinstance(tp, types.UnionType):
        raise ConfigError(f"{where}: unsupported union type")
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _build(cls: Any, data: Mapping[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """RELAIS_SECTION__KEY=value -> {"section": {"key": value}}; unknown names are errors."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    out: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_PATH:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if "__" not in key:
            if key == "data_dir":
                out.setdefault("", {})["data_dir"] = value
                continue
            raise ConfigError(f"unknown environment variable {name}")
        section, _, attr = key.partition("__")
        spec = sections.get(section)
        if spec is None or not dataclasses.is_dataclass(spec.default_factory):  # type: ignore[arg-type]
            raise ConfigError(f"unknown environment variable {name}")
        out.setdefault(section, {})[attr] = value
    return out


def env_variable_names() -> list[str]:
    """Every environment variable the loader understands (for docs and manifest checks)."""
    names = [ENV_CONFIG_PATH, ENV_PREFIX + "DATA_DIR"]
    for section in dataclasses.fields(Config):
        factory = section.default_factory
        if dataclasses.is_dataclass(factory):
            for f in dataclasses.fields(factory):
                names.append(f"{ENV_PREFIX}{section.name.upper()}__{f.name.upper()}")
    return names


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG_PATH) or None
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    for section, values in _env_overrides(env).items():
        if section == "":
            data.update(values)
        else:
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a table")
            table.update(values)
    config = _build(Config, data)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if config.nats.replicas not in (1, 3, 5):
        raise ConfigError("nats.replicas: use 1 (single node) or 3/5 (cluster)")
    if config.delivery.mode not in ("mx", "capture"):
        raise ConfigError("delivery.mode: expected 'mx' or 'capture'")
    if config.ingress.bare_line_endings not in ("reject", "normalise"):
        raise ConfigError("ingress.bare_line_endings: expected 'reject' or 'normalise'")
    _validate_ingress(config)
    if config.telemetry.traces not in ("none", "otlp", "console", "jsonl"):
        raise ConfigError("telemetry.traces: expected none, otlp, console or jsonl")
    if not 1 <= config.delivery.smtp_port <= 65535:
        raise ConfigError("delivery.smtp_port: out of range")
    for key in ("idle_timeout", "pause_recheck"):
        if getattr(config.delivery, key) <= 0:
            raise ConfigError(f"delivery.{key}: must be > 0")
    if config.delivery.max_shaping_wait < 0 or config.retry.delay_warning_after < 0:
        raise ConfigError("delivery.max_shaping_wait and retry.delay_warning_after: must be >= 0")
    if "{domain}" not in config.delivery.mta_sts_url:
        raise ConfigError("delivery.mta_sts_url: must contain {domain}")
    for name, pool in config.pools.items():
        if not _NAME.match(name):
            raise ConfigError(f"pools.{name}: pool names are lowercase letters, digits, '-' and '_'")
        for i, source in enumerate(pool.sources):
            try:
                ipaddress.ip_address(source.address)
            except ValueError as exc:
                raise ConfigError(f"pools.{name}.sources[{i}].address: {exc}") from exc
            if source.weight < 1:
                raise ConfigError(f"pools.{name}.sources[{i}].weight: must be >= 1")
    for name, account in config.accounts.items():
        if not _NAME.match(name):
            raise ConfigError(f"accounts.{name}: account names are lowercase letters, digits, '-' and '_'")
        if account.pool not in config.pools:
            raise ConfigError(f"accounts.{name}.pool: unknown pool {account.pool!r}")
        for pool in account.pools:
            if pool not in config.pools:
                raise ConfigError(f"accounts.{name}.pools: unknown pool {pool!r}")
        if not account.password_hash.startswith("scrypt$"):
            raise ConfigError(f"accounts.{name}.password_hash: expected an scrypt hash (relais account hash)")
        if account.webhook_url and not account.webhook_url.startswith(("http://", "https://")):
            raise ConfigError(f"accounts.{name}.webhook_url: expected an http:// or https:// URL")
        if account.webhook_url and len(account.webhook_secret) < 16:
            raise ConfigError(f"accounts.{name}.webhook_secret: at least 16 characters with a webhook_url")
    _validate_bounce(config.bounce)
    for domain, pool in config.sender_domains.items():
        if pool not in config.pools:
            raise ConfigError(f"sender_domains.{domain}: unknown pool {pool!r}")
    _validate_routing(config)
    for pool in config.delivery.pools:
        if pool not in config.pools:
            raise ConfigError(f"delivery.pools: unknown pool {pool!r}")
    for server in config.dns.servers:
        try:
            split_server(server)
        except ValueError as exc:
            raise ConfigError(f"dns.servers: {server!r} is not an IP address[:port]") from exc


def _validate_ingress(config: Config) -> None:
    ingress = config.ingress
    if ingress.from_header_check not in ("reject", "report"):
        raise ConfigError("ingress.from_header_check: expected 'reject' or 'report'")
    for i, listener in enumerate(ingress.listeners):
        where = f"ingress.listeners[{i}]"
        if listener.mode not in LISTENER_MODES:
            raise ConfigError(f"{where}.mode: expected one of {', '.join(LISTENER_MODES)}")
        if listener.mode == "implicit-tls" and not ingress.tls_cert_file:
            raise ConfigError(f"{where}: implicit-tls needs ingress.tls_cert_file and tls_key_file")
        if listener.mode == "implicit-tls" and listener.proxy_protocol:
            raise ConfigError(f"{where}: PROXY protocol in front of implicit TLS is not supported")
        if listener.listen.rpartition(":")[0] == "" or not listener.listen.rpartition(":")[2].isdigit():
            raise ConfigError(f"{where}.listen: expected host:port")
        if listener.mode == "inbound" and not (
            ingress.local_domains or getattr(config.bounce, "return_path_domain", "")
        ):
            raise ConfigError(f"{where}: an inbound listener needs ingress.local_domains")
    for net in ingress.relay_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"ingress.relay_networks: {net!r} is not a CIDR network") from exc
    if ingress.relay_networks and not ingress.relay_networks_account:
        raise ConfigError("ingress.relay_networks needs ingress.relay_networks_account")


def _validate_routing(config: Config) -> None:
    """Warm-up schedules, sites and DKIM keys."""
    for name, schedule in config.warmup.items():
        if schedule.overflow not in ("warm", "defer"):
            raise ConfigError(f"warmup.{name}.overflow: expected 'warm' or 'defer'")
        caps = [schedule.daily, *schedule.sites.values()]
        if not any(caps) or any(c < 1 for cs in caps for c in cs):
            raise ConfigError(f"warmup.{name}: caps per day must be positive, and at least one given")
    for pool_name, pool in config.pools.items():
        for i, source in enumerate(pool.sources):
            where = f"pools.{pool_name}.sources[{i}]"
            if source.daily_cap < 0:
                raise ConfigError(f"{where}.daily_cap: must be >= 0")
            if source.warmup:
                if source.warmup not in config.warmup:
                    raise ConfigError(f"{where}.warmup: unknown schedule {source.warmup!r}")
                if not re.match(r"^\d{4}-\d{2}-\d{2}$", source.warmup_start):
                    raise ConfigError(f"{where}.warmup_start: expected the first day as YYYY-MM-DD")
    for name, site in config.sites.items():
        if not _NAME.match(name):
            raise ConfigError(f"sites.{name}: site names are lowercase letters, digits, '-' and '_'")
        if not site.mx:
            raise ConfigError(f"sites.{name}.mx: list at least one MX host pattern")
    for domain, keys in config.dkim.items():
        for i, key in enumerate(keys):
            if key.algorithm not in ("rsa-sha256", "ed25519-sha256"):
                raise ConfigError(f"dkim.{domain}[{i}].algorithm: expected rsa-sha256 or ed25519-sha256")
            if not key.selector or not key.key_file:
                raise ConfigError(f"dkim.{domain}[{i}]: selector and key_file are required")


def _validate_bounce(bounce: BounceConfig) -> None:
    if bounce.verp:
        if not bounce.return_path_domain:
            raise ConfigError("bounce.verp needs bounce.return_path_domain")
        if not bounce.verp_secrets or any(len(s) < 16 for s in bounce.verp_secrets):
            raise ConfigError("bounce.verp needs verp_secrets of at least 16 characters each")
        if not re.match(r"^[a-z0-9][a-z0-9_-]*$", bounce.verp_prefix):
            raise ConfigError("bounce.verp_prefix: lowercase letters, digits, '-' and '_'")
    for i, rule in enumerate(bounce.rules):
        unknown = set(rule) - {"category", "code", "enhanced", "text"}
        if unknown or "category" not in rule:
            raise ConfigError(f"bounce.rules[{i}]: needs category, and only code, enhanced, text besides")
        for key in ("code", "enhanced", "text"):
            try:
                re.compile(rule.get(key) or "")
            except re.error as exc:
                raise ConfigError(f"bounce.rules[{i}].{key}: not a valid regex: {exc}") from exc


def split_server(server: str, default_port: int = 53) -> tuple[str, int]:
    """'ip', 'ip:port', '[v6]:port' or a bare IPv6 address -> (ip, port)."""
    server = server.strip()
    if server.startswith("["):
        host, _, port = server[1:].partition("]:")
        return str(ipaddress.ip_address(host.rstrip("]"))), int(port or default_port)
    if server.count(":") == 1:
        host, _, port = server.partition(":")
        return str(ipaddress.ip_address(host)), int(port)
    return str(ipaddress.ip_address(server)), default_port


def replace(config: Config, **sections: Any) -> Config:
    """A copy of config with whole sections or section fields replaced (tests, `relais up`)."""
    changes: dict[str, Any] = {}
    for name, value in sections.items():
        current = getattr(config, name)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
            changes[name] = dataclasses.replace(current, **value)  # type: ignore[type-var]
        else:
            changes[name] = value
    return dataclasses.replace(config, **changes)
