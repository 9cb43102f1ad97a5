"""`relais up` as the README has a user run it: one command starts an embedded nats-server and the
four services as processes; mail from the demo account lands in the local mailbox, `relais
mailbox` lists it, `relais trace` prints its spans from every service, relaying without AUTH is
refused, and Ctrl-C stops every process `relais up` started."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.embedded import free_port, wait_for_port
from tests.support.relais import relais_up

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
MESSAGE = (
    b"From: you@example.com\r\nTo: someone@example.net\r\nSubject: hello from relais up\r\n"
    b"Message-ID: <up-test@example.com>\r\n\r\nHello.\r\n"
)


def relais(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def started_by(data: Path) -> set[int]:
    """Processes that belong to this `relais up`: its config or data dir in their command line or
    environment (the services get RELAIS_CONFIG, nats-server its store dir)."""
    pids = set()
    marker = str(data.resolve()).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes() or marker in (entry / "environ").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


Up = tuple[subprocess.Popen[bytes], Path, int]


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    data = tmp_path / "relais-data"
    port = free_port()
    try:
        with relais_up(data, port, tmp_path) as proc:
            yield proc, data, port
    finally:
        for pid in started_by(data):  # whatever a failed test left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_relais_up_from_submission_to_mailbox_and_trace(up: Up) -> None:
    proc, data, port = up
    wait_for_port("127.0.0.1", port, timeout=90)
    password = (data / "demo-password.txt").read_text().strip()

    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("laptop.test")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("you@example.com", ["someone@example.net"], MESSAGE)
        assert refused.value.smtp_code == 530, "no relaying without AUTH"
        client.login("demo", password)
        client.mail("you@example.com")
        client.rcpt("someone@example.net")
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    message_id = reply.decode().rsplit(" ", 1)[-1]

    config = str(data / "relais.toml")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = relais("mailbox", "list", "--config", config, cwd=data.parent)
        if "someone@example.net" in listed.stdout:
            break
        time.sleep(0.5)
    assert "from <you@example.com>" in listed.stdout, listed.stdout + listed.stderr
    job_id = listed.stdout.split()[0]
    shown = relais("mailbox", "show", job_id, "--config", config, cwd=data.parent)
    assert "Subject: hello from relais up" in shown.stdout and "Received: " in shown.stdout

    # Spans reach the trace file in batches (the SDK exports every 5 s or so).
    services = ("[ingress]", "[router]", "[delivery]")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        traced = relais("trace", message_id, "--config", config, cwd=data.parent)
        if traced.returncode == 0 and all(s in traced.stdout for s in services):
            break
        time.sleep(1.0)
    assert all(s in traced.stdout for s in services), traced.stdout + traced.stderr

    ours = started_by(data)
    assert len(ours) >= 5, "nats-server and four services"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in ours if alive(pid)], "Ctrl-C stops every process relais up started"


def test_relais_up_with_a_config_waits_for_its_listeners(tmp_path: Path) -> None:
    # With [[ingress.listeners]] the ingress does not listen on ingress.listen: `relais up` must
    # wait for (and announce) the listener that takes mail.
    data = tmp_path / "relais-data"
    inbound, submission = free_port(), free_port()
    config = tmp_path / "relais.toml"
    config.write_text(
        f'data_dir = "{data}"\n'
        '[ingress]\nhostname = "relais.localhost"\nlocal_domains = ["fbl.localhost"]\n'
        f'listeners = [{{ listen = "127.0.0.1:{inbound}", mode = "inbound" }},'
        f' {{ listen = "127.0.0.1:{submission}", mode = "submission" }}]\n'
        f'[delivery]\nmode = "capture"\ncapture_dir = "{data / "mailbox"}"\n'
    )
    try:
        with relais_up(data, free_port(), tmp_path, config) as proc:
            deadline = time.monotonic() + 90
            log = tmp_path / "relais-up.log"
            while "Relais is up" not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            assert f"SMTP (AUTH PLAIN/LOGIN): 127.0.0.1:{submission}" in log.read_text()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, log.read_text()
    finally:
        for pid in started_by(data):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("after", [0.3, 0.8, 1.5])
def test_ctrl_c_during_start_up_leaves_nothing_running(tmp_path: Path, after: float) -> None:
    data = tmp_path / "relais-data"
    try:
        with relais_up(data, free_port(), tmp_path) as proc:
            time.sleep(after)
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        deadline = time.monotonic() + 10
        while [pid for pid in started_by(data) if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in started_by(data) if alive(pid)]
    finally:
        for pid in started_by(data):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
