"""The events stream is bounded in bytes (`nats.events_max_bytes`) as well as in age: past the cap
its oldest events go. Bounded by age alone, a bulk sender's events (about 2 KB per message, for
7 days) filled the JetStream file store the mail queues share, and a full store refuses every
write: the ingress answered 451 to all mail."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.admin.history import message_events
from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig, load_config
from services.core.embedded import EmbeddedNats
from services.core.envelope import BodyRef, Envelope, new_message_id
from services.core.events import event_for, publish_event
from services.core.topology import EVENTS_STREAM, SUBMIT_STREAM, ensure_topology, submit_subject
from services.up import LAPTOP_EVENTS_MAX_BYTES, service_env, write_default_config

CAP = 1024 * 1024  # the smallest cap `relais validate` takes
# A message to 40 recipients: its `accepted` event lists them all, about 2.5 KB stored.
RECIPIENTS = tuple(f"subscriber-{i:04d}@customers.example.net" for i in range(40))
BODY = b"Subject: weekly news\r\n\r\n" + b"Lorem ipsum dolor sit amet.\r\n" * 30
SHIPPED_NATS_CONF = Path(__file__).parents[2] / "deploy" / "k8s" / "base" / "nats.conf"


@pytest.fixture
def store_limited_nats(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedNats]:
    """A nats-server whose file store is limited, as `max_file_store` in the shipped nats.conf
    limits each server's."""
    server = EmbeddedNats(
        store_dir=tmp_path / "nats", log_file=tmp_path / "nats-server.log", max_file_store=request.param
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _message() -> Envelope:
    return Envelope(
        id=new_message_id(),
        sender="news@acme.example.com",
        recipients=RECIPIENTS,
        account="acme",
        sender_domain="acme.example.com",
        body=BodyRef(size=len(BODY), inline=BODY),
    )


async def _accept(bus: Bus, message: Envelope) -> int:
    """Publish a message's `accepted` event as the ingress does; its size in bytes."""
    event = event_for("accepted", message, message.recipients)
    await publish_event(bus, event, msg_id=f"acc-{message.id}", record=False)
    return len(event.to_json())


async def _accept_until(bus: Bus, total: int) -> list[Envelope]:
    """Messages whose `accepted` events add up to more than `total` bytes, oldest first."""
    messages: list[Envelope] = []
    published = 0
    while published <= total:
        messages.append(_message())
        published += await _accept(bus, messages[-1])
    return messages


async def test_the_oldest_events_go_once_the_stream_holds_its_cap(nats_server: EmbeddedNats) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url, events_max_bytes=CAP))
    bus = await connect(config.nats, "test-events-cap")
    try:
        await ensure_topology(bus.js, config)

        messages = await _accept_until(bus, 3 * CAP)

        info = await bus.js.stream_info(EVENTS_STREAM)
        assert info.config.max_bytes == CAP
        assert info.state.bytes <= CAP, f"{info.state.bytes} bytes of events kept"
        assert info.state.last_seq == len(messages), "every event was taken"
        assert info.state.first_seq > 1, "the oldest events made room"
        # What `relais message` shows: the newest messages' history, no longer the oldest's.
        assert [e.kind for e in await message_events(bus.js, messages[-1].id)] == ["accepted"]
        assert await message_events(bus.js, messages[0].id) == []
    finally:
        await bus.close()


async def test_declaring_the_cap_trims_a_stream_an_earlier_release_let_grow(
    nats_server: EmbeddedNats,
) -> None:
    # Every service declares the topology at start, updating the streams an earlier release made.
    age_only = Config(nats=NatsConfig(url=nats_server.url, events_max_bytes=0))
    capped = Config(nats=NatsConfig(url=nats_server.url, events_max_bytes=CAP))
    bus = await connect(age_only.nats, "test-events-cap")
    try:
        await ensure_topology(bus.js, age_only)
        messages = await _accept_until(bus, 3 * CAP)
        before = await bus.js.stream_info(EVENTS_STREAM)
        assert before.config.max_bytes == -1 and before.state.bytes > 2 * CAP

        await ensure_topology(bus.js, capped)
        await ensure_topology(bus.js, capped)  # the next service to start declares it again

        after = await bus.js.stream_info(EVENTS_STREAM)
        assert after.config.max_bytes == CAP
        assert after.state.bytes <= CAP, f"{after.state.bytes} bytes of events kept"
        assert after.state.first_seq > before.state.first_seq, "the oldest events went"
        assert after.state.last_seq == before.state.last_seq, "the newest events stayed"
        assert [e.kind for e in await message_events(bus.js, messages[-1].id)] == ["accepted"]
    finally:
        await bus.close()


