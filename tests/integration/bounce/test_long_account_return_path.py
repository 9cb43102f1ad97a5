"""An account with a long name (up to 63 characters are allowed) gets a VERP return path whose
local part fits the 64 octets of RFC 5321: a longer one is refused by receivers that check, our
own inbound listener among them, so the bounce never came back. The bounce to it, over SMTP to
the inbound listener, still names the account and message, whether the account is in the
config file or was added to the account records later (`relais account add`)."""

from __future__ import annotations

import asyncio
import smtplib
import time

import nats

from services.core.config import AccountConfig
from services.ingress.accounts import put_account
from tests.integration.bounce.conftest import (
    RETURN_DOMAIN,
    bounce_over_smtp,
    stack_with_inbound_listener,
    suppression_entry,
)
from tests.support.relais import (
    ACCOUNT,
    SENDER_DOMAIN,
    asubmit,
    message,
    password_hash,
    submit,
    wait_for_events,
)

LONG = "northwind-traders-transactional-mail-eu1"  # 40 characters
LATER = "contoso-pharmaceuticals-patient-notices-nl"  # 42, added with `relais account add`


def sender() -> AccountConfig:
    return AccountConfig(password_hash=password_hash(), domains=[SENDER_DOMAIN], pool="default")


async def assert_bounce_counts_for(url: str, account: str, delivered_id: str, recipient: str) -> None:
    (bounced,) = await wait_for_events(url, "bounced", 1, account=account)
    assert (bounced.account, bounced.message_id, bounced.recipients) == (account, delivered_id, [recipient])
    entry = await suppression_entry(url, account, recipient)
    assert entry is not None and entry.source == delivered_id


def local_part(address: str) -> str:
    return address.rpartition("@")[0]


async def test_a_long_account_name_gets_a_return_path_its_bounces_come_back_to(make_stack, make_sink) -> None:
    accounts = {ACCOUNT: sender(), LONG: sender()}
    stack, inbound = await stack_with_inbound_listener(make_stack, accounts=accounts)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    reply = await asubmit(stack.smtp_address, user=LONG, recipients=["gone@alpha.test"], data=message())
    assert reply[0] == 250
    (sent,) = await sink.async_wait_for(1)
    assert sent.mail_from.endswith(f"@{RETURN_DOMAIN}")
    assert len(local_part(sent.mail_from).encode()) <= 64, sent.mail_from
    (delivered,) = await wait_for_events(url, "delivered", 1, account=LONG)

    await bounce_over_smtp(inbound, sent.mail_from, "gone@alpha.test")
    await assert_bounce_counts_for(url, LONG, delivered.message_id, "gone@alpha.test")
    assert await suppression_entry(url, ACCOUNT, "gone@alpha.test") is None, "only its own account's list"


async def submit_once_known(address: tuple[str, int], user: str, recipients: list[str]) -> int:
    """Submit as an account just written to KV, once the ingress's watch has it."""
    deadline = time.monotonic() + 20
    while True:
        try:
            reply = await asyncio.to_thread(submit, address, user=user, recipients=recipients, data=message())
            return reply[0]
        except smtplib.SMTPAuthenticationError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_an_account_added_to_the_records_later_is_found_from_its_bounce(make_stack, make_sink) -> None:
    stack, inbound = await stack_with_inbound_listener(make_stack, accounts={ACCOUNT: sender()})
    url = stack.config.nats.url
    nc = await nats.connect(url)
    try:
        await put_account(nc.jetstream(), LATER, sender())  # what `relais account add` writes
    finally:
        await nc.close()
    sink = make_sink("127.0.0.3")
    assert await submit_once_known(stack.smtp_address, LATER, ["gone@beta.test"]) == 250
    (sent,) = await sink.async_wait_for(1)
    assert len(local_part(sent.mail_from).encode()) <= 64, sent.mail_from
    (delivered,) = await wait_for_events(url, "delivered", 1, account=LATER)

    await bounce_over_smtp(inbound, sent.mail_from, "gone@beta.test")
    await assert_bounce_counts_for(url, LATER, delivered.message_id, "gone@beta.test")
