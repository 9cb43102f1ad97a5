"""A throwaway PKI for TLS tests: one CA, a server certificate for the test names, and a
certificate for the wrong name, for tests where verification has to fail.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

# "*.test" covers one label only, so the two-label MX names tests use are listed too.
SERVER_IDENTITIES: tuple[str, ...] = (
    "localhost",
    "*.test",
    "mx.test",
    "relais.test",
    "*.example.test",
    *(f"127.0.0.{i}" for i in range(1, 10)),
)
WRONG_IDENTITY = "wrong.example"


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True)
class TestPKI:
    """PEM files of the test PKI, and SSL contexts built from them."""

    __test__ = False  # Named Test*, but not a test class for pytest to collect.

    ca_pem: Path
    server_pem: Path  # Leaf first, then the chain up to (not including) the CA.
    server_key: Path
    wrong_pem: Path
    wrong_key: Path

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.2+ server context presenting the certificate for the test names."""
        return _server_context(self.server_pem, self.server_key)

    def wrong_server_context(self) -> ssl.SSLContext:
        """Server context presenting a CA-signed certificate for "wrong.example" only."""
        return _server_context(self.wrong_pem, self.wrong_key)

    def client_context(self) -> ssl.SSLContext:
        """Verifying TLS 1.2+ client context that trusts only the test CA."""
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def make_test_pki(directory: Path | str) -> TestPKI:
    """Create the CA and certificates and write them as PEM files into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*SERVER_IDENTITIES, common_name="relais.test")
    wrong = ca.issue_cert(WRONG_IDENTITY)

    pki = TestPKI(
        ca_pem=directory / "ca.pem",
        server_pem=directory / "server.pem",
        server_key=directory / "server.key",
        wrong_pem=directory / "wrong.pem",
        wrong_key=directory / "wrong.key",
    )
    ca.cert_pem.write_to_path(str(pki.ca_pem))
    for leaf, pem, key in ((server, pki.server_pem, pki.server_key), (wrong, pki.wrong_pem, pki.wrong_key)):
        pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
    return pki