@pytest.mark.parametrize("store_limited_nats", ["3M"], indirect=True)
async def test_mail_is_still_taken_while_events_overflow_a_small_store(
    store_limited_nats: EmbeddedNats,
) -> None:
    """The failure at bulk volume, scaled down: events past the store's size. Without the cap
    the store filled and JetStream refused every write, the events' and the mail's alike."""
    config = Config(nats=NatsConfig(url=store_limited_nats.url, events_max_bytes=CAP))
    bus = await connect(config.nats, "test-events-cap")
    try:
        await ensure_topology(bus.js, config)
        published, mail = 0, 0
        while published <= 2 * 3 * 1024 * 1024:  # twice the store, whatever unit its M is
            message = _message()
            published += await _accept(bus, message)
            if published > mail * 64 * 1024:  # a mail per 64 KiB of events: the mail fits the store
                ack = await bus.publish(submit_subject(), message.to_msgpack(), msg_id=message.id)
                assert ack.stream == SUBMIT_STREAM
                mail += 1

        assert (await bus.js.stream_info(SUBMIT_STREAM)).state.messages == mail
        assert (await bus.js.stream_info(EVENTS_STREAM)).state.bytes <= CAP
    finally:
        await bus.close()


async def _cap_after_starts(config: Config, starts: int) -> int:
    """The events stream's cap once `starts` services declared the topology, each at its start
    (`ensure_topology` raises if the server refuses the cap)."""
    bus = await connect(config.nats, "test-events-cap")
    try:
        for _ in range(starts):
            await ensure_topology(bus.js, config)
        return (await bus.js.stream_info(EVENTS_STREAM)).config.max_bytes
    finally:
        await bus.close()


def _shipped_max_file_store() -> str:
    (size,) = re.findall(r"^\s*max_file_store:\s*(\S+)", SHIPPED_NATS_CONF.read_text(), re.MULTILINE)
    return size


@pytest.mark.parametrize("store_limited_nats", [_shipped_max_file_store()], indirect=True)
async def test_the_default_cap_fits_the_shipped_store_on_every_start(
    store_limited_nats: EmbeddedNats,
) -> None:
    """JetStream reserves a stream's max_bytes in each server's store and refuses a stream that
    does not fit; every service declares the stream again at start. Only reserved: nothing is
    written."""
    config = Config(nats=NatsConfig(url=store_limited_nats.url))
    assert await _cap_after_starts(config, 2) == config.nats.events_max_bytes > 0


@pytest.mark.parametrize("store_limited_nats", ["1G"], indirect=True)
async def test_relais_up_starts_on_a_laptop_with_little_free_disk(
    store_limited_nats: EmbeddedNats, tmp_path: Path
) -> None:
    """`relais up`'s nats-server takes 75% of the disk's free space as its store: 1 GB here.
    The 4 GiB default cap does not fit; the cap `relais up` writes does, for every service
    declaring the stream at its start."""
    path, _ = write_default_config(tmp_path / "relais-data", 2525)
    config = load_config(path, env={"RELAIS_NATS__URL": store_limited_nats.url})
    # Router, delivery, bounce and ingress each declare it at start.
    assert await _cap_after_starts(config, 4) == config.nats.events_max_bytes


@pytest.mark.parametrize("store_limited_nats", ["1G"], indirect=True)
async def test_a_cap_over_half_a_single_servers_store_survives_the_next_start(
    store_limited_nats: EmbeddedNats,
) -> None:
    """A single server adding a capped stream that exists already reserves its cap a second
    time, and refused it (10047) once the cap was over half the store: the second service to
    start stopped. The stream is updated instead."""
    config = Config(nats=NatsConfig(url=store_limited_nats.url, events_max_bytes=600 * 1024 * 1024))
    assert await _cap_after_starts(config, 2) == config.nats.events_max_bytes


@pytest.mark.parametrize("store_limited_nats", ["1G"], indirect=True)
async def test_relais_up_caps_the_events_of_a_config_an_earlier_release_generated(
    store_limited_nats: EmbeddedNats, tmp_path: Path
) -> None:
    """`relais up` keeps the config it generated once; an earlier release's has no cap, and the
    4 GiB default did not fit a laptop's store: no service started after the upgrade."""
    path, _ = write_default_config(tmp_path / "relais-data", 2525)
    earlier = re.sub(r"\[nats\]\n(#.*\n)*events_max_bytes = \d+\n\n", "", path.read_text())
    assert "events_max_bytes" not in earlier, "the generated config changed shape"
    path.write_text(earlier)

    env = service_env({}, path, store_limited_nats.url, generated=True)
    config = load_config(str(path), env=env)
    assert await _cap_after_starts(config, 1) == LAPTOP_EVENTS_MAX_BYTES
    # A config of the operator's own keeps what it says (the default, unless it sets one).
    assert "RELAIS_NATS__EVENTS_MAX_BYTES" not in service_env({}, path, "nats://x", generated=False)
