"""`relais up` ending other than by Ctrl-C: its terminal closed (SIGHUP), its SMTP port taken by
another program, its ingress dying during start-up, start-up taking too long, its nats-server
dying. Each ends with every process it started stopped (the services drained, the nats-server
found by the pid its store lock records), and a failure is one line on stderr with exit status 1
(2 for an invalid configuration, as for every other command). `--port` moves the listener of the
configuration it generated."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from services.core.embedded import free_port, stop_process
from services.up import write_default_config
from tests.integration.test_relais_up import alive, started_by
from tests.support.relais import REPO, relais_up

SERVICES = ("router", "delivery", "bounce", "ingress")
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def nats_pid(data: Path) -> int:
    """The embedded nats-server's pid, as its store dir's lock file records it."""
    return int((data / "nats" / "nats-server.lock").read_text())


@contextlib.contextmanager
def leaving_nothing_running(data: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for pid in started_by(data):  # whatever a failed test left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def relais_up_in_a_terminal(data: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`relais up` as a shell in a terminal runs it: a job with a process group of its own, which
    the shell hangs up as a whole (SIGHUP to the group) when the terminal closes. (The shared
    `relais_up` leaves it in the test's group, which a test cannot signal.)"""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--data-dir", str(data), "--port", str(port)],
            cwd=log.parent,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process(proc, signal.SIGINT, grace=30)


def wait_until_up(proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while "Relais is up" not in log.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()


def test_a_closed_terminal_stops_the_services_gracefully_and_the_nats_server(tmp_path: Path) -> None:
    data, log = tmp_path / "relais-data", tmp_path / "relais-up.log"
    with leaving_nothing_running(data), relais_up_in_a_terminal(data, free_port(), log) as proc:
        wait_until_up(proc, log)
        server, ours = nats_pid(data), started_by(data)
        assert alive(server) and len(ours) >= 5, "nats-server and four services"

        os.killpg(proc.pid, signal.SIGHUP)  # what the shell does to its jobs

        assert proc.wait(60) == 0, log.read_text()
        assert not alive(server), "the nats-server, in a session of its own, is stopped too"
        assert not [pid for pid in ours if alive(pid)]
        for name in SERVICES:
            service_log = (data / "logs" / f"{name}.log").read_text()
            assert f"relais {name} stopped" in service_log, f"{name} was killed, not drained"


def test_an_smtp_port_taken_by_another_program_is_one_line_and_status_1(tmp_path: Path) -> None:
    data, port = tmp_path / "relais-data", free_port()
    with socket.create_server(("127.0.0.1", port)), leaving_nothing_running(data):
        with relais_up(data, port, tmp_path) as proc:
            assert proc.wait(60) == 1
        said = (tmp_path / "relais-up.log").read_text()
        assert said.splitlines() == [
            f"relais: 127.0.0.1:{port} is in use by another program: stop it, or choose another"
            " port with --port"
        ], said
        assert not [pid for pid in started_by(data) if alive(pid)]


def test_an_ingress_that_dies_while_starting_is_one_line_and_status_1(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host: the ingress cannot bind it and exits.
    data, config = tmp_path / "relais-data", tmp_path / "relais.toml"
    config.write_text(
        f'data_dir = "{data}"\n[ingress]\nlisten = "192.0.2.1:{free_port()}"\n'
        f'hostname = "relais.localhost"\n[delivery]\nmode = "capture"\ncapture_dir = "{data / "mailbox"}"\n'
    )
    with leaving_nothing_running(data):
        with relais_up(data, free_port(), tmp_path, config) as proc:
            assert proc.wait(90) == 1
        said = (tmp_path / "relais-up.log").read_text()
        assert len(said.splitlines()) == 1 and "Traceback" not in said, said
        assert said.startswith("relais: the ingress exited with 1 while starting") and "ingress.log" in said
        assert not [pid for pid in started_by(data) if alive(pid)]


def test_a_start_up_timeout_is_one_line_and_status_1(tmp_path: Path) -> None:
    # No service can be ready the moment it is spawned: a timeout of 0 always expires.
    data = tmp_path / "relais-data"
    script = (
        "import sys; from pathlib import Path; from services.up import run_up; sys.exit(run_up("
        f"data_dir=Path({str(data)!r}), config_path=None, smtp_port={free_port()}, start_timeout=0))"
    )
    with leaving_nothing_running(data):
        ran = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=90
        )
        assert ran.returncode == 1, ran
        assert ran.stdout == "" and len(ran.stderr.splitlines()) == 1, ran
        expected = "relais: not up within 0s: not ready: router, delivery, bounce, ingress"
        assert ran.stderr.startswith(expected), ran.stderr
        assert not [pid for pid in started_by(data) if alive(pid)]


def test_an_invalid_config_is_one_line_and_status_2(tmp_path: Path) -> None:
    # A typo'd key, as `relais validate` and every service report it: no traceback.
    data, config = tmp_path / "relais-data", tmp_path / "relais.toml"
    config.write_text(f'data_dir = "{data}"\n[ingress]\nlistn = "127.0.0.1:{free_port()}"\n')
    with leaving_nothing_running(data):
        with relais_up(data, free_port(), tmp_path, config) as proc:
            assert proc.wait(60) == 2
        said = (tmp_path / "relais-up.log").read_text()
        assert said.splitlines() == ["relais: invalid configuration: unknown key(s): ingress.listn"], said
        assert not (data / "nats").exists(), "nothing was started"


def test_a_nats_server_that_dies_stops_everything_with_status_1(tmp_path: Path) -> None:
    # Every service reconnects for ever: without `relais up` noticing, it would go on looking
    # up while the ingress answers every message 451.
    data, log = tmp_path / "relais-data", tmp_path / "relais-up.log"
    with leaving_nothing_running(data), relais_up_in_a_terminal(data, free_port(), log) as proc:
        wait_until_up(proc, log)
        server, ours = nats_pid(data), started_by(data)
        os.kill(server, signal.SIGKILL)

        assert proc.wait(60) == 1, log.read_text()
        # The cause first; a service then killed, as one still reconnecting can hang, says so after.
        first = next(line for line in log.read_text().splitlines() if line.startswith("relais: "))
        assert first.startswith("relais: the nats-server exited with -9 unexpectedly"), first
        assert str(data / "nats.log") in first, first
        assert not [pid for pid in ours if alive(pid)]


def test_port_moves_the_smtp_listener_of_a_generated_config(tmp_path: Path) -> None:
    # The generated config keeps the port of the first run; when another program has taken it
    # since, `relais up` says to choose another with --port, which must then be the one used.
    data, log = tmp_path / "relais-data", tmp_path / "relais-up.log"
    first, second = free_port(), free_port()
    write_default_config(data, first)
    with socket.create_server(("127.0.0.1", first)), leaving_nothing_running(data):
        with relais_up_in_a_terminal(data, second, log) as proc:
            wait_until_up(proc, log)
            assert f"SMTP (AUTH PLAIN/LOGIN): 127.0.0.1:{second}" in log.read_text()
            with smtplib.SMTP("127.0.0.1", second, timeout=30) as client:
                assert client.ehlo("laptop.test")[0] == 250
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, log.read_text()
