"""Loading and checking the configuration: the API every service and `relais validate` use.

The schema itself (the dataclasses and their defaults) is defined once, in
services/core/config_schema.py, and re-exported here so `from services.core.config import ...`
is the one import path. A file is loaded from TOML, then overridden by `RELAIS_<SECTION>__<KEY>`
environment variables (the way Kubernetes manifests set things), or by `RELAIS_<SECTION>__<KEY>_FILE`
naming a file that holds the value (how secrets arrive: a mounted Secret, not the environment,
which child processes inherit and /proc/<pid>/environ and crash dumps show). Unknown keys, in
the file or in the environment, are errors: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.core.addresses import DOT_ATOM, domain_key
from services.core.config_schema import (
    LISTENER_MODES,
    AccountConfig,
    BounceConfig,
    Config,
    DeliveryConfig,
    DkimKeyConfig,
    DnsConfig,
    IngressConfig,
    ListenerConfig,
    NatsConfig,
    PoolConfig,
    RetryConfig,
    RouterConfig,
    SiteConfig,
    SourceConfig,
    TelemetryConfig,
    WarmupConfig,
)

__all__ = [
    "ENV_CONFIG_PATH",
    "ENV_FILE_SUFFIX",
    "ENV_PREFIX",
    "LISTENER_MODES",
    "AccountConfig",
    "BounceConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DkimKeyConfig",
    "DnsConfig",
    "IngressConfig",
    "ListenerConfig",
    "NatsConfig",
    "PoolConfig",
    "RetryConfig",
    "RouterConfig",
    "SiteConfig",
    "SourceConfig",
    "TelemetryConfig",
    "WarmupConfig",
    "env_variable_names",
    "load_config",
    "parse_duration",
    "replace",
    "split_server",
    "valid_name",
    "validate",
]

ENV_PREFIX = "RELAIS_"
ENV_CONFIG_PATH = "RELAIS_CONFIG"
# RELAIS_<SECTION>__<KEY>_FILE=<path>: the setting's value is the content of that file.
ENV_FILE_SUFFIX = "_FILE"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# A label of a webhook's host name. '_' too: resolvers look such names up (service records,
# some internal hosts), and webhooks were posted to them before this check.
_HOST_LABEL = re.compile(r"^[a-z0-9_-]{1,63}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
# The name Relais gives itself (greeting, EHLO, Received:, Message-ID:, a DSN's From: and
# Reporting-MTA): an RFC 5321 Domain, letters, digits and inner hyphens in dot-separated labels.
_MTA_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MTA_NAME = re.compile(rf"^(?=.{{1,253}}$){_MTA_LABEL}(?:\.{_MTA_LABEL})*$")
# A local part as RFC 5322 3.2.3's dot-atom, which needs no quoting in a From: field.
_DOT_ATOM = re.compile(rf"^(?=.{{1,64}}$){DOT_ATOM}$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


def webhook_problem(url: str, secret: str, *, previous_secret: str = "", previous_until: float = 0.0) -> str:
    """What is wrong with an account's webhook settings, as "<field>: <why>"; "" if nothing.
    The config file and `relais account` check the same rules: a URL that could never be posted
    to must be refused where it is set, not retried for as long as the events stream keeps the
    account's events."""
    if url:
        problem = _webhook_url_problem(url)
        if problem:
            return f"webhook_url: {problem}"
        if len(secret) < 16:
            return "webhook_secret: at least 16 characters with a webhook_url"
    if previous_secret or previous_until:
        # A secret rotation's overlap (`relais account webhook --overlap`): it signs too until then.
        if not url:
            return "webhook_previous_secret: only with a webhook_url"
        if len(previous_secret) < 16:
            return "webhook_previous_secret: at least 16 characters, with webhook_previous_secret_until"
        if previous_until <= 0:
            return "webhook_previous_secret_until: the unix time the previous secret stops signing"
    return ""


def _webhook_url_problem(url: str) -> str:
    if not url.startswith(("http://", "https://")) or any(c.isspace() or c < " " for c in url):
        return "expected an http:// or https:// URL"
    if not url.isascii():
        # It goes on the request line and in Host as written: it could never be sent.
        return "ASCII only (percent-encode the path, use the A-label host)"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # a bracketed host that is not an IPv6 address
        return f"no valid host: {exc}"
    try:
        port = parts.port
    except ValueError:  # out of range, or not a number
        port = 0
    if port == 0:
        # Not even 0: the POST would take it for "no port" and go to 80 or 443 instead.
        given = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
        return f"port {given!r} is not a number from 1 to 65535"
    host = parts.hostname or ""
    if not host:
        return "no host to post to"
    if not _host_name_or_address(host):
        return f"host {host!r} is neither a domain name nor an IP address"
    return ""


