"""A renewed certificate whose key is of another type (ECDSA to RSA, as when cert-manager's
privateKey.algorithm changes) replaces the old one at reload: no client is shown the retired
certificate any more, nor can one still negotiate with its key."""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.integration.ingress.helpers import in_thread, settle


def _write(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))


def _presented(address: tuple[str, int], ctx: ssl.SSLContext) -> bytes:
    """The certificate the ingress presents after STARTTLS (DER)."""
    with smtplib.SMTP(*address, timeout=10) as smtp:
        smtp.starttls(context=ctx)
        return smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]


def _der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.check_hostname = False  # smtplib connects to 127.0.0.1: no SNI, as many MTAs send none
    return client


async def _serving(
    make_ingress: Callable[..., Any], tmp_path: Path, leaf: trustme.LeafCert
) -> tuple[Any, Path, Path]:
    """An ingress presenting `leaf`, reloading its files every 0.1 s; and those files."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _write(leaf, cert, key)
    stack = await make_ingress(
        ingress={"tls_cert_file": str(cert), "tls_key_file": str(key), "tls_reload_interval": 0.1}
    )
    return stack, cert, key


async def test_a_renewed_certificate_of_another_key_type_retires_the_old_one(
    make_ingress: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    old = ca.issue_cert("relais.test", key_type=trustme.KeyType.ECDSA)
    new = ca.issue_cert("relais.test", key_type=trustme.KeyType.RSA)
    stack, cert, key = await _serving(make_ingress, tmp_path, old)
    client = _trusting(ca)
    assert await in_thread(_presented, stack.smtp_address, client) == _der(old)

    with caplog.at_level(logging.INFO, logger="services.ingress.tls"):
        _write(new, cert, key)
        assert await settle(lambda: "TLS certificate reloaded" in caplog.text)
    assert await in_thread(_presented, stack.smtp_address, client) == _der(new)
    # A client that can only use the old key's type finds nothing to negotiate with.
    ecdsa_only = _trusting(ca)
    ecdsa_only.maximum_version = ssl.TLSVersion.TLSv1_2
    ecdsa_only.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with pytest.raises(ssl.SSLError):
        await in_thread(_presented, stack.smtp_address, ecdsa_only)


async def test_a_broken_renewal_keeps_the_certificate_in_use(
    make_ingress: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    old, new = ca.issue_cert("relais.test"), ca.issue_cert("relais.test")
    stack, cert, key = await _serving(make_ingress, tmp_path, old)
    client = _trusting(ca)

    with caplog.at_level(logging.INFO, logger="services.ingress.tls"):
        # Half a renewal: the new certificate beside the old key.
        cert.write_bytes(b"".join(blob.bytes() for blob in new.cert_chain_pems))
        assert await settle(lambda: "new TLS certificate not loaded" in caplog.text)
        assert await in_thread(_presented, stack.smtp_address, client) == _der(old)
        key.write_bytes(new.private_key_pem.bytes())  # the renewal completed
        assert await settle(lambda: "TLS certificate reloaded" in caplog.text)
    assert await in_thread(_presented, stack.smtp_address, client) == _der(new)
