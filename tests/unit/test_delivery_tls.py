"""MTA-STS parsing and the TLS policy a delivery runs under."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from services.delivery import smtp_session
from services.delivery.mta_sts import PolicyError, StsPolicy, parse_policy, parse_txt
from services.delivery.smtp_session import client_tls_context
from services.delivery.tls_policy import mx_matches, tls_policy

POLICY = "\r\n".join(
    [
        "version: STSv1",
        "mode: enforce",
        "mx: mx.example.test",
        "mx: *.backup.example.test",
        "max_age: 86400",
        "",
    ]
)


def test_txt_record_gives_the_policy_id_only_when_there_is_exactly_one() -> None:
    assert parse_txt(["v=STSv1; id=20261201T000000;"]) == "20261201T000000"
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=abc"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None
    assert parse_txt([]) is None


def test_policy_file_is_parsed() -> None:
    policy = parse_policy(POLICY, "abc")
    assert policy == StsPolicy("enforce", ("mx.example.test", "*.backup.example.test"), 86400, "abc")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n").mode == "none"


@pytest.mark.parametrize(
    "text",
    [
        "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
    ],
)
def test_invalid_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_mx_patterns_match_one_label_wildcards() -> None:
    assert mx_matches("mx.example.test", "mx.example.test")
    assert mx_matches("MX.Example.Test.", "mx.example.test")
    assert mx_matches("a.backup.example.test", "*.backup.example.test")
    assert not mx_matches("a.b.backup.example.test", "*.backup.example.test")
    assert not mx_matches("backup.example.test", "*.backup.example.test")
    assert not mx_matches("evil-mx.example.test", "mx.example.test")


def test_policy_precedence() -> None:
    assert not tls_policy(site_requires=False, verify_always=False, sts=None).require
    site = tls_policy(site_requires=True, verify_always=False, sts=None)
    assert site.require and not site.verify and site.origin == "site"
    enforce = tls_policy(site_requires=False, verify_always=False, sts=parse_policy(POLICY))
    assert enforce.require and enforce.verify and enforce.origin == "mta-sts"
    assert enforce.allows_host("mx.example.test") and not enforce.allows_host("mx.evil.test")
    testing = StsPolicy("testing", ("mx.example.test",), 60)
    relaxed = tls_policy(site_requires=False, verify_always=False, sts=testing)
    assert not relaxed.require and relaxed.allows_host("anything.test"), "testing mode only reports"


def test_starttls_contexts_are_shared_by_kind() -> None:
    opportunistic = client_tls_context(False)
    verified = client_tls_context(True)
    assert client_tls_context(False) is opportunistic and client_tls_context(True) is verified
    assert opportunistic.verify_mode == ssl.CERT_NONE and not opportunistic.check_hostname
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
    assert opportunistic.minimum_version == verified.minimum_version == ssl.TLSVersion.TLSv1_2


def _serials(ctx: ssl.SSLContext) -> set[int]:
    return {int(cert["serialNumber"], 16) for cert in ctx.get_ca_certs()}


def test_a_renewed_ca_bundle_is_read_once_the_shared_context_is_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    old, new = trustme.CA(), trustme.CA()
    old.cert_pem.write_to_path(str(bundle))
    first = client_tls_context(True, str(bundle))
    new.cert_pem.write_to_path(str(bundle))
    assert client_tls_context(True, str(bundle)) is first, "shared while young"
    monkeypatch.setattr(smtp_session, "_CONTEXT_LIFETIME", 0.0)
    renewed = client_tls_context(True, str(bundle))
    serial = x509.load_pem_x509_certificate(new.cert_pem.bytes()).serial_number
    assert serial in _serials(renewed) and serial not in _serials(first)