def _host_name_or_address(host: str) -> bool:
    """Whether `host` (as urlsplit gives it: lowercase, no brackets) can be connected to: an
    IP address, or a name a resolver can look up (no empty or over-long label)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        name = host.removesuffix(".")
        return len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))
    return True


def valid_name(name: str) -> bool:
    """Pool, account and site names: lowercase letters, digits, '-' and '_', at most 63."""
    return bool(_NAME.match(name))


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
    """RELAIS_SECTION__KEY=value, or RELAIS_SECTION__KEY_FILE=path -> {"section": {"key": value}};
    unknown names are errors."""
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
        setting = _file_variant_of(spec.default_factory, attr)  # type: ignore[arg-type]
        if setting:
            plain = name[: -len(ENV_FILE_SUFFIX)]
            if plain in env:
                raise ConfigError(f"{plain} and {name} are both set: use one of them")
            attr, value = setting, _read_value_file(name, value)
        out.setdefault(section, {})[attr] = value
    return out


def _file_variant_of(section: type, attr: str) -> str:
    """The setting `attr` reads from a file when it is `<setting>_file`, else "". A setting
    whose own name ends in _file (shaping_file, tls_ca_file) is that setting, not a variant."""
    names = {f.name for f in dataclasses.fields(section)}
    suffix = ENV_FILE_SUFFIX.lower()
    if attr in names or not attr.endswith(suffix) or attr[: -len(suffix)] not in names:
        return ""
    return attr[: -len(suffix)]


def _read_value_file(name: str, path: str) -> str:
    """The one-line value in the file a _FILE variable names, without its line ending. Errors
    name the variable and the path, never the content: it is a secret."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None
    # `echo secret > file` and most editors end the file with a newline; it is not the value's.
    value = text.rstrip("\r\n")
    if not value.strip():
        raise ConfigError(f"{name}: {path} is empty")
    if "\n" in value or "\r" in value:
        # As in the variable's own form, a list is comma-separated: one line per item would be
        # read as a single item with line breaks in it.
        raise ConfigError(f"{name}: {path} holds more than one line; write the value on one line")
    return value


def env_variable_names() -> list[str]:
    """Every environment variable the loader understands (for docs and manifest checks)."""
    names = [ENV_CONFIG_PATH, ENV_PREFIX + "DATA_DIR"]
    for section in dataclasses.fields(Config):
        factory = section.default_factory
        if dataclasses.is_dataclass(factory):
            for f in dataclasses.fields(factory):
                name = f"{ENV_PREFIX}{section.name.upper()}__{f.name.upper()}"
                names += [name, name + ENV_FILE_SUFFIX]
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
    _normalise_sender_domains(data)
    config = _build(Config, data)
    validate(config)
    return config


def _normalise_sender_domains(data: dict[str, Any]) -> None:
    """Operators may write a sender domain in any case, or in U-labels; lookups use one form."""
    table = data.get("sender_domains")
    if not isinstance(table, dict):
        return
    normalised: dict[str, Any] = {}
    for domain, pool in table.items():
        key = domain_key(str(domain))
        if key in normalised:
            raise ConfigError(f"sender_domains: {domain!r} names the same domain as another entry")
        normalised[key] = pool
    data["sender_domains"] = normalised


def listener_configs(config: Config) -> list[ListenerConfig]:
    """The ingress's listeners: those configured, or one submission listener on `ingress.listen`."""
    return list(config.ingress.listeners) or [ListenerConfig(listen=config.ingress.listen)]


