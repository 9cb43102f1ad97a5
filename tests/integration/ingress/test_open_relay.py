"""Security regression: Relais is never an open relay, whatever addressing trick is tried."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.ingress.replies import AUTH_REQUIRED
from tests.integration.ingress.helpers import client, free_listen, in_thread, listener, login, queued, reply
from tests.support.relais import message

LOCAL = "bounces.relais.test"
TRICKS = [
    f"victim%alpha.test@{LOCAL}",  # percent hack
    f"alpha.test!victim@{LOCAL}",  # bang path
    f"@{LOCAL}:victim@alpha.test",  # source route
    f"@{LOCAL},@mx.alpha.test:victim@alpha.test",  # multi-hop source route
    f'"victim@alpha.test"@{LOCAL}',  # quoted local part hiding an address
    f'"victim%alpha.test"@{LOCAL}',
    f"victim@alpha.test@{LOCAL}",  # double @
    "postmaster@[127.0.0.2]",  # IP literal
    "postmaster@[IPv6:::1]",
    "victim@alpha.test",  # plain third-party domain
    f"victim@alpha.test.{LOCAL}.evil.test",  # lookalike
]


@pytest.fixture
async def two(make_ingress: Callable[..., Any]) -> tuple[Any, dict[str, str]]:
    names = {"submission": free_listen(), "inbound": free_listen()}
    stack = await make_ingress(
        ingress={
            "local_domains": [LOCAL],
            "listeners": [ListenerConfig(listen=v, mode=k) for k, v in names.items()],
        }
    )
    return stack, names


def _try(address: tuple[str, int], recipient: str, authenticate: bool) -> tuple[tuple[int, bytes], int]:
    with client(address) as smtp:
        if authenticate:
            login(smtp)
        smtp.mail("someone@acme.test" if authenticate else "")
        rcpt = smtp.rcpt(recipient)
        data_code = smtp.docmd("DATA")[0]
        if data_code == 354:
            smtp.send(message() + b"\r\n.\r\n")
            data_code = smtp.getreply()[0]
        return rcpt, data_code


@pytest.mark.parametrize("recipient", TRICKS)
async def test_inbound_listener_refuses_every_trick(two: Any, recipient: str) -> None:
    stack, names = two
    rcpt, data_code = await in_thread(_try, listener(stack, names["inbound"]), recipient, False)
    assert rcpt[0] >= 500, rcpt
    assert data_code == 503  # no valid recipient: nothing can be sent
    assert await queued(stack.config.nats.url) == []


@pytest.mark.parametrize("recipient", [t for t in TRICKS if not t.startswith("victim@alpha.test")])
async def test_authenticated_submission_refuses_routing_tricks(two: Any, recipient: str) -> None:
    stack, names = two
    rcpt, _ = await in_thread(_try, listener(stack, names["submission"]), recipient, True)
    assert rcpt[0] >= 500, rcpt
    assert await queued(stack.config.nats.url) == []


async def test_submission_without_auth_relays_nothing(two: Any) -> None:
    stack, names = two

    def scenario() -> list[tuple[int, bytes]]:
        with client(listener(stack, names["submission"])) as smtp:
            return [smtp.mail(sender) for sender in ("", "news@acme.test", f"x@{LOCAL}")]

    assert await in_thread(scenario) == [reply(AUTH_REQUIRED)] * 3
    assert await queued(stack.config.nats.url) == []
