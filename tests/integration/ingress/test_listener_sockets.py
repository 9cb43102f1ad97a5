"""A listener on a name with several addresses (`localhost` as 127.0.0.1 and ::1 on a dual-stack
machine) gets a socket on each: every one takes mail, the ingress records and logs them all, and
/readyz names each listener, its mode and what it bound, so an operator sees what listens.

This machine's /etc/hosts may give `localhost` one address only: the name used here is resolved by
the ingress's event loop to 127.0.0.1 and ::1, as such a hosts file would. The sockets, the SMTP
sessions and the /readyz requests are real."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.core.embedded import EmbeddedNats, free_port
from tests.integration.ingress.helpers import client, free_listen, in_thread, queued_inbound
from tests.integration.ingress.test_ready_after_all_listeners import ingress_with_health, readyz
from tests.support.relais import make_config

DUAL = "dual-stack.relais.test"
LOOPBACKS = ("127.0.0.1", "::1")
LOCAL = "bounces.relais.test"


@pytest.fixture
def dual_stack_name(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """`dual_stack_name()`: from now on this event loop resolves `DUAL` to 127.0.0.1 and ::1, in
    that order; any other name as before."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")

    def resolve_dual() -> None:
        loop = asyncio.get_running_loop()
        resolve = loop.getaddrinfo

        async def getaddrinfo(host: Any, port: Any, **kwargs: Any) -> list[Any]:
            if host != DUAL:
                return await resolve(host, port, **kwargs)
            return [info for ip in LOOPBACKS for info in await resolve(ip, port, **kwargs)]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)

    return resolve_dual


def _listeners(submission: str, inbound: str) -> dict[str, Any]:
    return {
        "local_domains": [LOCAL],
        "listeners": [
            ListenerConfig(listen=submission, mode="submission"),
            ListenerConfig(listen=inbound, mode="inbound"),
        ],
    }


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _to_postmaster(address: tuple[str, int]) -> int:
    """A bounce to postmaster over the inbound listener at `address`: the reply to DATA."""
    with client(address) as smtp:
        smtp.mail("")
        smtp.rcpt(f"postmaster@{LOCAL}")
        code, _ = smtp.data(b"Subject: a bounce\r\n\r\nUndeliverable.\r\n")
        return code


async def test_every_address_of_the_name_is_bound_recorded_logged_and_takes_mail(
    make_ingress: Callable[..., Any],
    nats_server: EmbeddedNats,
    dual_stack_name: Callable[[], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="services.ingress.service")
    dual_stack_name()
    port = free_port(*LOOPBACKS)
    submission, inbound = free_listen(), f"{DUAL}:{port}"
    stack = await make_ingress(ingress=_listeners(submission, inbound))
    service = stack.ingress

    assert sorted(service.bound[inbound]) == [("127.0.0.1", port), ("::1", port)]
    assert service.addresses[inbound] in service.bound[inbound]
    assert service.bound[submission] == [service.addresses[submission]]
    assert service.address == service.addresses[submission]
    for address in service.bound[inbound]:
        assert await in_thread(_to_postmaster, address) == 250, address
    assert len(await queued_inbound(nats_server.url)) == 2

    said = [r.getMessage() for r in caplog.records if f" {inbound} on " in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert all(_shown(host, port) in said[0] for host in LOOPBACKS), said


async def test_readyz_names_each_listener_its_mode_and_its_addresses(
    nats_server: EmbeddedNats, dual_stack_name: Callable[[], None]
) -> None:
    dual_stack_name()
    port = free_port(*LOOPBACKS)
    submission, inbound = free_listen(), f"{DUAL}:{port}"
    config = make_config(
        nats_url=nats_server.url,
        ingress=_listeners(submission, inbound),
        telemetry={"http_listen": f"127.0.0.1:{free_port()}"},
    )
    async with ingress_with_health(config) as (service, health):
        status, body = await readyz(health)
        assert status == 503, body
        assert f"listeners: FAIL (submission {submission} not bound; inbound {inbound} not bound)\n" in body

        await service.start()
        status, body = await readyz(health)
        assert status == 200, body
        # The name's addresses in the order they were bound, which asyncio does not keep.
        line = next(line for line in body.splitlines() if line.startswith("listeners: "))
        said = f"listeners: ok (submission {submission} on {submission}; inbound {inbound} on "
        assert line.startswith(said) and line.endswith(")"), body
        assert sorted(line[len(said) : -1].split(", ")) == [f"127.0.0.1:{port}", f"[::1]:{port}"], body
