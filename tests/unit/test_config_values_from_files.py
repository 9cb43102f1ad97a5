"""`RELAIS_<SECTION>__<KEY>_FILE`: a setting's value read from a file, the way the Kubernetes
manifests pass secrets (a mounted Secret) instead of putting them in the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.core.config import ConfigError, env_variable_names, load_config

PASSWORD = "n4ts-pa55word-0f-the-r0uter"
NEW, OLD = "verp-secret-new-0123456789", "verp-secret-old-0123456789"


def _secret(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("ending", ["", "\n", "\r\n"])
def test_value_is_the_file_content_without_its_line_ending(tmp_path: Path, ending: str) -> None:
    path = _secret(tmp_path, "nats-password", PASSWORD + ending)
    config = load_config(None, env={"RELAIS_NATS__PASSWORD_FILE": str(path)})
    assert config.nats.password == PASSWORD


def test_a_list_setting_reads_comma_separated_values_as_its_variable_does(tmp_path: Path) -> None:
    path = _secret(tmp_path, "verp-secrets", f"{NEW}, {OLD}\n")
    env = {
        "RELAIS_BOUNCE__VERP": "true",
        "RELAIS_BOUNCE__RETURN_PATH_DOMAIN": "bounces.example.com",
        "RELAIS_BOUNCE__VERP_SECRETS_FILE": str(path),
    }
    from_file = load_config(None, env=env).bounce.verp_secrets
    del env["RELAIS_BOUNCE__VERP_SECRETS_FILE"]
    from_variable = load_config(None, env={**env, "RELAIS_BOUNCE__VERP_SECRETS": f"{NEW}, {OLD}"})
    assert from_file == from_variable.bounce.verp_secrets == [NEW, OLD]


def test_a_setting_named_like_a_file_is_that_setting_not_a_variant(tmp_path: Path) -> None:
    shaping = _secret(tmp_path, "shaping.toml", "")
    config = load_config(None, env={"RELAIS_DELIVERY__SHAPING_FILE": str(shaping)})
    assert config.delivery.shaping_file == str(shaping)
    # ...and has a _FILE variant of its own, the path read from a file.
    holder = _secret(tmp_path, "shaping-path", f"{shaping}\n")
    config = load_config(None, env={"RELAIS_DELIVERY__SHAPING_FILE_FILE": str(holder)})
    assert config.delivery.shaping_file == str(shaping)


def test_both_the_variable_and_its_file_variant_is_an_error(tmp_path: Path) -> None:
    path = _secret(tmp_path, "nats-password", PASSWORD)
    env = {"RELAIS_NATS__PASSWORD": "another-password", "RELAIS_NATS__PASSWORD_FILE": str(path)}
    with pytest.raises(ConfigError, match="RELAIS_NATS__PASSWORD and RELAIS_NATS__PASSWORD_FILE") as info:
        load_config(None, env=env)
    assert PASSWORD not in str(info.value) and "another-password" not in str(info.value)


def test_a_missing_file_names_the_variable_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    with pytest.raises(ConfigError, match=r"RELAIS_NATS__PASSWORD_FILE: cannot read .*no-such-secret"):
        load_config(None, env={"RELAIS_NATS__PASSWORD_FILE": str(missing)})


def test_a_directory_is_not_a_value_file(tmp_path: Path) -> None:
    # The Secret volume's mount point named instead of the key's file in it.
    (tmp_path / "nats").mkdir()
    with pytest.raises(ConfigError, match=r"RELAIS_NATS__PASSWORD_FILE: cannot read .*nats: Is a directory"):
        load_config(None, env={"RELAIS_NATS__PASSWORD_FILE": str(tmp_path / "nats")})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_names_the_variable_not_the_content(tmp_path: Path) -> None:
    path = _secret(tmp_path, "nats-password", PASSWORD)
    path.chmod(0)
    try:
        with pytest.raises(ConfigError, match="RELAIS_NATS__PASSWORD_FILE: cannot read") as info:
            load_config(None, env={"RELAIS_NATS__PASSWORD_FILE": str(path)})
    finally:
        path.chmod(0o600)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("content", ["", "\n", "  \r\n"])
def test_an_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    # An empty password would connect as nobody and fail later, far from the cause.
    path = _secret(tmp_path, "nats-password", content)
    with pytest.raises(ConfigError, match=r"RELAIS_NATS__PASSWORD_FILE: .* is empty"):
        load_config(None, env={"RELAIS_NATS__PASSWORD_FILE": str(path)})


@pytest.mark.parametrize("content", [f"{NEW}\n{OLD}\n", f"{PASSWORD}\r\nsecond"])
def test_a_file_of_several_lines_is_an_error_that_does_not_show_them(tmp_path: Path, content: str) -> None:
    path = _secret(tmp_path, "verp-secrets", content)
    with pytest.raises(ConfigError, match=r"RELAIS_BOUNCE__VERP_SECRETS_FILE: .* more than one line") as info:
        load_config(None, env={"RELAIS_BOUNCE__VERP_SECRETS_FILE": str(path)})
    for secret in (NEW, OLD, PASSWORD):
        assert secret not in str(info.value)


def test_a_file_that_is_not_text_does_not_show_its_bytes(tmp_path: Path) -> None:
    path = _secret(tmp_path, "nats-password", b"pass\xffword")
    with pytest.raises(ConfigError, match=r"RELAIS_NATS__PASSWORD_FILE: .* not UTF-8") as info:
        load_config(None, env={"RELAIS_NATS__PASSWORD_FILE": str(path)})
    assert "pass" not in str(info.value).replace(str(path), "")


def test_a_file_variant_of_an_unknown_setting_is_rejected(tmp_path: Path) -> None:
    path = _secret(tmp_path, "x", "x")
    with pytest.raises(ConfigError, match="nopassword_file"):
        load_config(None, env={"RELAIS_NATS__NOPASSWORD_FILE": str(path)})


def test_the_file_variants_are_advertised() -> None:
    names = set(env_variable_names())
    assert {"RELAIS_NATS__PASSWORD_FILE", "RELAIS_BOUNCE__VERP_SECRETS_FILE"} <= names
    assert "RELAIS_DELIVERY__SHAPING_FILE_FILE" in names
