"""The shipped configuration files are valid as written: relais.example.toml (the one the README
points to) and the Kubernetes base ConfigMap's relais.toml, through the loader and through
`relais validate`, which also reads the DKIM key files and the shaping file they name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from services.bounce.classify import rules_from_data
from services.cli import main
from services.core.config import Config, ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "relais.example.toml"
K8S_BASE = ROOT / "deploy" / "k8s" / "base" / "relais.toml"
# What the example leaves to the environment, as its comments say: secrets never sit in the file.
SECRETS_ENV = {
    "RELAIS_NATS__PASSWORD": "nats-password-from-a-secret",
    "RELAIS_BOUNCE__VERP_SECRETS": "verp-secret-new-0123456789,verp-secret-old-0123456789",
}
# Where the example expects the DKIM key files; the CLI test puts real keys elsewhere.
EXAMPLE_DKIM_DIR = "/etc/relais/dkim/"


def test_example_loads_and_validates() -> None:
    config = load_config(EXAMPLE, env=SECRETS_ENV)
    validate(config)
    listeners = {listener.listen.rpartition(":")[2]: listener.mode for listener in config.ingress.listeners}
    assert listeners == {"587": "submission", "465": "implicit-tls", "25": "inbound"}
    assert config.bounce.verp and len(config.bounce.verp_secrets) == 2
    # The bounce service builds its classifier from these at start; they must be accepted there too.
    assert len(rules_from_data(config.bounce.rules)) == len(config.bounce.rules)


def test_example_without_its_secrets_is_rejected() -> None:
    with pytest.raises(ConfigError, match="verp_secrets"):
        load_config(EXAMPLE, env={})


def test_example_covers_every_section() -> None:
    """Every section of the schema is there, as a [table] or a top-level key."""
    text = EXAMPLE.read_text()
    missing = [
        f.name
        for f in dataclasses.fields(Config)
        if not re.search(rf"^(\[+{f.name}[.\]]|{f.name}\s*=)", text, re.M)
    ]
    assert not missing, f"not in relais.example.toml: {missing}"


def _write_dkim_keys(config: Config, directory: Path) -> None:
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for keys in config.dkim.values():
        for key in keys:
            assert key.key_file.startswith(EXAMPLE_DKIM_DIR), key.key_file
            path = directory / key.key_file.removeprefix(EXAMPLE_DKIM_DIR)
            path.write_bytes(ed_pem if key.algorithm == "ed25519-sha256" else rsa_pem)


def _clean_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Only `env` from the RELAIS_* variables: a developer's shell must not change the verdict."""
    for name in [n for n in os.environ if n.startswith("RELAIS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_relais_validate_accepts_the_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "dkim"
    keys.mkdir()
    _write_dkim_keys(load_config(EXAMPLE, env=SECRETS_ENV), keys)
    config_path = tmp_path / "relais.toml"
    config_path.write_text(EXAMPLE.read_text().replace(EXAMPLE_DKIM_DIR, f"{keys}/"))
    shaping = tmp_path / "shaping.toml"
    shaping.write_text('[site.google]\nconnections = 10\n\n[site.example]\ndomains = ["example.net"]\n')
    _clean_env(monkeypatch, {**SECRETS_ENV, "RELAIS_DELIVERY__SHAPING_FILE": str(shaping)})

    assert main(["validate", str(config_path)]) == 0
    assert capsys.readouterr().out.startswith("ok: 2 account(s), 2 pool(s)")


def test_relais_validate_accepts_the_k8s_base_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clean_env(monkeypatch, {})
    assert main(["validate", str(K8S_BASE)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
