"""The config schema: TOML + environment overrides, unknown keys rejected, cross-field checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.core.accounts import hash_password, verify_password
from services.core.config import ConfigError, env_variable_names, load_config, parse_duration

HASH = hash_password("pw")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relais.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe_without_a_file() -> None:
    config = load_config(None, env={})
    assert config.ingress.auth_require_tls is True
    assert config.nats.replicas == 1
    assert config.retry.max_age == 5 * 86400
    assert config.delivery.mode == "mx"


def test_file_values_and_durations(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
[nats]
url = "nats://a:4222,nats://b:4222"
replicas = 3
[retry]
base_delay = "2m"
max_age = "3d"
[pools.bulk]
sources = [{{address = "192.0.2.10", ehlo = "mta1.example.com", weight = 3}}]
[accounts.acme]
password_hash = "{HASH}"
domains = ["acme.test"]
pool = "bulk"
[sender_domains]
"acme.test" = "bulk"
""",
    )
    config = load_config(path, env={})
    assert config.nats.replicas == 3
    assert config.retry.base_delay == 120.0
    assert config.retry.max_age == 3 * 86400.0
    assert config.pools["bulk"].sources[0].weight == 3
    assert config.pool_for("ACME.test", "acme") == "bulk"


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nats\.urll"):
        load_config(_write(tmp_path, '[nats]\nurll = "x"\n'), env={})
    with pytest.raises(ConfigError, match="unknown"):
        load_config(_write(tmp_path, "[natz]\n"), env={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[nats]\nurl = "nats://file:4222"\n')
    env = {
        "RELAIS_NATS__URL": "nats://env:4222",
        "RELAIS_DELIVERY__SMTP_PORT": "2526",
        "RELAIS_DNS__SERVERS": "127.0.0.1:5353, 127.0.0.2",
        "RELAIS_INGRESS__AUTH_REQUIRE_TLS": "false",
    }
    config = load_config(path, env=env)
    assert config.nats.url == "nats://env:4222"
    assert config.delivery.smtp_port == 2526
    assert config.dns.servers == ["127.0.0.1:5353", "127.0.0.2"]
    assert config.ingress.auth_require_tls is False


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "[delivery]\nsmtp_port = 2600\n")
    assert load_config(None, env={"RELAIS_CONFIG": str(path)}).delivery.smtp_port == 2600


@pytest.mark.parametrize("name", ["RELAIS_NATS__NOPE", "RELAIS_NOSECTION__X", "RELAIS_WHATEVER"])
def test_unknown_environment_variables_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, env={name: "1"})


