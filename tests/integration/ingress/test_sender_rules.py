"""Authorization: MAIL FROM and From: within the account's domains; control headers X-Relais-*."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiosmtplib

from services.core.config import AccountConfig, PoolConfig
from services.ingress.replies import (
    ACCOUNTS_UNAVAILABLE,
    AUTH_IN_TRANSACTION,
    AUTH_OK,
    FROM_NOT_OWNED,
    POOL_NOT_ALLOWED,
    SENDER_HEADER_NOT_OWNED,
    SENDER_NOT_OWNED,
)
from tests.integration.ingress.helpers import client, in_thread, login, plain, queued, reply
from tests.support.relais import ACCOUNT, PASSWORD, message, password_hash

FOREIGN_FROM = b"From: PayPal <service@paypal.test>\r\nSubject: hi\r\n\r\nbody\r\n"


def _send(address: tuple[str, int], data: bytes, sender: str = "news@acme.test") -> tuple[int, bytes]:
    with client(address) as smtp:
        login(smtp)
        code, text = smtp.mail(sender)
        if code != 250:
            return code, text
        smtp.rcpt("someone@alpha.test")
        return smtp.data(data)


async def test_envelope_sender_outside_account_domains(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    assert await in_thread(_send, ingress.smtp_address, message(), "ceo@paypal.test") == reply(
        SENDER_NOT_OWNED
    )
    assert await queued(ingress.config.nats.url) == []


async def test_from_header_not_owned_rejected_at_end_of_data(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    assert await in_thread(_send, ingress.smtp_address, FOREIGN_FROM) == reply(FROM_NOT_OWNED)
    assert await in_thread(_send, ingress.smtp_address, FOREIGN_FROM, "") == reply(FROM_NOT_OWNED)
    assert await queued(ingress.config.nats.url) == []


async def test_sender_header_not_owned_rejected_at_end_of_data(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    on_behalf = b"From: Acme <news@acme.test>\r\nSender: PayPal <service@paypal.test>\r\n\r\nx\r\n"
    assert await in_thread(_send, ingress.smtp_address, on_behalf) == reply(SENDER_HEADER_NOT_OWNED)
    own = on_behalf.replace(b"service@paypal.test", b"desk@acme.test")
    assert (await in_thread(_send, ingress.smtp_address, own))[0] == 250
    [env] = await queued(ingress.config.nats.url)
    assert env.body.inline is not None and b"Sender: PayPal <desk@acme.test>" in env.body.inline


async def test_from_header_report_only(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"from_header_check": "report"})
    assert (await in_thread(_send, ingress.smtp_address, FOREIGN_FROM))[0] == 250
    # The null sender has no other identity than From:, so it is enforced even in report mode.
    assert await in_thread(_send, ingress.smtp_address, FOREIGN_FROM, "") == reply(FROM_NOT_OWNED)
    [env] = await queued(ingress.config.nats.url)
    assert env.meta["from_not_owned"] == "1"


async def test_control_headers_recorded_and_stripped(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(
        pools={"default": PoolConfig(), "bulk": PoolConfig(), "vip": PoolConfig()},
        accounts={
            ACCOUNT: AccountConfig(password_hash=password_hash(), domains=["acme.test"], pools=["bulk"])
        },
    )
    body = message()
    tagged = b"X-Relais-Campaign: spring-sale\r\nX-Relais-Pool: bulk\r\n" + body
    assert (await in_thread(_send, ingress.smtp_address, tagged))[0] == 250
    vip = b"X-Relais-Pool: vip\r\n" + body
    assert await in_thread(_send, ingress.smtp_address, vip) == reply(POOL_NOT_ALLOWED)
    [env] = await queued(ingress.config.nats.url)
    assert env.meta["campaign"] == "spring-sale" and env.meta["pool"] == "bulk"
    data = env.body.inline or b""
    assert b"X-Relais-" not in data
    assert data.endswith(body)  # everything the sender wrote, minus the control headers, unchanged


async def test_relay_networks_allow_list(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(
        ingress={"relay_networks": ["127.0.0.0/8"], "relay_networks_account": ACCOUNT}
    )

    def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            foreign = smtp.mail("x@paypal.test")
            smtp.rset()
            smtp.mail("news@acme.test")
            smtp.rcpt("someone@alpha.test")
            return foreign, smtp.data(message())

    foreign, accepted = await in_thread(scenario)
    assert foreign == reply(SENDER_NOT_OWNED)  # the network's account still owns only its domains
    assert accepted[0] == 250
    [env] = await queued(ingress.config.nats.url)
    assert env.account == ACCOUNT and env.client_ip == "127.0.0.1"

    # Until this replica has read the accounts from KV, a relay network's mail waits (451).
    ingress.ingress.accounts.loaded.clear()

    def early() -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            return smtp.mail("news@acme.test")

    assert await in_thread(early) == reply(ACCOUNTS_UNAVAILABLE)


async def test_no_auth_during_a_transaction(make_ingress: Callable[..., Any]) -> None:
    # MAIL FROM checked as the relay network's account must not be queued as another account's.
    ingress = await make_ingress(
        ingress={"relay_networks": ["127.0.0.0/8"], "relay_networks_account": ACCOUNT}
    )

    def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            smtp.mail("news@acme.test")
            midway = smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")
            smtp.rset()
            return midway, smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")

    midway, after_rset = await in_thread(scenario)
    assert midway == reply(AUTH_IN_TRANSACTION)
    assert after_rset == reply(AUTH_OK)


async def test_an_internationalised_sender_domain_is_queued_in_a_labels(
    make_ingress: Callable[..., Any],
) -> None:
    # The router finds dedicated pools and DKIM keys by the A-label form, whichever the client used.
    ingress = await make_ingress(
        accounts={ACCOUNT: AccountConfig(password_hash=password_hash(), domains=["bücher.test"])}
    )

    async def send() -> int:
        smtp = aiosmtplib.SMTP(
            hostname=ingress.smtp_address[0], port=ingress.smtp_address[1], start_tls=False
        )
        await smtp.connect()
        try:
            await smtp.login(ACCOUNT, PASSWORD)
            await smtp.mail("news@bücher.test", options=["SMTPUTF8"], encoding="utf-8")
            await smtp.rcpt("someone@alpha.test")
            data = "From: <news@bücher.test>\r\nSubject: hi\r\n\r\nbody\r\n".encode()
            return (await smtp.data(data)).code
        finally:
            smtp.close()

    assert await send() == 250
    [env] = await queued(ingress.config.nats.url)
    assert env.sender == "news@bücher.test" and env.sender_domain == "xn--bcher-kva.test"
