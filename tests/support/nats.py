"""A JetStream-enabled nats-server for tests, via the same EmbeddedNats that `relais up` uses."""

from __future__ import annotations

from pathlib import Path

from services.core.embedded import EmbeddedNats

# The test servers' JetStream store limit. Capped streams reserve their max_bytes in it (the
# events stream's 4 GiB by default) without writing them; nats-server's default, 75% of the
# disk's free space, would make every test depend on the machine's free disk.
TEST_MAX_FILE_STORE = "1T"


def start_nats(tmp_path: Path, *, host: str = "127.0.0.1", port: int = 0) -> EmbeddedNats:
    """Start nats-server with its store and log under `tmp_path`, ready for clients.

    The log (tmp_path / "nats-server.log") is what to read when a test hangs on NATS.
    The caller owns the server: stop() it, even when the test fails (the nats_server
    fixture does). start() waits until the port accepts while this process runs, and stops
    it on failure (it exited, or never listened).
    """
    log = Path(tmp_path) / "nats-server.log"
    store = Path(tmp_path) / "nats"
    server = EmbeddedNats(store, host, port, log_file=log, max_file_store=TEST_MAX_FILE_STORE)
    server.start()
    return server
