"""The nats_server fixture gives a JetStream server that survives restarts on the same URL."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import nats
import pytest

from services.core.embedded import EmbeddedNats
from tests.support.cluster import NatsCluster


async def test_jetstream_is_ready_and_persists_across_restart(nats_server: EmbeddedNats) -> None:
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        await js.add_stream(name="SUPPORT", subjects=["support.>"])
        ack = await js.publish("support.test", b"hello")
        assert ack.seq == 1
    finally:
        await client.close()

    url = nats_server.url
    nats_server.restart()
    assert nats_server.url == url
    client = await nats.connect(nats_server.url)
    try:
        message = await client.jetstream().get_msg("SUPPORT", 1)
        assert message.data == b"hello"
    finally:
        await client.close()


def test_cluster_nodes_split_the_machines_cores(tmp_path: Path) -> None:
    """Nodes sharing one machine get GOMAXPROCS = their share of its cores; a lone node keeps Go's default."""
    share = str(max(1, (os.cpu_count() or 1) // 3))
    cluster = NatsCluster(tmp_path / "three", size=3)
    single = NatsCluster(tmp_path / "one", size=1)
    try:
        cluster.start()
        single.start()
        for node in cluster.nodes:
            assert _environ(node).get("GOMAXPROCS") == share
        assert _environ(single.nodes[0]).get("GOMAXPROCS") == os.environ.get("GOMAXPROCS")
    finally:
        cluster.stop()
        single.stop()


def _environ(node: EmbeddedNats) -> dict[str, str]:
    assert node.process is not None
    raw = Path(f"/proc/{node.process.pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_server_that_cannot_listen_is_stopped_and_reported(tmp_path: Path) -> None:
    # Its port is taken by another listener: nats-server exits, and start() says so instead of
    # taking the other listener for it, or leaving a child behind for a fixture never yielded.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedNats(store_dir=tmp_path / "nats", port=port, log_file=tmp_path / "nats.log")
        with pytest.raises(RuntimeError, match=r"exited|did not listen"):
            server.start()
        assert server.process is None, "stopped"
