"""A nats-server whose JetStream store holds a few MB, as `max_file_store` limits each production
server's, and a stream of the test's own that fills it: what Relais does with a full store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nats.js.api import StreamConfig
from nats.js.errors import APIError

from services.core.embedded import EmbeddedNats

# Deleting it makes room again, as an operator would.
FILLER = "FILLER"
_CHUNK = b"f" * 64 * 1024
_NO_ROOM = 10023  # nats-server's "insufficient resources"


@contextmanager
def small_store(tmp_path: Path, max_file_store: str) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(
        tmp_path / "nats", log_file=tmp_path / "nats-server.log", max_file_store=max_file_store
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def fill_store(js: Any) -> int:
    """Publish to FILLER until JetStream refuses for want of room; how many it took."""
    await js.add_stream(StreamConfig(name=FILLER, subjects=["filler.>"]))
    stored = 0
    while True:
        try:
            await js.publish("filler.x", _CHUNK)
        except APIError as exc:
            assert exc.err_code == _NO_ROOM, f"refused for another reason: {exc!r}"
            return stored
        stored += 1
