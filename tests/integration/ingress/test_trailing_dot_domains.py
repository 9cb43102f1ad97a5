"""A domain written with its root's trailing dot (`a@example.com.`) is that domain, as Postfix's
trivial-rewrite takes it: MAIL and RCPT accept it, and everything after (the account's sender
domains, the relay checks, the envelope, duplicate recipients) sees the address without the dot.
The dot changes nothing a check decides: a domain not owned, or not ours on the inbound listener,
is refused as it is without it. Two dots, a lone dot or an empty label stay syntax errors.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.ingress.replies import AUTH_REQUIRED, RELAY_DENIED, SENDER_NOT_OWNED
from tests.integration.ingress.helpers import (
    client,
    free_listen,
    in_thread,
    listener,
    login,
    queued,
    queued_inbound,
    reply,
)
from tests.support.relais import ACCOUNT, RelaisStack, message

LOCAL = "bounces.relais.test"
# What aiosmtpd answers an address it cannot parse (MAIL and RCPT alike), as these forms were
# answered before: the dot is dropped only after a label.
MALFORMED = (553, b"5.1.3 Error: malformed address")
MALFORMED_DOMAINS = ["acme.test..", ".", "acme..test.", "acme..test", ".acme.test."]


@pytest.fixture
async def two(make_ingress: Callable[..., Any]) -> tuple[RelaisStack, dict[str, tuple[str, int]]]:
    """A submission and an inbound listener, with the stack's account (acme.test)."""
    names = {"submission": free_listen(), "inbound": free_listen()}
    stack = await make_ingress(
        ingress={
            "local_domains": [LOCAL],
            "listeners": [ListenerConfig(listen=v, mode=k) for k, v in names.items()],
        }
    )
    return stack, {mode: listener(stack, listen) for mode, listen in names.items()}


def _send(address: tuple[str, int], sender: str, recipients: list[str]) -> list[tuple[int, bytes]]:
    """An authenticated transaction: the replies to MAIL, each RCPT and (when reached) DATA."""
    with client(address) as smtp:
        login(smtp)
        replies = [smtp.mail(sender)]
        if replies[0][0] != 250:
            return replies
        replies += [smtp.rcpt(rcpt) for rcpt in recipients]
        if any(code == 250 for code, _ in replies[1:]):
            replies.append(smtp.data(message()))
        return replies


def _mail(address: tuple[str, int], sender: str, *, authenticate: bool = True) -> tuple[int, bytes]:
    with client(address) as smtp:
        if authenticate:
            login(smtp)
        return smtp.mail(sender)


def _rcpt(address: tuple[str, int], recipient: str, *, authenticate: bool = True) -> tuple[int, bytes]:
    with client(address) as smtp:
        if authenticate:
            login(smtp)
        smtp.mail("news@acme.test" if authenticate else "")
        return smtp.rcpt(recipient)


async def test_owned_sender_and_recipients_are_taken_without_the_dot(two: Any) -> None:
    stack, address = two
    replies = await in_thread(
        _send, address["submission"], "news@acme.test.", ["a@alpha.test.", "a@alpha.test", "b@Beta.Test."]
    )
    assert [code for code, _ in replies] == [250, 250, 250, 250, 250], replies
    [env] = await queued(stack.config.nats.url)
    assert env.account == ACCOUNT
    assert env.sender == "news@acme.test" and env.sender_domain == "acme.test"
    # One mailbox however it was spelt: delivered (and counted) once.
    assert list(env.recipients) == ["a@alpha.test", "b@Beta.Test"]


async def test_without_angle_brackets_too(two: Any) -> None:
    # Lenient clients send bare addresses; aiosmtpd and Postfix take them, dot or no dot.
    stack, address = two

    def deliver() -> tuple[int, bytes]:
        with client(address["submission"]) as smtp:
            login(smtp)
            assert smtp.docmd("MAIL FROM:news@acme.test.")[0] == 250
            assert smtp.docmd("RCPT TO:a@alpha.test.")[0] == 250
            return smtp.data(message())

    def not_owned() -> tuple[int, bytes]:
        with client(address["submission"]) as smtp:
            login(smtp)
            return smtp.docmd("MAIL FROM:ceo@paypal.test.")

    assert (await in_thread(deliver))[0] == 250
    [env] = await queued(stack.config.nats.url)
    assert env.sender == "news@acme.test" and list(env.recipients) == ["a@alpha.test"]
    assert await in_thread(not_owned) == reply(SENDER_NOT_OWNED)


async def test_a_domain_not_owned_is_refused_as_without_the_dot(two: Any) -> None:
    stack, address = two
    assert await in_thread(_mail, address["submission"], "ceo@paypal.test.") == reply(SENDER_NOT_OWNED)
    # A subdomain of an owned domain is not owned either, dot or no dot.
    assert await in_thread(_mail, address["submission"], "news@mail.acme.test.") == reply(SENDER_NOT_OWNED)
    assert await queued(stack.config.nats.url) == []


async def test_no_relaying_through_the_dot(two: Any) -> None:
    stack, address = two
    # Without AUTH, submission takes no sender at all.
    assert await in_thread(_mail, address["submission"], "news@acme.test.", authenticate=False) == reply(
        AUTH_REQUIRED
    )
    # The inbound listener takes mail for our own domains only.
    for recipient in ("victim@alpha.test.", f"victim@alpha.test.{LOCAL}.evil.test."):
        refused = await in_thread(_rcpt, address["inbound"], recipient, authenticate=False)
        assert refused == reply(RELAY_DENIED)
    assert await queued_inbound(stack.config.nats.url) == []


async def test_our_own_domain_with_the_dot_is_delivered_inbound(two: Any) -> None:
    stack, address = two

    def scenario() -> tuple[int, bytes]:
        with client(address["inbound"]) as smtp:
            smtp.mail("")
            assert smtp.rcpt(f"bounce@{LOCAL}.")[0] == 250
            return smtp.data(message())

    assert (await in_thread(scenario))[0] == 250
    [env] = await queued_inbound(stack.config.nats.url)
    assert list(env.recipients) == [f"bounce@{LOCAL}"]


@pytest.mark.parametrize("domain", MALFORMED_DOMAINS)
async def test_malformed_sender_domains_stay_syntax_errors(two: Any, domain: str) -> None:
    _, address = two
    assert await in_thread(_mail, address["submission"], f"news@{domain}") == MALFORMED


@pytest.mark.parametrize("domain", MALFORMED_DOMAINS)
async def test_malformed_recipient_domains_stay_syntax_errors(two: Any, domain: str) -> None:
    stack, address = two
    assert await in_thread(_rcpt, address["submission"], f"a@{domain}") == MALFORMED
    assert await in_thread(_rcpt, address["inbound"], f"a@{domain}", authenticate=False) == MALFORMED
    assert await queued(stack.config.nats.url) == []


def test_smtplib_sends_the_address_as_written() -> None:
    # The scenarios above rely on it: smtplib puts the address between <> unchanged.
    assert smtplib.quoteaddr("a@example.com.") == "<a@example.com.>"