def test_every_advertised_env_name_is_accepted() -> None:
    for name in env_variable_names():
        if name == "RELAIS_CONFIG":
            continue
        # Just the name must be understood; values may be invalid for the type, so only check the name.
        try:
            load_config(None, env={name: "1"})
        except ConfigError as exc:
            assert "unknown environment variable" not in str(exc), name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nats]\nreplicas = 2\n", "replicas"),
        ('[delivery]\nmode = "carrier-pigeon"\n', "delivery.mode"),
        ('[accounts.acme]\npassword_hash = "plain"\n', "scrypt"),
        ('[sender_domains]\n"x.test" = "nopool"\n', "unknown pool"),
        ('[pools.bad]\nsources = [{address = "not-an-ip"}]\n', "address"),
        ('[dns]\nservers = ["resolver.example"]\n', "dns.servers"),
        ('[retry]\nbase_delay = "soon"\n', "duration"),
        ("[bounce]\ndsn_window = -1\n", "bounce.dsn_window"),
        # Written into every DSN (a CR or LF there and no DSN could be built) or SMTP greeting.
        ('[bounce]\ndsn_from = "bounces@example.com"\n', "bounce.dsn_from: expected the local part"),
        ('[bounce]\ndsn_from = "MAILER-DAEMON\\r\\nBcc: x@y.test"\n', "bounce.dsn_from"),
        ('[bounce]\ndsn_from = ""\n', "bounce.dsn_from"),
        ('[bounce]\nreporting_mta = "mx.example.com\\r\\nX: y"\n', "bounce.reporting_mta"),
        ('[ingress]\nhostname = "relais example"\n', "ingress.hostname: expected a host name"),
        ('[ingress]\nhostname = ""\n', "ingress.hostname"),
        # Values that would load, then stop a service at run time:
        ("[router]\nconcurrency = 0\n", "router.concurrency"),
        ("[router]\nmax_buffered_bytes = -1\n", "router.max_buffered_bytes"),
        ("[delivery]\nmax_buffered_bytes = -1\n", "delivery.max_buffered_bytes"),
        ("[bounce]\nmax_buffered_bytes = -1\n", "bounce.max_buffered_bytes"),
        ("[bounce]\nwebhook_batch = 0\n", "bounce.webhook_batch"),
        ("[nats]\npublish_timeout = 0\n", "nats.publish_timeout"),
        ("[delivery]\ndata_done_timeout = 0\n", "delivery.data_done_timeout"),
        ("[nats]\nack_wait = 1\n", "nats.ack_wait"),
        # A message whose ack was lost is recognised only within the de-duplication window.
        ('[ingress]\nqueue_timeout = "2s"\n', "ingress.queue_timeout: must be >= nats.publish_timeout"),
        ('[ingress]\nqueue_timeout = "5m"\n', "ingress.queue_timeout"),
        ('[nats]\nevents_max_age = "2m"\n', "nats.events_max_age"),
        ('[nats]\nevents_max_age = "5m"\n[bounce]\nwebhook_retry_max = "10m"\n', "webhook_retry_max"),
        # Bytes: 4 meant as 4 GiB would keep no history; sizes are written in bytes, not units.
        ("[nats]\nevents_max_bytes = 4\n", "nats.events_max_bytes: must be 0"),
        ("[nats]\nevents_max_bytes = -1\n", "nats.events_max_bytes: must be 0"),
        ('[nats]\nevents_max_bytes = "4G"\n', "nats.events_max_bytes: invalid literal"),
        ('[retry]\nbase_delay = "2h"\nmax_delay = "1h"\n', "retry.max_delay"),
        ("[retry]\njitter = 1.5\n", "retry.jitter"),
        (
            f'[accounts.acme]\npassword_hash = "{HASH}"\nwebhook_url = "https://hooks.test/ünï"\n'
            'webhook_secret = "0123456789abcdef"\n',
            "webhook_url: ASCII only",
        ),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), env={})


def _account_with(tmp_path: Path, **fields: object) -> Path:
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in fields.items())
    return _write(tmp_path, f'[accounts.acme]\npassword_hash = "{HASH}"\n{lines}')


