"""Security: a Return-Path found long after its message was sent (a forwarded copy, a mailing
list archive) cannot get its recipient suppressed. The VERP token is dated and believed for
bounce.verp_max_age only; tokens of the release before, which carry no day, are dated by the
arrival time in their message id, so those of recent mail still count across an upgrade."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from services.core.envelope import new_message_id
from services.core.returnpath import verp_address
from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM
from tests.integration.bounce.conftest import (
    RETURN_DOMAIN,
    SECRET,
    VERP,
    publish_inbound,
    suppression_entry,
    wait_consumed,
)
from tests.support.bounce_samples import postfix_dsn
from tests.support.relais import ACCOUNT, asubmit, message, read_events

DAY = 86400.0
LONG_AGO = time.time() - 120 * DAY  # the default bounce.verp_max_age is 30 days


def message_id_of(arrived: float) -> str:
    """An id as `new_message_id()` gives a message that arrived at `arrived`."""
    return f"{int(arrived * 1000):011x}{secrets.token_hex(6)}"


def previous_release_return_path(message_id: str, recipient: str) -> str:
    """A one-recipient return path as the release before signed it: version 1, no day."""
    data = b"\0".join([b"relais-verp-v1", ACCOUNT.encode(), message_id.encode(), recipient.lower().encode()])
    mac = hmac.new(SECRET.encode(), data, hashlib.sha256).digest()[:10]
    raw = bytes([(1 << 6) | 0x20 | len(message_id)]) + int(message_id, 16).to_bytes(12, "big") + mac
    return f"b+{ACCOUNT}.{base64.b32encode(raw).decode().rstrip('=').lower()}@{RETURN_DOMAIN}"


async def bounced_recipients(url: str) -> list[str]:
    return sorted(r for e in await read_events(url) if e.kind == "bounced" for r in e.recipients)


async def test_a_return_path_signed_months_ago_changes_nothing(make_stack, make_sink) -> None:
    stack = await make_stack(bounce=VERP)
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    # Signed by us, with our secret, for a message sent 120 days ago and forwarded since.
    found = verp_address(
        prefix="b",
        domain=RETURN_DOMAIN,
        secret=SECRET,
        account=ACCOUNT,
        message_id=message_id_of(LONG_AGO),
        recipients=["forwarded@alpha.test"],
        now=LONG_AGO,
    )
    await publish_inbound(url, postfix_dsn(to=found, recipient="forwarded@alpha.test"), [found])
    # A message sent now bounces as before: the consumer is alive, and only the age told them apart.
    assert (await asubmit(stack.smtp_address, recipients=["today@alpha.test"], data=message()))[0] == 250
    (sent,) = await sink.async_wait_for(1)
    await publish_inbound(url, postfix_dsn(to=sent.mail_from, recipient="today@alpha.test"), [sent.mail_from])
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)

    assert await bounced_recipients(url) == ["today@alpha.test"]
    assert await suppression_entry(url, ACCOUNT, "forwarded@alpha.test") is None
    assert await suppression_entry(url, ACCOUNT, "today@alpha.test") is not None


async def test_previous_release_return_paths_count_only_while_their_message_is_recent(make_stack) -> None:
    stack = await make_stack(bounce=VERP)
    url = stack.config.nats.url
    # Mail queued before the upgrade bounces after it...
    recent = previous_release_return_path(new_message_id(), "queued@alpha.test")
    # ...but an old Return-Path of that release is as stale as any other.
    old = previous_release_return_path(message_id_of(LONG_AGO), "archived@alpha.test")
    await publish_inbound(url, postfix_dsn(to=old, recipient="archived@alpha.test"), [old])
    await publish_inbound(url, postfix_dsn(to=recent, recipient="queued@alpha.test"), [recent])
    await wait_consumed(url, INBOUND_STREAM, INBOUND_CONSUMER)

    assert await bounced_recipients(url) == ["queued@alpha.test"]
    assert await suppression_entry(url, ACCOUNT, "archived@alpha.test") is None
    assert await suppression_entry(url, ACCOUNT, "queued@alpha.test") is not None
