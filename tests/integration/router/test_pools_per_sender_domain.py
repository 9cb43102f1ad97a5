"""Dedicated IP pools per sender domain: each domain's mail leaves only from its pool's IPs,
whatever pool a message asks for; an allowed X-Relais-Pool moves shared-domain mail."""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from services.core.config import PoolConfig, SourceConfig
from tests.integration.router.conftest import BRAND_DOMAIN, account, asubmit_many
from tests.support.relais import ACCOUNT, PASSWORD, SENDER_DOMAIN, message, wait_for_events

SHARED = {"127.0.0.11", "127.0.0.12"}
BRAND = {"127.0.0.13", "127.0.0.14"}
BULK = {"127.0.0.15"}


def _pools() -> dict[str, PoolConfig]:
    def pool(ips: set[str]) -> PoolConfig:
        return PoolConfig(
            sources=[
                SourceConfig(address=ip, ehlo=f"out-{ip.rsplit('.', 1)[1]}.relais.test") for ip in sorted(ips)
            ]
        )

    return {"default": PoolConfig(), "shared": pool(SHARED), "brand": pool(BRAND), "bulk": pool(BULK)}


def _msg(domain: str, i: int, pool: str | None = None) -> tuple[str, list[str], bytes]:
    sender = f"news@{domain}"
    data = message(subject=f"{domain} {i}", sender=sender)
    if pool:
        data = f"X-Relais-Pool: {pool}\r\n".encode() + data
    return sender, ["a@alpha.test", "b@beta.test"], data


async def test_each_sender_domain_leaves_only_from_its_pool(make_stack, make_sink) -> None:
    stack = await make_stack(
        pools=_pools(), accounts=account("shared", pools=["bulk"]), sender_domains={BRAND_DOMAIN: "brand"}
    )
    alpha, beta = make_sink("127.0.0.2"), make_sink("127.0.0.3")
    batch = [_msg(SENDER_DOMAIN, i) for i in range(10)] + [_msg(BRAND_DOMAIN, i) for i in range(10)]
    # The brand domain asks for the bulk pool (which the account may use): its dedicated pool wins.
    batch += [_msg(BRAND_DOMAIN, i, pool="bulk") for i in range(10, 15)]
    batch += [_msg(SENDER_DOMAIN, i, pool="bulk") for i in range(10, 15)]
    await asubmit_many(stack.smtp_address, batch)
    received = await alpha.async_wait_for(30) + await beta.async_wait_for(30)

    def peers(domain: str, bulk: bool) -> set[str]:
        return {
            m.peer[0]
            for m in received
            if m.mail_from == f"news@{domain}" and (int(m.parsed()["Subject"].split()[1]) >= 10) == bulk
        }

    assert peers(BRAND_DOMAIN, bulk=False) <= BRAND and peers(BRAND_DOMAIN, bulk=True) <= BRAND
    assert peers(SENDER_DOMAIN, bulk=False) <= SHARED
    assert peers(SENDER_DOMAIN, bulk=True) == BULK
    assert len(peers(BRAND_DOMAIN, bulk=False)) == 2, "both brand IPs carry brand mail"
    brand_helos = {m.helo for m in received if m.mail_from == f"news@{BRAND_DOMAIN}"}
    assert brand_helos == {"out-13.relais.test", "out-14.relais.test"}, "EHLO matches the source"
    delivered = await wait_for_events(stack.config.nats.url, "delivered", 60)
    assert {e.pool for e in delivered if e.sender == f"news@{BRAND_DOMAIN}"} == {"brand"}


def _send_refused(address: tuple[str, int], mail: tuple[str, list[str], bytes]) -> int:
    with smtplib.SMTP(*address, timeout=30) as client:
        client.login(ACCOUNT, PASSWORD)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(*mail)
    return refused.value.smtp_code


async def test_a_pool_the_account_may_not_use_is_refused(make_stack, make_sink) -> None:
    stack = await make_stack(pools=_pools(), accounts=account("shared"))
    code = await asyncio.to_thread(_send_refused, stack.smtp_address, _msg(SENDER_DOMAIN, 0, pool="bulk"))
    assert code == 550
