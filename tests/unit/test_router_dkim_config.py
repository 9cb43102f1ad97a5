"""DKIM header lists dkimpy would refuse are refused when the config loads: otherwise every
message would fail signing and go out unsigned."""

from __future__ import annotations

import os
from pathlib import Path

import dkim as dkimpy
import pytest

from services.cli import main
from services.core import config as core_config
from services.core.config import ConfigError, load_config


def _write(tmp_path: Path, headers: str) -> Path:
    path = tmp_path / "relais.toml"
    path.write_text(
        '[[dkim."acme.test"]]\n'
        'selector = "s1"\n'
        'key_file = "/nonexistent/s1.pem"\n'
        '[[dkim."acme.test"]]\n'
        'selector = "s2"\n'
        'key_file = "/nonexistent/s2.pem"\n'
        f"headers = {headers}\n"
    )
    return path


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ('["to", "subject"]', "must include 'from'"),
        ('["from", "subject"]', "must include 'list-unsubscribe' and 'list-unsubscribe-post' (RFC 8058"),
        ('["from", "List-Unsubscribe"]', "must include 'list-unsubscribe-post' (RFC 8058"),
        ('["from", "Received", "subject"]', "received must not be signed"),
        ('["from", "bcc"]', "bcc must not be signed"),
        ('["From", "DKIM-Signature"]', "dkim-signature must not be signed"),
        ('["from", "return-path"]', "return-path must not be signed"),
        ('["from", "x subject"]', "'x subject' is not a header field name"),
        ('["from", "to:"]', "'to:' is not a header field name"),
        ('["from", ""]', "'' is not a header field name"),
    ],
)
def test_a_header_list_dkimpy_would_refuse_is_refused_naming_the_key(
    tmp_path: Path, headers: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"^dkim\.acme\.test\[1\]\.headers: ") as caught:
        load_config(_write(tmp_path, headers), env={})
    assert message in str(caught.value)


def test_a_header_list_with_from_loads_in_any_case(tmp_path: Path) -> None:
    listed = ["From", "Subject", "List-Unsubscribe", "list-unsubscribe-post"]
    config = load_config(_write(tmp_path, str(listed).replace("'", '"')), env={})
    assert config.dkim["acme.test"][1].headers == listed


def test_relais_validate_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("RELAIS_")]:
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit) as exited:
        main(["validate", str(_write(tmp_path, '["subject", "date"]'))])
    assert exited.value.code == 2
    assert "dkim.acme.test[1].headers" in capsys.readouterr().err


def test_every_field_dkimpy_refuses_to_sign_is_refused_at_load() -> None:
    # Kept as a copy so loading a config does not import the signer; a dkimpy upgrade that
    # refuses more fields must fail here rather than leave mail unsigned.
    assert {name.decode() for name in dkimpy.DKIM.SHOULD_NOT} <= core_config.DKIM_UNSIGNABLE
