"""`relais up` stopped while delivery waits for the reply to a message's final dot (mx mode, a
slow receiving server). The first Ctrl-C lets each service finish its work for as long as its
own drain can take, the figure its Kubernetes grace period is sized by: a fixed 10 s used to
kill delivery in that wait, leaving the job unacked, to be delivered a second time at the next
start. A second Ctrl-C kills what is left at once (as `postfix abort`), and `relais up` then
exits 1, as it does whenever a service had to be killed.

The receiving server is an aiosmtpd sink on loopback whose reply to the final dot is held back;
its MX comes from a DNS server on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from services.core.config import Config, load_config
from services.core.embedded import EmbeddedNats, free_port
from services.core.health import split_listen
from services.core.topology import DELIVER_STREAM, delivery_binding
from services.delivery import draining
from tests.integration.test_relais_up import alive, started_by
from tests.integration.test_up_lifecycle import leaving_nothing_running, wait_until_up
from tests.support.dns_server import DNSServer
from tests.support.relais import config_to_toml, make_config, message, relais_up, submit
from tests.support.smtp_sink import SMTPSink

MX_HOST = "127.0.0.61"
RECIPIENT = "someone@slow.test"
# Long enough that delivery is told to stop while the reply is due (the ingress and the router
# stop before it, a second or so each), short enough for a test.
REPLY_DELAY = 5.0
# Past the 10 s `relais up` used to give each service, plus the stops of the two before delivery.
PAST_THE_OLD_WAIT = 13.0


@dataclass
class SlowMX:
    sink: SMTPSink
    config: Config
    config_path: Path
    data: Path
    log: Path


@pytest.fixture
def slow_mx(tmp_path: Path) -> Iterator[SlowMX]:
    data = tmp_path / "relais-data"
    port = free_port(MX_HOST)
    with DNSServer() as zone, SMTPSink(MX_HOST, port) as sink:
        zone.add("slow.test", "MX", "10 mx.slow.test.")
        zone.add("mx.slow.test", "A", MX_HOST)
        config = make_config(
            nats_url="nats://127.0.0.1:4222",  # `relais up` points the services at its own server
            dns_port=zone.port,
            smtp_port=port,
            data_dir=str(data),
            delivery={"data_done_timeout": 30.0, "mta_sts": False},
        )
        # In the data dir, so that `started_by` knows the services by their RELAIS_CONFIG.
        data.mkdir()
        config_path = data / "relais.toml"
        config_path.write_text(config_to_toml(config))
        loaded = load_config(str(config_path), {})
        with leaving_nothing_running(data):
            yield SlowMX(sink, loaded, config_path, data, tmp_path / "relais-up.log")


def _service_pid(data: Path, name: str) -> int:
    (pid,) = [
        pid
        for pid in started_by(data)
        if f"services.cli\0{name}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    return pid


def _stopped_at(data: Path, name: str) -> float:
    """When a service logged that it stopped (it drained its work, then closed down)."""
    for line in (data / "logs" / f"{name}.log").read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}  # a traceback's lines are not
        if entry.get("msg") == f"relais {name} stopped":
            return float(entry["ts"])
    raise AssertionError(f"the {name} did not stop by itself")


def _send_and_wait_for_the_dot(mx: SlowMX) -> None:
    code, reply = submit(split_listen(mx.config.ingress.listen), recipients=[RECIPIENT], data=message())
    assert code == 250, reply
    deadline = time.monotonic() + 30
    while mx.sink.data_commands == 0:  # counted once the final dot is in
        assert time.monotonic() < deadline, f"no final dot at the sink: {mx.log.read_text()}"
        time.sleep(0.05)


def _interrupted_twice_on_leaving(proc: subprocess.Popen[bytes]) -> None:
    """A failed test's `relais up` is not left waiting out delivery's drain."""
    for _ in range(2):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)


async def _delivery_consumer_after_a_restart(data: Path) -> tuple[int, int, int]:
    """(delivered, pending, waiting for an ack) of the pool's delivery consumer, read from the
    store by a nats-server started on it again."""
    server = EmbeddedNats(store_dir=data / "nats", port=free_port())
    server.start()
    try:
        nc = await nats.connect(server.url)
        try:
            binding = delivery_binding("default")
            info = await nc.jetstream().consumer_info(DELIVER_STREAM, binding.durable)
            return info.delivered.stream_seq or 0, info.num_pending or 0, info.num_ack_pending or 0
        finally:
            await nc.close()
    finally:
        server.stop()


def test_a_reply_due_at_ctrl_c_is_waited_for_and_its_job_acked(slow_mx: SlowMX) -> None:
    mx = slow_mx
    mx.sink.delay_data = REPLY_DELAY
    with relais_up(mx.data, free_port(), mx.log.parent, mx.config_path) as proc:
        try:
            wait_until_up(proc, mx.log)
            _send_and_wait_for_the_dot(mx)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, mx.log.read_text()
        finally:
            _interrupted_twice_on_leaving(proc)
    said = mx.log.read_text()
    # What it waits for delivery is the drain its grace period is sized by, from this config.
    assert f"delivery (up to {draining.stop_seconds(mx.config):.0f} s)" in said, said
    assert len(mx.sink.messages) == 1 and mx.sink.data_commands == 1, "delivered once"
    # Delivery is told to stop once the router has stopped: the reply was due by then.
    assert _stopped_at(mx.data, "router") < mx.sink.messages[0].received_at
    assert _stopped_at(mx.data, "delivery") > mx.sink.messages[0].received_at
    delivered, pending, unacked = asyncio.run(_delivery_consumer_after_a_restart(mx.data))
    assert (delivered, pending, unacked) == (1, 0, 0), "the job was acked: nothing comes back"


def test_a_second_ctrl_c_kills_at_once_and_exits_1(slow_mx: SlowMX) -> None:
    mx = slow_mx
    mx.sink.delay_data = 120.0  # the reply outlasts the test
    with relais_up(mx.data, free_port(), mx.log.parent, mx.config_path) as proc:
        try:
            wait_until_up(proc, mx.log)
            delivery = _service_pid(mx.data, "delivery")
            _send_and_wait_for_the_dot(mx)
            proc.send_signal(signal.SIGINT)
            first = time.monotonic()
            while time.monotonic() - first < PAST_THE_OLD_WAIT:
                assert proc.poll() is None, f"stopped before the reply came: {mx.log.read_text()}"
                time.sleep(0.2)
            assert alive(delivery), "delivery still waits for the reply to its final dot"
            ours = started_by(mx.data)

            proc.send_signal(signal.SIGINT)
            second = time.monotonic()
            assert proc.wait(10) == 1, mx.log.read_text()
            assert time.monotonic() - second < 5, "at once"
        finally:
            _interrupted_twice_on_leaving(proc)
    said = mx.log.read_text()
    assert "Ctrl-C again" in said, said
    last = said.splitlines()[-1]
    assert last.startswith("relais: stopped at once: killed the delivery and bounce"), said
    assert not [pid for pid in ours if alive(pid)], "nothing left running, the nats-server neither"
