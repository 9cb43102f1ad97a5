"""The ingress service: SMTP listener(s) in front of the hand-off to JetStream."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl

from aiosmtpd.smtp import SMTP

from services.core.bodies import BodyStore
from services.core.bus import Bus
from services.core.config import Config
from services.ingress.handler import Authenticator, IngressHandler
from services.ingress.handoff import Handoff

log = logging.getLogger(__name__)


def split_hostport(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class IngressService:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        bodies = BodyStore(bus.js, config.nats.inline_body_max)
        self._handler = IngressHandler(config, Handoff(bus, bodies, config.nats.publish_timeout))
        self._authenticator = Authenticator(config.accounts)
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    def _protocol(self) -> SMTP:
        cfg = self._config.ingress
        host, _ = split_hostport(cfg.listen)
        tls = server_tls_context(cfg.tls_cert_file, cfg.tls_key_file) if cfg.tls_cert_file else None
        # AUTH over plaintext is only allowed where nothing leaves the machine.
        require_tls = cfg.auth_require_tls and not (tls is None and _is_loopback(host))
        return SMTP(
            self._handler,
            hostname=cfg.hostname,
            ident="Relais ESMTP",
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls,
            require_starttls=False,
            authenticator=self._authenticator,
            auth_required=True,
            auth_require_tls=require_tls,
        )

    async def start(self) -> None:
        host, port = split_hostport(self._config.ingress.listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host=host, port=port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        log.info("ingress listening on %s:%s", *self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
