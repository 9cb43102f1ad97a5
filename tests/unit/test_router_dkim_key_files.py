"""RSA key files in every PEM layout that loads must also sign.

A key file that loads at start but that dkimpy cannot read leaves every message of its domain
unsigned (a warning each, and DMARC failing at the receivers), so whatever `load_keys` accepts
must give signatures that verify: a PEM saved with CRLF line ends (written on Windows, or pasted
into a secret), or a file holding the public key before the private one, as some tools write.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.core.config import Config, DkimKeyConfig
from services.router import dkim

MESSAGE = b"From: Acme <news@acme.test>\r\nTo: a@example.test\r\nSubject: Hi\r\n\r\nHello.\r\n"


@functools.cache
def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(layout: serialization.PrivateFormat) -> bytes:
    return _key().private_bytes(serialization.Encoding.PEM, layout, serialization.NoEncryption())


def _public_pem() -> bytes:
    return (
        _key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


LAYOUTS: dict[str, Callable[[], bytes]] = {
    "pkcs8 with CRLF": lambda: _pem(serialization.PrivateFormat.PKCS8).replace(b"\n", b"\r\n"),
    "pkcs1 with CRLF": lambda: _pem(serialization.PrivateFormat.TraditionalOpenSSL).replace(b"\n", b"\r\n"),
    "public key first": lambda: _public_pem() + _pem(serialization.PrivateFormat.PKCS8),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_key_file_that_loads_signs_and_verifies(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "s1.pem"
    path.write_bytes(LAYOUTS[layout]())
    config = Config(dkim={"acme.test": [DkimKeyConfig(selector="s1", key_file=str(path))]})
    keys = dkim.load_keys(config)["acme.test"]
    signed = dkim.sign(MESSAGE, keys).fields.encode() + MESSAGE
    record = dkim.public_txt(_pem(serialization.PrivateFormat.PKCS8)).encode()
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: record)
    # The record `relais dkim` prints for the loaded key is the one that verifies.
    assert dkim.dns_record(keys[0]) == ("s1._domainkey.acme.test", record.decode())
