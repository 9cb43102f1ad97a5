"""An inbound (port 25) client that leaves once it has sent a message's final dot, while the
ingress is still storing the message: the hand-off goes on to its end, as a submission's does
(test_quota_client_leaves_during_handoff), so a body is never left in the Object Store without
the envelope that refers to it.

A body over `nats.inline_body_max` is stored first, then its envelope is published to
relais.inbound. Before, the client's leaving (a reset, or a TLS close: both cancel the session)
cut the hand-off between the two: the body stayed for the body TTL (`retry.max_age` plus two
days) with no envelope for the bounce service to read and discard it, nor discarded as a
refused message's body is. Anyone who can reach port 25 could leave such bodies at will.

The client, the ingress and nats-server are real. Only the moment is arranged: the body's store
is held, after JetStream acknowledged it, until the ingress has seen the client go.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.core.envelope import BodyRef
from services.ingress.service import IngressService
from tests.integration.ingress.helpers import (
    INBOUND_TO_DATA,
    client,
    free_listen,
    hold_data,
    in_thread,
    inbound_message,
    listener,
    queued_inbound,
    tls_sections,
)
from tests.integration.ingress.test_quota_client_leaves_during_handoff import (
    HeldStep,
    _reset,
    _stuffed,
    leave_while_held,
)
from tests.support.certs import TestPKI
from tests.support.relais import stored_bodies

LOCAL = "bounces.relais.test"
INLINE_MAX = 4096
# Well over INLINE_MAX: the body goes to the Object Store before the envelope is published.
OCTETS = 20_000


def hold_body(service: IngressService, held: HeldStep) -> None:
    """Hold the hand-off once the message's body is in the Object Store."""
    bodies = service._handoff._bodies
    real = bodies.put

    async def put(message_id: str, data: bytes) -> BodyRef:
        ref = await real(message_id, data)
        await held.hold()
        return ref

    bodies.put = put  # type: ignore[method-assign]


def _over_tls_to_final_dot(address: tuple[str, int], pki: TestPKI) -> smtplib.SMTP:
    smtp = client(address, pki=pki, starttls=True)
    smtp.mail("")
    smtp.rcpt("postmaster")
    code, _ = smtp.docmd("DATA")
    assert code == 354
    smtp.send(_stuffed(inbound_message(OCTETS)))
    return smtp


@pytest.mark.parametrize("leaving", ["reset", "tls-close"])
async def test_an_inbound_message_whose_client_left_during_the_hand_off_is_queued_with_its_body(
    make_ingress: Callable[..., Any], pki: TestPKI, leaving: str
) -> None:
    over_tls = leaving == "tls-close"
    listen = free_listen()
    ingress: dict[str, Any] = {
        "local_domains": [LOCAL],
        "listeners": [ListenerConfig(listen=listen, mode="inbound")],
    }
    stack = await make_ingress(
        ingress=tls_sections(pki, **ingress) if over_tls else ingress,
        nats={"inline_body_max": INLINE_MAX},
    )
    service: IngressService = stack.ingress
    address = listener(stack, listen)
    held = HeldStep()
    hold_body(service, held)

    if over_tls:
        smtp = await in_thread(_over_tls_to_final_dot, address, pki)
        leave: Callable[[], None] = smtp.close
    else:
        sock = await in_thread(hold_data, address, _stuffed(inbound_message(OCTETS)), INBOUND_TO_DATA)
        leave = lambda: _reset(sock)  # noqa: E731
    await leave_while_held(service, held, leave)

    url = stack.config.nats.url
    envelopes = await queued_inbound(url)
    assert len(envelopes) == 1, "the body was stored, its envelope never published"
    [env] = envelopes
    assert env.kind == "inbound" and env.body.object_name == env.id
    assert await stored_bodies(url) == 1  # the envelope's own, and no other
