"""Ctrl-C while `relais up` is still importing its modules (about 0.3 s), before `run_up` put its
stop handlers in place and before anything was started: it ends at once and quietly, killed by
the SIGINT as Python itself ends on an uncaught Ctrl-C (a shell reports status 130), without
Python's KeyboardInterrupt traceback, and with nothing started or written. A Ctrl-C ignored by
the shell (a background job) stays ignored; every other command gets Python's handler back.

A sleep before the signal cannot say where the child is. Instead the child reports each import as
it finishes (`-X importtime`, on stderr) into a pipe of one page that the test stops reading at
the import named: the child can then import only as far as the page lets it write (some 60
imports), well short of `run_up`, until the signal has been sent."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from services.cli import _quiet_ctrl_c_while_starting, main
from services.core.config import load_config
from services.core.embedded import free_port, stop_process
from services.up import _on_stop_signals
from tests.integration.test_relais_up import alive, started_by
from tests.integration.test_up_lifecycle import leaving_nothing_running
from tests.support.relais import REPO
from tests.support.signals import handlers_restored

_PAGE = 4096


def _read_until_imported(stderr: int, module: str) -> bytes:
    """The child's `-X importtime` lines, read a byte at a time (nothing read ahead) up to the
    one that says `module` is imported."""
    said = bytearray()
    while not said.endswith(f" {module}\n".encode()):
        byte = os.read(stderr, 1)
        assert byte, f"exited before importing {module}:\n{said.decode(errors='replace')}"
        said += byte
    return bytes(said)


def _read_to_the_end(stderr: int) -> bytes:
    said = bytearray()
    while chunk := os.read(stderr, 65536):
        said += chunk
    return bytes(said)


def _up_reporting_imports(data: Path, cwd: Path, stderr: int) -> subprocess.Popen[bytes]:
    port = str(free_port())
    return subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "services.cli",
            "up",
            "--data-dir",
            str(data),
            "--port",
            port,
        ],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


# Relais' own packages, the first modules `relais up` imports once its main() runs: had they been
# imported before it (at the top of services/cli.py), the Ctrl-C would meet Python's handler.
@pytest.mark.parametrize("module", ["services.bounce", "services.core"])
def test_ctrl_c_while_importing_ends_quietly_with_nothing_started(tmp_path: Path, module: str) -> None:
    data = tmp_path / "relais-data"
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, _PAGE)
    with leaving_nothing_running(data):
        try:
            proc = _up_reporting_imports(data, tmp_path, write)
        finally:
            os.close(write)
        try:
            said = _read_until_imported(read, module)
            proc.send_signal(signal.SIGINT)
            said += _read_to_the_end(read)
            proc.wait(60)
        finally:
            os.close(read)
            stop_process(proc, signal.SIGKILL)
        stderr = said.decode(errors="replace")
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert proc.returncode == -signal.SIGINT, stderr
        assert not data.exists(), "nothing was started, nothing written"
        assert not [pid for pid in started_by(data) if alive(pid)]


@pytest.fixture
def python_ctrl_c() -> Iterator[None]:
    """SIGINT as Python sets it up at start; the test run's own handler put back afterwards."""
    with handlers_restored(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        yield


def _stop(*_: object) -> None:
    pass


def test_run_up_replaces_it_with_its_stop_handlers(python_ctrl_c: None) -> None:
    _quiet_ctrl_c_while_starting()
    assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_IGN)
    _on_stop_signals(_stop)
    assert signal.getsignal(signal.SIGINT) is _stop


def test_a_ctrl_c_the_shell_ignored_stays_ignored(python_ctrl_c: None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_ctrl_c_while_starting()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    _on_stop_signals(_stop)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_other_commands_get_pythons_handler_back(
    python_ctrl_c: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["account", "hash", "--password", "a password"]) == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    capsys.readouterr()


def test_a_stop_before_nats_starts_starts_nothing(
    python_ctrl_c: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C once `run_up` has taken over, while it still reads its configuration, stops it
    before nats-server and the services are started (they used to start, and then stop)."""
    from services import up

    def interrupted_while_loading(path: str, env: Mapping[str, str] | None = None) -> object:
        config = load_config(path, env)
        os.kill(os.getpid(), signal.SIGINT)  # run_up's own handler takes it
        return config

    monkeypatch.setattr(up, "load_config", interrupted_while_loading)
    data = tmp_path / "relais-data"
    assert up.run_up(data_dir=data, config_path=None, smtp_port=free_port()) == 0
    assert not (data / "nats").exists() and not (data / "nats.log").exists(), "nats-server never started"
    assert not list((data / "logs").iterdir()), "no service started"
