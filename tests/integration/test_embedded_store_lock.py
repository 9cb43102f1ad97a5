"""One nats-server per JetStream store dir: a second one (another `relais up` on the same data dir,
or one started while a server left by a killed `relais up` still runs, its port taken so a free
one was picked) is refused instead of writing the same store files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from services.core.embedded import EmbeddedNats, StoreDirInUse, free_port
from tests.support.nats import start_nats
from tests.support.relais import relais_up

REPO = Path(__file__).resolve().parents[2]

# Starts a server and dies without stopping it, as `relais up` does on SIGKILL or SIGHUP.
ORPHAN = """
import os, sys
from pathlib import Path
from services.core.embedded import EmbeddedNats
server = EmbeddedNats(store_dir=Path(sys.argv[1]), log_file=Path(sys.argv[2]))
server.start()
print(server.process.pid, flush=True)
os._exit(0)
"""


async def test_a_second_server_on_a_store_dir_is_refused(tmp_path: Path) -> None:
    first = start_nats(tmp_path)
    try:
        second = EmbeddedNats(store_dir=first.store_dir, log_file=tmp_path / "second.log")
        try:
            with pytest.raises(StoreDirInUse, match=r"in use by another nats-server \(pid \d+\)"):
                second.start()
            assert second.process is None
        finally:
            second.stop()
        client = await nats.connect(first.url)
        try:
            await client.jetstream().add_stream(name="STILL", subjects=["still.>"])
        finally:
            await client.close()
        first.restart()  # its own server may start again on the store dir
    finally:
        first.stop()
    third = EmbeddedNats(store_dir=first.store_dir, log_file=tmp_path / "third.log")
    try:
        third.start()  # the store dir is free once its server stopped
    finally:
        third.stop()


def test_a_server_left_by_a_dead_parent_keeps_its_store_dir(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    started = subprocess.run(
        [sys.executable, "-c", ORPHAN, str(store), str(tmp_path / "orphan.log")],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    orphan = int(started.stdout.split()[0])
    after = EmbeddedNats(store_dir=store, log_file=tmp_path / "next.log")
    try:
        with pytest.raises(StoreDirInUse, match=rf"pid {orphan}\)"):
            after.start()
    finally:
        after.stop()
        os.kill(orphan, signal.SIGKILL)


def test_relais_up_on_a_data_dir_whose_server_still_runs_says_so(tmp_path: Path) -> None:
    data = tmp_path / "relais-data"
    left = start_nats(data)  # the server a killed `relais up` left on its store dir
    try:
        with relais_up(data, free_port(), tmp_path) as proc:
            code = proc.wait(timeout=120)
    finally:
        left.stop()
    output = (tmp_path / "relais-up.log").read_text()
    assert code == 1, output
    assert "relais: " in output and "in use by another nats-server" in output, output
    assert "Traceback" not in output, output
