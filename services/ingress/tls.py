"""Server TLS for the listeners: certificate files (Kubernetes secrets), TLS 1.2+, live reload.

One SSLContext per process is shared by every listener. Reloading builds a new context from the
files, and each handshake after that is moved to it (the shared context's SNI callback, called
for every ClientHello, with or without a server name): new handshakes present the new certificate
alone while open sessions carry on. Loading the new pair into the shared context instead would
keep the old certificate beside it whenever the key type changed (OpenSSL holds one certificate
per key type): an ECDSA certificate renewed as RSA would still be shown to most clients.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

log = logging.getLogger(__name__)


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _fingerprint(*paths: str) -> tuple[tuple[int, int, int], ...]:
    # Kubernetes swaps a secret by re-pointing a symlink: stat() follows it, so inode changes too.
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(out)


class TlsCertificates:
    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        # What the listeners hold; `_current` is the context handshakes are moved to.
        self.context = server_tls_context(cert_file, key_file)
        self.context.sni_callback = self._present_current
        self._current = self.context
        self._seen = _fingerprint(cert_file, key_file)

    def _present_current(self, tls: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if context is not self._current:
            tls.context = self._current

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; a broken new pair keeps the old one in use."""
        try:
            current = _fingerprint(self.cert_file, self.key_file)
        except OSError as exc:
            log.warning("TLS certificate files unreadable, keeping the loaded ones: %s", exc)
            return False
        if current == self._seen:
            return False
        try:
            # A half-written secret fails here and leaves the context in use as it was.
            fresh = server_tls_context(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            log.error("new TLS certificate not loaded, keeping the old one: %s", exc)
            return False
        self._current = fresh
        self._seen = current
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()
