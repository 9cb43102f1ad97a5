"""The webhooks consumers against a real JetStream: one per account with a webhook, filtered on
its events, starting at the end of the events stream when created. Any service creates the
missing ones and nobody deletes one (NATS does, after `events_max_age` without a pull). An
earlier release's shared consumer is replaced without skipping an event it had not posted."""

from __future__ import annotations

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.core.bus import Bus, connect
from services.core.config import AccountConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import (
    EVENTS_STREAM,
    LEGACY_WEBHOOKS_CONSUMER,
    WEBHOOKS_CONSUMER_PREFIX,
    ensure_topology,
    ensure_webhooks_consumers,
    event_subject,
)

HOOK = AccountConfig(password_hash="-", webhook_url="http://127.0.0.1:9/hook", webhook_secret="s" * 16)
PLAIN = AccountConfig(password_hash="-")


def config_with(url: str, **accounts: AccountConfig) -> Config:
    return Config(nats=NatsConfig(url=url), accounts=dict(accounts))


async def webhook_consumers(bus: Bus) -> list[str]:
    names = [info.name for info in await bus.js.consumers_info(EVENTS_STREAM)]
    return sorted(n for n in names if n.startswith(WEBHOOKS_CONSUMER_PREFIX) or n == LEGACY_WEBHOOKS_CONSUMER)


async def pending_subjects(bus: Bus, durable: str, *, ack: bool = False) -> list[str]:
    sub = await bus.js.pull_subscribe_bind(durable, EVENTS_STREAM)
    try:
        msgs = await sub.fetch(100, timeout=1.0)
    except TimeoutError:
        msgs = []
    finally:
        if ack:
            for msg in msgs:
                await msg.ack_sync()
        await sub.unsubscribe()
    return [m.subject for m in msgs]


async def test_a_consumer_per_account_with_a_webhook(nats_server: EmbeddedNats) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-webhooks-consumer")
    url = nats_server.url
    try:
        await ensure_topology(bus.js, config_with(url, plain=PLAIN))
        assert await webhook_consumers(bus) == []

        # Events from before the webhook existed are not posted to it.
        await bus.js.publish(event_subject("hooked", "accepted"), b"{}")
        await ensure_topology(bus.js, config_with(url, plain=PLAIN, hooked=HOOK))
        assert await webhook_consumers(bus) == ["webhooks-hooked"]
        info = await bus.js.consumer_info(EVENTS_STREAM, "webhooks-hooked")
        assert info.config.filter_subject == "relais.events.hooked.*"
        assert info.config.deliver_policy == DeliverPolicy.NEW

        await bus.js.publish(event_subject("plain", "delivered"), b"{}")
        await bus.js.publish(event_subject("hooked", "delivered"), b"{}")
        assert await pending_subjects(bus, "webhooks-hooked", ack=True) == ["relais.events.hooked.delivered"]

        # A service whose configuration lacks the webhook (say, a bounce replica restarted with
        # the previous one during a rollout) leaves the consumer and its events alone: deleting
        # it lost the events until a current replica made it again, every minute of the rollout.
        await ensure_topology(bus.js, config_with(url, plain=PLAIN))
        await ensure_webhooks_consumers(bus.js, config_with(url, plain=PLAIN), reconcile=True)
        assert await webhook_consumers(bus) == ["webhooks-hooked"]
        await bus.js.publish(event_subject("hooked", "bounced"), b"{}")
        await ensure_webhooks_consumers(bus.js, config_with(url, hooked=HOOK), reconcile=True)
        assert await pending_subjects(bus, "webhooks-hooked") == ["relais.events.hooked.bounced"]
        # NATS removes it once nobody has pulled from it for as long as events are kept.
        assert info.config.inactive_threshold == Config().nats.events_max_age
    finally:
        await bus.close()


async def test_a_consumer_of_the_previous_release_gets_its_idle_limit(nats_server: EmbeddedNats) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-webhooks-consumer")
    try:
        await ensure_topology(bus.js, config_with(nats_server.url))
        await bus.js.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name="webhooks-hooked",
                filter_subject="relais.events.hooked.*",
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
            ),
        )
        await bus.js.publish(event_subject("hooked", "accepted"), b"{}")
        await ensure_topology(bus.js, config_with(nats_server.url, hooked=HOOK))
        info = await bus.js.consumer_info(EVENTS_STREAM, "webhooks-hooked")
        assert info.config.inactive_threshold == Config().nats.events_max_age
        assert await pending_subjects(bus, "webhooks-hooked") == ["relais.events.hooked.accepted"]
    finally:
        await bus.close()


@pytest.mark.parametrize("legacy_filter", [["relais.events.>"], ["relais.events.hooked.*"]])
async def test_the_shared_consumer_of_an_earlier_release_is_replaced_without_a_gap(
    nats_server: EmbeddedNats, legacy_filter: list[str]
) -> None:
    bus = await connect(NatsConfig(url=nats_server.url), "test-webhooks-consumer")
    try:
        await ensure_topology(bus.js, config_with(nats_server.url))
        await bus.js.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name=LEGACY_WEBHOOKS_CONSUMER,
                filter_subjects=legacy_filter,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
            ),
        )
        await bus.js.publish(event_subject("hooked", "accepted"), b"{}")
        posted = await pending_subjects(bus, LEGACY_WEBHOOKS_CONSUMER, ack=True)
        assert posted == ["relais.events.hooked.accepted"]  # the earlier release posted it
        await bus.js.publish(event_subject("plain", "delivered"), b"{}")
        await bus.js.publish(event_subject("hooked", "delivered"), b"{}")  # not yet posted

        config = config_with(nats_server.url, plain=PLAIN, hooked=HOOK)
        # A service of the new release started before the bounce service leaves both alone:
        # the earlier release's bounce replicas still post through the shared consumer.
        await ensure_topology(bus.js, config)
        assert await webhook_consumers(bus) == [LEGACY_WEBHOOKS_CONSUMER]
        await ensure_webhooks_consumers(bus.js, config, reconcile=True)
        assert await webhook_consumers(bus) == ["webhooks-hooked"], "the shared one is gone"
        assert await pending_subjects(bus, "webhooks-hooked") == ["relais.events.hooked.delivered"]
        with pytest.raises(NotFoundError):
            await bus.js.consumer_info(EVENTS_STREAM, LEGACY_WEBHOOKS_CONSUMER)
    finally:
        await bus.close()


async def test_a_consumer_without_an_idle_limit_is_left_as_it_is(nats_server: EmbeddedNats) -> None:
    # events_max_age 0 (keep events for ever): the server reads the limit back as absent, which
    # must not count as a difference to write again at every start and every minute.
    bus = await connect(NatsConfig(url=nats_server.url), "test-webhooks-consumer")
    try:
        forever = Config(nats=NatsConfig(url=nats_server.url, events_max_age=0), accounts={"hooked": HOOK})
        await ensure_topology(bus.js, forever)
        writes = []
        add_consumer = bus.js.add_consumer

        async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            writes.append(args)
            return await add_consumer(*args, **kwargs)

        bus.js.add_consumer = counted  # type: ignore[method-assign]
        await ensure_webhooks_consumers(bus.js, forever, reconcile=True)
        await ensure_webhooks_consumers(bus.js, forever, reconcile=True)
        assert writes == []
    finally:
        await bus.close()
