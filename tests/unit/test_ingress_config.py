"""The [ingress] config section: listeners, local domains, relay networks (no I/O besides tmp files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import ConfigError, ListenerConfig, listener_configs, load_config

BASE = """
[ingress]
hostname = "relais.test"
tls_cert_file = "/etc/relais/tls.crt"
tls_key_file = "/etc/relais/tls.key"
local_domains = ["bounces.relais.test"]
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "relais.toml"
    path.write_text(text)
    return load_config(path, env={})


def test_default_is_one_submission_listener_on_listen(tmp_path: Path) -> None:
    config = _load(tmp_path, '[ingress]\nlisten = "127.0.0.1:2600"\n')
    assert listener_configs(config) == [ListenerConfig(listen="127.0.0.1:2600", mode="submission")]  # type: ignore[arg-type]


def test_listener_list(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        BASE
        + """
[[ingress.listeners]]
listen = "0.0.0.0:587"
[[ingress.listeners]]
listen = "0.0.0.0:465"
mode = "implicit-tls"
[[ingress.listeners]]
listen = "0.0.0.0:25"
mode = "inbound"
proxy_protocol = true
""",
    )
    modes = [(item.listen, item.mode, item.proxy_protocol) for item in listener_configs(config)]  # type: ignore[arg-type]
    assert modes == [
        ("0.0.0.0:587", "submission", False),
        ("0.0.0.0:465", "implicit-tls", False),
        ("0.0.0.0:25", "inbound", True),
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[ingress.listeners]]\nlisten = "0.0.0.0:25"\nmode = "open"\n', "mode"),
        ('[[ingress.listeners]]\nlisten = "25"\n', "listen"),
        ('[[ingress.listeners]]\nlisten = ":465"\nmode = "implicit-tls"\nproxy_protocol = true\n', "PROXY"),
        ('[[ingress.listeners]]\nlisten = "0.0.0.0:25"\nproxy = true\n', "unknown key"),
    ],
)
def test_bad_listeners_rejected(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, BASE + extra)


def test_implicit_tls_needs_certificates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert_file"):
        _load(tmp_path, '[[ingress.listeners]]\nlisten = "0.0.0.0:465"\nmode = "implicit-tls"\n')


def test_inbound_needs_local_domains(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local_domains"):
        _load(tmp_path, '[[ingress.listeners]]\nlisten = "0.0.0.0:25"\nmode = "inbound"\n')


def test_relay_networks_need_valid_cidr_and_an_account(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CIDR"):
        _load(tmp_path, '[ingress]\nrelay_networks = ["10.0.0.0/33"]\nrelay_networks_account = "x"\n')
    with pytest.raises(ConfigError, match="relay_networks_account"):
        _load(tmp_path, '[ingress]\nrelay_networks = ["10.0.0.0/8"]\n')


def test_relay_networks_behind_proxy_protocol_need_the_load_balancers_networks(tmp_path: Path) -> None:
    # Anyone reaching the port could otherwise send a PROXY header naming a relay network address.
    relay = '[ingress]\nrelay_networks = ["10.0.0.0/8"]\nrelay_networks_account = "acme"\n'
    proxied = '[[ingress.listeners]]\nlisten = "0.0.0.0:587"\nproxy_protocol = true\n'
    with pytest.raises(ConfigError, match="proxy_from"):
        _load(tmp_path, relay + proxied)
    config = _load(tmp_path, relay + proxied + 'proxy_from = ["192.0.2.0/24"]\n')
    assert config.ingress.listeners[0].proxy_from == ["192.0.2.0/24"]
    with pytest.raises(ConfigError, match="CIDR"):
        _load(tmp_path, proxied + 'proxy_from = ["lb.example"]\n')


def test_env_override_of_local_domains(tmp_path: Path) -> None:
    path = tmp_path / "relais.toml"
    path.write_text("")
    config = load_config(path, env={"RELAIS_INGRESS__LOCAL_DOMAINS": "a.test, b.test"})
    assert config.ingress.local_domains == ["a.test", "b.test"]


def test_the_data_budget_holds_at_least_the_largest_message(tmp_path: Path) -> None:
    # A budget smaller than max_message_size would answer such a message 452 on every retry.
    with pytest.raises(ConfigError, match="max_buffered_bytes"):
        _load(tmp_path, BASE + "max_message_size = 1000\nmax_buffered_bytes = 999\n")
    with pytest.raises(ConfigError, match="max_proxy_pending_per_peer"):
        _load(tmp_path, BASE + "max_proxy_pending_per_peer = -1\n")
    for budget in (0, 1000):  # 0: no budget
        config = _load(tmp_path, BASE + f"max_message_size = 1000\nmax_buffered_bytes = {budget}\n")
        assert config.ingress.max_buffered_bytes == budget  # type: ignore[attr-defined]
