"""Listeners: submission with STARTTLS (AUTH only after TLS), implicit TLS, inbound for own domains."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.core.embedded import EmbeddedNats
from services.ingress.replies import AUTH_REQUIRED, NEEDS_SMTPUTF8, RELAY_DENIED
from tests.integration.ingress.helpers import (
    client,
    free_listen,
    in_thread,
    listener,
    login,
    plain,
    queued,
    queued_inbound,
    reply,
    tls_sections,
)
from tests.support.certs import TestPKI
from tests.support.relais import (
    ACCOUNT,
    PASSWORD,
    ServiceProcess,
    config_to_toml,
    make_config,
    message,
    wait_listening,
)

LOCAL = "bounces.relais.test"


@pytest.fixture
async def three(make_ingress: Callable[..., Any], pki: TestPKI) -> tuple[Any, dict[str, str]]:
    names = {"submission": free_listen(), "implicit-tls": free_listen(), "inbound": free_listen()}
    stack = await make_ingress(
        ingress=tls_sections(
            pki,
            local_domains=[LOCAL],
            listeners=[ListenerConfig(listen=v, mode=k) for k, v in names.items()],
        )
    )
    return stack, names


async def test_submission_offers_starttls_and_auth_only_after_it(three: Any, pki: TestPKI) -> None:
    stack, names = three
    address = listener(stack, names["submission"])

    def scenario() -> tuple[bool, bool, bool, int]:
        with client(address) as smtp:
            offered_tls = smtp.has_extn("starttls")
            auth_before = smtp.has_extn("auth")
            code, _ = smtp.docmd("AUTH", "PLAIN AGFjbWUAeA==")
            smtp.starttls(context=pki.client_context())
            smtp.ehlo("client.test")
            auth_after = smtp.has_extn("auth")
            login(smtp)
            smtp.sendmail("news@acme.test", ["someone@alpha.test"], message())
            return offered_tls, auth_before, auth_after, code

    offered_tls, auth_before, auth_after, code = await in_thread(scenario)
    assert offered_tls and not auth_before and auth_after
    assert code == 538  # 5.7.11 encryption required
    [env] = await queued(stack.config.nats.url)
    assert env.meta["listener"] == "submission"
    assert env.meta["tls_version"] in ("TLSv1.2", "TLSv1.3")


async def test_mail_without_auth_is_refused_on_submission(three: Any, pki: TestPKI) -> None:
    stack, names = three

    def scenario() -> tuple[int, bytes]:
        with client(listener(stack, names["submission"]), pki=pki, starttls=True) as smtp:
            return smtp.mail("news@acme.test")

    code, text = await in_thread(scenario)
    assert (code, text.decode()) == (
        AUTH_REQUIRED.code,
        f"{AUTH_REQUIRED.enhanced_status} {AUTH_REQUIRED.text}",
    )


async def test_implicit_tls_listener(three: Any, pki: TestPKI) -> None:
    stack, names = three
    host, port = listener(stack, names["implicit-tls"])

    def scenario() -> tuple[str, bool]:
        with smtplib.SMTP_SSL(host, port, context=pki.client_context(), timeout=15) as smtp:
            smtp.ehlo("client.test")
            starttls = smtp.has_extn("starttls")
            login(smtp)
            smtp.sendmail("news@acme.test", ["someone@alpha.test"], message())
            return smtp.sock.version(), starttls  # type: ignore[union-attr]

    version, starttls = await in_thread(scenario)
    assert version in ("TLSv1.2", "TLSv1.3") and not starttls
    [env] = await queued(stack.config.nats.url)
    assert env.meta["listener"] == "implicit-tls" and env.meta["tls_version"] == version
    assert env.account == ACCOUNT


async def test_tls_below_1_2_is_refused(three: Any, pki: TestPKI) -> None:
    stack, names = three
    host, port = listener(stack, names["implicit-tls"])
    ctx = pki.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        await in_thread(lambda: smtplib.SMTP_SSL(host, port, context=ctx, timeout=10).quit())


async def test_inbound_accepts_own_domains_without_auth(three: Any, nats_server: EmbeddedNats) -> None:
    stack, names = three

    def scenario() -> tuple[bool, tuple[int, bytes], tuple[int, bytes]]:
        with client(listener(stack, names["inbound"])) as smtp:
            auth = smtp.has_extn("auth")
            smtp.mail("")
            relayed = smtp.rcpt("someone@alpha.test")
            smtp.rcpt(f"b+acme.token@{LOCAL}")
            smtp.rcpt(f"fbl@{LOCAL}")
            assert smtp.rcpt("PostMaster")[0] == 250  # RFC 5321 §4.5.1: no domain needed
            return auth, relayed, smtp.data(b"Subject: bounce\r\n\r\nreport\r\n")

    auth, relayed, data_reply = await in_thread(scenario)
    assert not auth
    assert relayed == reply(RELAY_DENIED)
    assert data_reply[0] == 250
    [env] = await queued_inbound(nats_server.url)
    assert env.kind == "inbound" and env.sender == "" and env.account == ""
    assert env.recipients == (f"b+acme.token@{LOCAL}", f"fbl@{LOCAL}", f"postmaster@{LOCAL}")
    assert env.body.inline is not None and env.body.inline.startswith(b"Received: from client.test")
    assert env.body.inline.endswith(b"Subject: bounce\r\n\r\nreport\r\n")
    assert await queued(nats_server.url) == []  # nothing went to the router


async def test_inbound_takes_an_internationalised_local_part_with_smtputf8(three: Any) -> None:
    stack, names = three

    def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(listener(stack, names["inbound"])) as smtp:
            smtp.mail("", ["SMTPUTF8"])
            accepted = smtp.rcpt(f"jürgen@{LOCAL}")
            smtp.rset()
            smtp.mail("")
            smtp.command_encoding = "utf-8"  # send the address as UTF-8 all the same
            return accepted, smtp.rcpt(f"jürgen@{LOCAL}")

    accepted, without = await in_thread(scenario)
    assert accepted[0] == 250
    assert without == reply(NEEDS_SMTPUTF8)


async def test_inbound_refuses_auth_and_relaying(three: Any) -> None:
    stack, names = three

    def scenario() -> tuple[int, tuple[int, bytes]]:
        with client(listener(stack, names["inbound"])) as smtp:
            code, _ = smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")
            smtp.mail("attacker@evil.test")
            return code, smtp.rcpt("victim@alpha.test")

    code, relayed = await in_thread(scenario)
    assert code >= 500
    assert relayed[0] == RELAY_DENIED.code


async def test_listener_connection_is_plain_tcp_on_inbound(three: Any) -> None:
    stack, names = three
    address = listener(stack, names["inbound"])

    def greeting() -> bytes:
        with socket.create_connection(address, timeout=5) as sock:
            return sock.recv(100)

    assert (await in_thread(greeting)).startswith(b"220 ")


async def test_listeners_from_a_config_file_in_a_real_process(
    nats_server: EmbeddedNats, pki: TestPKI, tmp_path: Path
) -> None:
    names = {"submission": free_listen(), "implicit-tls": free_listen(), "inbound": free_listen()}
    config = make_config(
        nats_url=nats_server.url,
        ingress=tls_sections(
            pki, local_domains=[LOCAL], listeners=[ListenerConfig(listen=v, mode=k) for k, v in names.items()]
        ),
        telemetry={"http_listen": ""},
    )
    path = tmp_path / "relais.toml"
    path.write_text(config_to_toml(config))
    process = ServiceProcess("ingress", path, tmp_path)
    process.start()
    try:
        for listen in names.values():
            host, _, port = listen.rpartition(":")
            await in_thread(wait_listening, (host, int(port)), 60)

        def send() -> str:
            host, _, port = names["implicit-tls"].rpartition(":")
            with smtplib.SMTP_SSL(host, int(port), context=pki.client_context(), timeout=15) as smtp:
                login(smtp)
                smtp.sendmail("news@acme.test", ["someone@alpha.test"], message())
            with client(_address(names["inbound"])) as smtp:
                smtp.sendmail("", [f"fbl@{LOCAL}"], b"Subject: report\r\n\r\nx\r\n")
            return "ok"

        assert await in_thread(send) == "ok", process.log()
        assert len(await queued(nats_server.url)) == 1
        assert len(await queued_inbound(nats_server.url)) == 1
    finally:
        process.stop()


def _address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)