def _calendar_day(text: str) -> bool:
    """Whether `text` is a day of the calendar written YYYY-MM-DD: "2026-02-30" has the shape,
    but the router's `date.fromisoformat` then raised for every job of the pool."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if config.nats.replicas not in (1, 3, 5):
        raise ConfigError("nats.replicas: use 1 (single node) or 3/5 (cluster)")
    if config.delivery.mode not in ("mx", "capture"):
        raise ConfigError("delivery.mode: expected 'mx' or 'capture'")
    if config.ingress.bare_line_endings not in ("reject", "normalise"):
        raise ConfigError("ingress.bare_line_endings: expected 'reject' or 'normalise'")
    _validate_ingress(config)
    _validate_numbers(config)
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
        if not valid_name(name):
            raise ConfigError(f"pools.{name}: pool names are lowercase letters, digits, '-' and '_'")
        for i, source in enumerate(pool.sources):
            try:
                ipaddress.ip_address(source.address)
            except ValueError as exc:
                raise ConfigError(f"pools.{name}.sources[{i}].address: {exc}") from exc
            if source.weight < 1:
                raise ConfigError(f"pools.{name}.sources[{i}].weight: must be >= 1")
    for name, account in config.accounts.items():
        if not valid_name(name):
            raise ConfigError(f"accounts.{name}: account names are lowercase letters, digits, '-' and '_'")
        if account.pool not in config.pools:
            raise ConfigError(f"accounts.{name}.pool: unknown pool {account.pool!r}")
        for pool in account.pools:
            if pool not in config.pools:
                raise ConfigError(f"accounts.{name}.pools: unknown pool {pool!r}")
        if not account.password_hash.startswith("scrypt$"):
            raise ConfigError(f"accounts.{name}.password_hash: expected an scrypt hash (relais account hash)")
        problem = webhook_problem(
            account.webhook_url,
            account.webhook_secret,
            previous_secret=account.webhook_previous_secret,
            previous_until=account.webhook_previous_secret_until,
        )
        if problem:
            raise ConfigError(f"accounts.{name}.{problem}")
    _validate_bounce(config.bounce)
    for domain, pool in config.sender_domains.items():
        if domain != domain_key(domain):
            # Only a Config built in code gets here: load_config normalises what it reads.
            raise ConfigError(f"sender_domains.{domain}: write it as {domain_key(domain)!r}")
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


# Values that load as numbers but stop a service when zero or negative: a zero timeout fails
# every request, a zero batch or concurrency makes a consumer fetch nothing, forever.
_POSITIVE = (
    "nats.publish_timeout",
    "nats.connect_timeout",
    "ingress.command_timeout",
    "ingress.tls_reload_interval",
    "dns.timeout",
    "delivery.connect_timeout",
    "delivery.command_timeout",
    "delivery.data_done_timeout",
    "retry.base_delay",
    "retry.max_age",
    "bounce.webhook_timeout",
    "bounce.verp_max_age",
    "bounce.webhook_retry_base",
)
_AT_LEAST_ONE = (  # ingress.max_message_size may be 0: no limit, as aiosmtpd reads it
    "ingress.max_recipients",
    "router.concurrency",
    "delivery.concurrency",
    "bounce.webhook_batch",
)
# A consumer reports progress every max(ack_wait / 3, 1) s; below this, a message in hand would
# be redelivered to another replica before the first report.
_MIN_ACK_WAIT = 2.0
# A smaller events cap keeps a few hundred events: more likely a size meant in other units.
_MIN_EVENTS_MAX_BYTES = 1024 * 1024


def _validate_numbers(config: Config) -> None:
    def value(path: str) -> float:
        section, _, key = path.partition(".")
        return float(getattr(getattr(config, section), key))

    for path in _POSITIVE:
        if value(path) <= 0:
            raise ConfigError(f"{path}: must be > 0")
    for path in _AT_LEAST_ONE:
        if value(path) < 1:
            raise ConfigError(f"{path}: must be >= 1")
    nats = config.nats
    if not nats.publish_timeout <= config.ingress.queue_timeout < nats.duplicate_window:
        # Asked again after that, a message stored at first would no longer be recognised.
        raise ConfigError(
            f"ingress.queue_timeout: must be >= nats.publish_timeout and < {nats.duplicate_window:g}s, "
            "the de-duplication window that nats.ack_wait implies"
        )
    if nats.ack_wait < _MIN_ACK_WAIT:
        raise ConfigError(f"nats.ack_wait: must be >= {_MIN_ACK_WAIT:g}s")
    if 0 < nats.events_max_age < nats.duplicate_window:
        # JetStream refuses a stream whose de-duplication window is longer than its max age.
        raise ConfigError(
            f"nats.events_max_age: must be 0 (no limit) or >= {nats.duplicate_window:g}s, "
            "the de-duplication window that nats.ack_wait implies"
        )
    if nats.events_max_bytes != 0 and nats.events_max_bytes < _MIN_EVENTS_MAX_BYTES:
        raise ConfigError("nats.events_max_bytes: must be 0 (no limit) or >= 1048576 (1 MiB), in bytes")
    if config.retry.max_delay < config.retry.base_delay:
        raise ConfigError("retry.max_delay: must be >= retry.base_delay")
    if not 0 <= config.retry.jitter <= 1:
        raise ConfigError("retry.jitter: expected a fraction between 0 and 1")
    if config.bounce.webhook_retry_max < config.bounce.webhook_retry_base:
        raise ConfigError("bounce.webhook_retry_max: must be >= bounce.webhook_retry_base")
    if config.bounce.verp_secrets and config.bounce.verp_max_age < 2 * config.retry.max_age:
        # Tokens are dated; a remote MTA's late bounce of our last attempt must still count.
        raise ConfigError("bounce.verp_max_age: must be >= twice retry.max_age")
    if 0 < nats.events_max_age < config.bounce.webhook_retry_max:
        # An account's webhook consumer goes after events_max_age without a pull, and a failing
        # webhook is not pulled from for up to webhook_retry_max: it would go with its events.
        raise ConfigError("nats.events_max_age: must be 0 (no limit) or >= bounce.webhook_retry_max")


def _validate_ingress(config: Config) -> None:
    ingress = config.ingress
    if not _MTA_NAME.match(ingress.hostname):
        raise ConfigError("ingress.hostname: expected a host name (letters, digits, '-' and '.')")
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
        for net in listener.proxy_from:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ConfigError(f"{where}.proxy_from: {net!r} is not a CIDR network") from exc
        if ingress.relay_networks and listener.proxy_protocol and not listener.proxy_from:
            # Anyone reaching this port could send a PROXY header naming a relay network address.
            raise ConfigError(f"{where}: with relay_networks, a PROXY listener needs proxy_from")
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
    for key in ("max_buffered_bytes", "max_proxy_pending_per_peer", "max_connections"):
        if getattr(ingress, key) < 0:
            raise ConfigError(f"ingress.{key}: must be >= 0 (0: no limit)")
    if 0 < ingress.max_buffered_bytes < ingress.max_message_size:
        # A message of the largest size allowed could never be taken: 452 to every retry, for ever.
        raise ConfigError("ingress.max_buffered_bytes: must be 0 (no budget) or >= ingress.max_message_size")


def _validate_routing(config: Config) -> None:
    """Warm-up schedules, sites and DKIM keys."""
    for section in ("router", "delivery", "bounce"):
        if getattr(config, section).max_buffered_bytes < 0:
            raise ConfigError(f"{section}.max_buffered_bytes: must be >= 0 (0: no budget)")
    for name, schedule in config.warmup.items():
        if schedule.overflow not in ("warm", "defer"):
            raise ConfigError(f"warmup.{name}.overflow: expected 'warm' or 'defer'")
        caps = [schedule.daily, *schedule.sites.values()]
        if not any(caps) or any(c < 1 for cs in caps for c in cs):
            raise ConfigError(f"warmup.{name}: caps per day must be positive, and at least one given")
        for site in schedule.sites:
            # The router names a site by a [sites] rule, else by its MX host's registrable domain
            # (dotted, lower case, A-labels): a schedule under any other name never applies, and
            # a source warming only per site then sends to that site with no cap at all.
            if site not in config.sites and ("." not in site or site != domain_key(site)):
                raise ConfigError(
                    f"warmup.{name}.sites.{site}: no site is named so (name a [sites] rule, or an"
                    " MX host's registrable domain in lower case and A-labels)"
                )
    for pool_name, pool in config.pools.items():
        for i, source in enumerate(pool.sources):
            where = f"pools.{pool_name}.sources[{i}]"
            if source.daily_cap < 0:
                raise ConfigError(f"{where}.daily_cap: must be >= 0")
            if source.warmup:
                if source.warmup not in config.warmup:
                    raise ConfigError(f"{where}.warmup: unknown schedule {source.warmup!r}")
                if not _calendar_day(source.warmup_start):
                    raise ConfigError(f"{where}.warmup_start: expected the first day as YYYY-MM-DD")
    for name, site in config.sites.items():
        if not valid_name(name):
            raise ConfigError(f"sites.{name}: site names are lowercase letters, digits, '-' and '_'")
        if not site.mx:
            raise ConfigError(f"sites.{name}.mx: list at least one MX host pattern")
    for domain, keys in config.dkim.items():
        for i, key in enumerate(keys):
            if key.algorithm not in ("rsa-sha256", "ed25519-sha256"):
                raise ConfigError(f"dkim.{domain}[{i}].algorithm: expected rsa-sha256 or ed25519-sha256")
            if not key.selector or not key.key_file:
                raise ConfigError(f"dkim.{domain}[{i}]: selector and key_file are required")
            _validate_dkim_headers(key.headers, f"dkim.{domain}[{i}].headers")


# RFC 6376 5.4.1's fields not to sign, which dkimpy refuses to sign (its DKIM.SHOULD_NOT, kept
# here so that loading a config does not import the signer). Trace fields change in transit and
# Bcc is removed, so a signature over them would break.
DKIM_UNSIGNABLE = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)
ONE_CLICK_UNSUBSCRIBE_FIELDS = ("list-unsubscribe", "list-unsubscribe-post")
# RFC 5322 3.6.8 field-name: printable ASCII but ':'. Anything else would corrupt the h= tag.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def _validate_dkim_headers(headers: list[str], where: str) -> None:
    """A header list dkimpy would refuse fails every signing, so every message would go out
    unsigned, and one without the unsubscribe fields breaks one-click unsubscribe for every
    message: refuse either at load instead (empty means the default set)."""
    if not headers:
        return
    names = [h.lower() for h in headers]
    bad = [h for h in headers if not _FIELD_NAME.fullmatch(h)]
    if bad:
        raise ConfigError(f"{where}: {bad[0]!r} is not a header field name")
    if "from" not in names:
        raise ConfigError(f"{where}: must include 'from' (RFC 6376 5.4: From is always signed)")
    refused = sorted(DKIM_UNSIGNABLE.intersection(names))
    if refused:
        raise ConfigError(f"{where}: {', '.join(refused)} must not be signed (RFC 6376 5.4.1)")
    # Signed when present, like every listed field: without them, receivers honour no one-click
    # unsubscribe, which Gmail and Yahoo require of bulk senders.
    unsubscribe = [h for h in ONE_CLICK_UNSUBSCRIBE_FIELDS if h not in names]
    if unsubscribe:
        raise ConfigError(
            f"{where}: must include {' and '.join(map(repr, unsubscribe))} (RFC 8058 4: one-click "
            "unsubscribe is honoured only when a DKIM signature covers both)"
        )


def _validate_bounce(bounce: BounceConfig) -> None:
    # Each goes into every DSN: with a CR or LF the DSN cannot be built, and its notice would
    # come back for ever; a whole address in dsn_from would give From: <a@b@host>.
    if bounce.reporting_mta and not _MTA_NAME.match(bounce.reporting_mta):
        raise ConfigError("bounce.reporting_mta: expected a host name (letters, digits, '-' and '.')")
    if not _DOT_ATOM.match(bounce.dsn_from):
        raise ConfigError(
            "bounce.dsn_from: expected the local part DSNs come from (e.g. MAILER-DAEMON, without "
            "'@': the domain is bounce.reporting_mta or ingress.hostname)"
        )
    if bounce.dsn_window < 0:
        raise ConfigError("bounce.dsn_window: must be >= 0 (0 sends each DSN at once)")
    if bounce.verp:
        if not bounce.return_path_domain:
            raise ConfigError("bounce.verp needs bounce.return_path_domain")
        if not bounce.verp_secrets or any(len(s) < 16 for s in bounce.verp_secrets):
            raise ConfigError("bounce.verp needs verp_secrets of at least 16 characters each")
        if not re.match(r"^[a-z0-9][a-z0-9_-]*$", bounce.verp_prefix):
            raise ConfigError("bounce.verp_prefix: lowercase letters, digits, '-' and '_'")
        if len(bounce.verp_prefix) > 9:
            # With it, `<prefix>+_<account handle>.<token>` (services/core/returnpath.py) must
            # fit the 64 octets of a local part, or bounces to it are refused on the way back.
            raise ConfigError("bounce.verp_prefix: at most 9 characters")
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
