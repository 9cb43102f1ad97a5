"""A receiver that stays down is tried less and less often, also while its account's mail keeps
flowing: each new event arrives with a delivery count of 1, and was posted at the base delay,
so a dead receiver of a busy account got a POST every few seconds for as long as it was down."""

from __future__ import annotations

from services.bounce.webhooks import WebhookDispatcher
from services.core.bus import Bus
from services.core.config import AccountConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats, free_port
from services.core.events import event_for, publish_event
from services.core.topology import EVENTS_STREAM, ensure_topology, webhooks_binding
from tests.support.relais import an_envelope


async def test_consecutive_failures_back_off_though_each_event_is_new(
    nats_server: EmbeddedNats, topology_bus: Bus
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    hooked = AccountConfig(password_hash="-", webhook_url=dead, webhook_secret="s" * 16)
    config = Config(nats=NatsConfig(url=nats_server.url), accounts={"acme": hooked})
    await ensure_topology(topology_bus.js, config)
    sub = await topology_bus.js.pull_subscribe_bind(webhooks_binding("acme").durable, EVENTS_STREAM)
    dispatcher = WebhookDispatcher(config, topology_bus)
    base = config.bounce.webhook_retry_base

    delays = []
    for _ in range(3):
        await publish_event(topology_bus, event_for("delivered", an_envelope(), ["a@alpha.test"]))
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.metadata.num_delivered == 1  # a new event every time
        delays.append(await dispatcher.deliver("acme", [msg]))

    assert delays == [base, 2 * base, 4 * base]