@pytest.mark.parametrize(
    ("url", "why"),
    [
        # Each of these loaded, then failed every POST at run time, for as long as the events
        # stream kept the account's events.
        ("https://hooks.example.test:99999/x", "port '99999' is not a number from 1 to 65535"),
        ("https://hooks.example.test:0/x", "port '0' is not"),  # would have gone to 443
        ("https://hooks.example.test:https/x", "port 'https' is not"),
        ("https://hooks.example.test:8080:1/x", "port '8080:1' is not"),
        ("https:///relais", "no host to post to"),
        ("https://:8443/relais", "no host to post to"),
        ("https://relais:pw@/relais", "no host to post to"),
        ("http://[hooks.example.test]/x", "no valid host"),
        ("http://[::1/x", "no valid host"),
        ("https://hooks..example.test/x", "host 'hooks..example.test' is neither"),
        (f"https://{'h' * 64}.example.test/x", f"host '{'h' * 64}.example.test' is neither a domain"),
        ("https://hooks%2eexample.test/x", "host 'hooks%2eexample.test' is neither a domain name"),
        ("ftp://hooks.example.test/x", "expected an http:// or https:// URL"),
    ],
)
def test_a_webhook_url_that_could_never_be_posted_to_is_refused(tmp_path: Path, url: str, why: str) -> None:
    path = _account_with(tmp_path, webhook_url=url, webhook_secret="0123456789abcdef")
    with pytest.raises(ConfigError, match=f"^accounts\\.acme\\.webhook_url: {re.escape(why)}"):
        load_config(path, env={})


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.test/relais",
        "http://127.0.0.1:8080/hooks/relais?account=acme#top",
        "https://relais:s3cr%3At%40@hooks.example.test:8443/hook",  # basic auth, as Postmark does
        "http://[::1]:8080/hook",
        "https://hooks.example.test.:443/",
        "https://hooks.example.test:/relais",  # an empty port is the scheme's (RFC 3986)
        "http://hooks_internal.example.test/relais",
        "https://HOOKS.Example.test/relais",
    ],
)
def test_webhook_urls_that_can_be_posted_to_stay_valid(tmp_path: Path, url: str) -> None:
    config = load_config(_account_with(tmp_path, webhook_url=url, webhook_secret="0123456789abcdef"), env={})
    assert config.accounts["acme"].webhook_url == url


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"webhook_previous_secret": "fedcba9876543210"}, "webhook_previous_secret: only with a webhook_url"),
        (
            {
                "webhook_url": "https://hooks.example.test/",
                "webhook_secret": "0123456789abcdef",
                "webhook_previous_secret": "short",
                "webhook_previous_secret_until": 2_000_000_000,
            },
            "webhook_previous_secret: at least 16 characters",
        ),
        (
            {
                "webhook_url": "https://hooks.example.test/",
                "webhook_secret": "0123456789abcdef",
                "webhook_previous_secret": "fedcba9876543210",
            },
            "webhook_previous_secret_until: the unix time",
        ),
    ],
)
def test_a_rotation_overlap_in_the_file_is_checked(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^accounts\\.acme\\.{re.escape(message)}"):
        load_config(_account_with(tmp_path, **fields), env={})


def test_the_events_stream_is_bounded_in_bytes_unless_told_otherwise(tmp_path: Path) -> None:
    # Age alone let a bulk sender's events fill the file store the mail queues share.
    assert load_config(None, env={}).nats.events_max_bytes == 4 * 1024**3
    unbounded = load_config(_write(tmp_path, "[nats]\nevents_max_bytes = 0\n"), env={})
    assert unbounded.nats.events_max_bytes == 0
    smallest = load_config(None, env={"RELAIS_NATS__EVENTS_MAX_BYTES": "1048576"})
    assert smallest.nats.events_max_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("30s", 30), ("10m", 600), ("2h", 7200), ("5d", 432000)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_password_hashes_verify_and_are_not_plaintext() -> None:
    assert "pw" not in HASH.split("$")
    assert verify_password("pw", HASH)
    assert not verify_password("pw2", HASH)
    assert not verify_password("pw", "scrypt$garbage")


def test_sender_domains_are_read_in_one_spelling(tmp_path: Path) -> None:
    path = tmp_path / "relais.toml"
    path.write_text(
        '[pools.brand]\n[pools.intl]\n[sender_domains]\n"Brand.test" = "brand"\n"bücher.test." = "intl"\n'
    )
    config = load_config(path, env={})
    assert config.sender_domains == {"brand.test": "brand", "xn--bcher-kva.test": "intl"}
    assert config.pool_for("BRAND.test", "nobody") == "brand"
    assert config.pool_for("Bücher.test", "nobody") == "intl"


def test_two_spellings_of_one_sender_domain_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "relais.toml"
    path.write_text(
        '[pools.brand]\n[sender_domains]\n"bücher.test" = "brand"\n"xn--bcher-kva.test" = "brand"\n'
    )
    with pytest.raises(ConfigError, match="same domain"):
        load_config(path, env={})
