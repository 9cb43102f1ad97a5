"""The inbound listener (port 25, anyone's) has no AUTH: it does not advertise it, and a client
that tries it all the same is told so, before or after STARTTLS, as Postfix tells it where SASL is
off ("503 5.5.1 Error: authentication not enabled"). Neither "535 credentials invalid", which
invites guessing the next password, nor "538 encryption required", which invites sending the
credentials again over TLS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.core.config import ListenerConfig
from services.ingress.replies import AUTH_NOT_ENABLED, AUTH_OK
from tests.integration.ingress.helpers import (
    client,
    free_listen,
    in_thread,
    listener,
    plain,
    reply,
    tls_sections,
)
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, PASSWORD

LOCAL = "bounces.relais.test"


async def test_auth_on_the_inbound_listener_is_not_enabled(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    inbound, plaintext, submission = free_listen(), free_listen(), free_listen()
    stack = await make_ingress(
        ingress=tls_sections(
            pki,
            local_domains=[LOCAL],
            listeners=[
                ListenerConfig(listen=inbound, mode="inbound"),
                ListenerConfig(listen=submission, mode="submission"),
            ],
        )
    )
    # An inbound listener without certificates: no STARTTLS either.
    bare = await make_ingress(
        ingress={"local_domains": [LOCAL], "listeners": [ListenerConfig(listen=plaintext, mode="inbound")]}
    )
    credentials = f"PLAIN {plain(ACCOUNT, PASSWORD)}"

    def scenario() -> list[tuple[int, bytes]]:
        with client(listener(stack, inbound)) as smtp:
            before_tls = [smtp.docmd("AUTH", credentials), smtp.docmd("AUTH", "LOGIN")]
        with client(listener(stack, inbound), pki=pki, starttls=True) as smtp:
            after_tls = [smtp.docmd("AUTH", credentials), smtp.docmd("AUTH", "LOGIN")]
        with client(listener(bare, plaintext)) as smtp:
            without_tls = [smtp.docmd("AUTH", credentials), smtp.docmd("AUTH", "LOGIN")]
        with client(listener(stack, submission), pki=pki, starttls=True) as smtp:
            submitted = [smtp.docmd("AUTH", credentials)]  # where AUTH is offered, it works
        return before_tls + after_tls + without_tls + submitted

    answers = await in_thread(scenario)
    assert answers == [reply(AUTH_NOT_ENABLED)] * 6 + [reply(AUTH_OK)]
