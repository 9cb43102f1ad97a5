"""Run Relais for tests: the four services in-process (one event loop) or as real OS processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nats

from services.bounce.service import BounceService
from services.cli import SERVICES
from services.core.accounts import hash_password
from services.core.bus import Bus
from services.core.config import (
    AccountConfig,
    BounceConfig,
    Config,
    DeliveryConfig,
    DnsConfig,
    IngressConfig,
    NatsConfig,
    PoolConfig,
    RetryConfig,
)
from services.core.embedded import free_port, stop_process, wait_for_port
from services.core.envelope import BodyRef, Envelope, new_message_id
from services.core.events import Event
from services.core.runtime import start_bus
from services.core.topology import BODY_BUCKET, EVENTS_STREAM, events_filter
from services.delivery.service import DeliveryService
from services.ingress.service import IngressService
from services.router.service import RouterService

ACCOUNT = "acme"
PASSWORD = "correct horse battery staple"
SENDER_DOMAIN = "acme.test"
REPO = Path(__file__).resolve().parents[2]


@functools.cache
def password_hash() -> str:
    return hash_password(PASSWORD)


def make_config(
    *,
    nats_url: str,
    dns_port: int | None = None,
    smtp_port: int = 25,
    smtp_listen: str | None = None,
    **sections: Any,
) -> Config:
    """A test cluster config: one account, fast retries, a short DSN window, local DNS, destination
    port of the sinks."""
    config = Config(
        nats=NatsConfig(url=nats_url, publish_timeout=2.0, ack_wait=30.0),
        ingress=IngressConfig(listen=smtp_listen or f"127.0.0.1:{free_port()}", hostname="relais.test"),
        dns=DnsConfig(servers=[f"127.0.0.1:{dns_port}"] if dns_port else [], timeout=2.0),
        delivery=DeliveryConfig(smtp_port=smtp_port, connect_timeout=3.0, command_timeout=10.0),
        retry=RetryConfig(base_delay=1.0, max_delay=2.0, jitter=0.0, max_age=3600.0),
        bounce=BounceConfig(dsn_window=1.0),
        pools={"default": PoolConfig()},
        accounts={
            ACCOUNT: AccountConfig(password_hash=password_hash(), domains=[SENDER_DOMAIN], pool="default")
        },
    )
    for name, value in sections.items():
        current = getattr(config, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = dataclasses.replace(current, **value)
        config = dataclasses.replace(config, **{name: value})
    return config


def config_to_toml(config: Config) -> str:
    """Serialise a Config back to TOML (for services started as separate processes)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if dataclasses.is_dataclass(v):
            names = [x.name for x in dataclasses.fields(v)]
            return "{" + ", ".join(f"{k} = {value(getattr(v, k))}" for k in names) + "}"
        if isinstance(v, dict):
            return "{" + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + "}"
        raise TypeError(v)

    top: list[str] = []
    tables: list[str] = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            tables.append(f"[{f.name}]")
            tables += [f"{k} = {value(getattr(v, k))}" for k in (x.name for x in dataclasses.fields(v))]
        elif isinstance(v, dict) and all(dataclasses.is_dataclass(item) for item in v.values()):
            for key, item in v.items():
                tables.append(f'[{f.name}."{key}"]')
                tables += [
                    f"{k} = {value(getattr(item, k))}" for k in (x.name for x in dataclasses.fields(item))
                ]
        elif isinstance(v, dict):
            tables.append(f"[{f.name}]")
            tables += [f'"{key}" = {value(item)}' for key, item in v.items()]
        else:
            top.append(f"{f.name} = {value(v)}")
    return "\n".join(top + tables) + "\n"


class RelaisStack:
    """The four services in this event loop, each with its own NATS connection like a replica."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._tasks: list[asyncio.Task[None]] = []
        self._stops: list[asyncio.Event] = []
        self._buses: list[Bus] = []
        self.ingress: IngressService | None = None

    @property
    def smtp_address(self) -> tuple[str, int]:
        host, _, port = self.config.ingress.listen.rpartition(":")
        return host, int(port)

    async def start(self, services: Iterable[str] = SERVICES) -> None:
        builders = {"router": RouterService, "delivery": DeliveryService, "bounce": BounceService}
        for name in services:
            bus = await start_bus(self.config, f"test-{name}", attempts=5)
            self._buses.append(bus)
            stop = asyncio.Event()
            self._stops.append(stop)
            if name == "ingress":
                self.ingress = IngressService(self.config, bus)
                await self.ingress.start()
                self._tasks.append(asyncio.create_task(stop.wait()))
            else:
                self._tasks.append(asyncio.create_task(builders[name](self.config, bus).run(stop)))

    async def stop(self) -> None:
        for stop in self._stops:
            stop.set()
        if self.ingress is not None:
            await self.ingress.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 15)
        for bus in self._buses:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bus.nc.close(), 5)

    async def __aenter__(self) -> RelaisStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def run_cli(config: Config, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`relais <args> --config <file>` as an operator runs it, with `config` written to a file
    in `workdir`; the environment's RELAIS_* settings are left out."""
    path = workdir / "relais-cli.toml"
    path.write_text(config_to_toml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )


async def relais_cli(*args: str, nats_url: str) -> tuple[int, str]:
    """`relais <args> --nats-url <url>` as an operator runs it, without the environment's
    RELAIS_* settings: its exit code and its output, stderr included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        "--nats-url",
        nats_url,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode()


def submit(
    address: tuple[str, int],
    *,
    sender: str = f"news@{SENDER_DOMAIN}",
    recipients: Sequence[str],
    data: bytes,
    user: str = ACCOUNT,
    password: str = PASSWORD,
    mail_options: Sequence[str] = (),
    rcpt_options: Mapping[str, Sequence[str]] | None = None,
) -> tuple[int, bytes]:
    """Submit one message with smtplib (a real client over a real socket); returns the DATA reply.
    `rcpt_options` holds a recipient's RCPT parameters (`NOTIFY=SUCCESS`)."""
    with smtplib.SMTP(*address, timeout=30) as client:
        client.ehlo("client.test")
        client.login(user, password)
        code, msg = client.mail(sender, list(mail_options))
        assert code == 250, (code, msg)
        for rcpt in recipients:
            code, msg = client.rcpt(rcpt, list((rcpt_options or {}).get(rcpt, ())))
            assert code == 250, (code, msg)
        return client.data(data)


async def asubmit(address: tuple[str, int], **kwargs: Any) -> tuple[int, bytes]:
    return await asyncio.to_thread(submit, address, **kwargs)


def an_envelope(*recipients: str, body: bytes | BodyRef = b"Hello.\r\n", **fields: Any) -> Envelope:
    """An envelope as the ingress stores it for the test account (news@SENDER_DOMAIN, the body
    inline unless `body` is a reference already), for tests that put one on a stream themselves
    or need one to hand; `fields` override any field."""
    base: dict[str, Any] = {
        "id": new_message_id(),
        "sender": f"news@{SENDER_DOMAIN}",
        "recipients": recipients or ("a@alpha.test",),
        "account": ACCOUNT,
        "sender_domain": SENDER_DOMAIN,
        "body": body if isinstance(body, BodyRef) else BodyRef(size=len(body), inline=body),
    }
    return Envelope(**(base | fields))


def message(
    subject: str = "Hello", body: str = "Hello there.\r\n", sender: str = f"news@{SENDER_DOMAIN}"
) -> bytes:
    return (
        f"From: Acme News <{sender}>\r\n"
        f"To: Someone <someone@example.test>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@{SENDER_DOMAIN}>\r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"{body}"
    ).encode()


def strip_received(data: bytes) -> bytes:
    """The message minus the Received: header(s) Relais prepends (folded lines included)."""
    lines = data.split(b"\r\n")
    out: list[bytes] = []
    skipping = False
    for i, line in enumerate(lines):
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        if line.lower().startswith(b"received:") and all(not x == b"" for x in lines[:i]):
            skipping = True
            continue
        out.append(line)
    return b"\r\n".join(out)


async def read_events(
    nats_url: str,
    account: str | None = None,
    timeout: float = 1.0,  # noqa: ASYNC109 - the quiet gap that ends the replay
) -> list[Event]:
    """Every event so far, replayed from the start of the events stream."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(events_filter(account), stream=EVENTS_STREAM, ordered_consumer=True)
        events: list[Event] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            events.append(Event.from_json(msg.data))
        await sub.unsubscribe()
        return events
    finally:
        await nc.close()


async def wait_for_events(
    nats_url: str,
    kind: str,
    count: int,
    timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline
    account: str | None = None,
) -> list[Event]:
    deadline = time.monotonic() + timeout
    found: list[Event] = []
    while time.monotonic() < deadline:
        found = [e for e in await read_events(nats_url, account, timeout=0.3) if e.kind == kind]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.3)
    raise TimeoutError(f"expected {count} {kind!r} events, saw {len(found)}")


async def wait_for_stored(nats_url: str, stream: str, count: int, within: float = 10.0) -> None:
    """Until `stream` holds `count` messages (jobs routed while no delivery service runs, say);
    returns at `within` whatever it holds, for the caller's own assertion to show."""
    nc = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + within
        while (await nc.jetstream().stream_info(stream)).state.messages != count:
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def stored_bodies(nats_url: str) -> int:
    """How many large bodies the Object Store still holds (deleted ones excluded)."""
    nc = await nats.connect(nats_url)
    try:
        store = await nc.jetstream().object_store(BODY_BUCKET)
        try:
            return len([o for o in await store.list() if not o.deleted])
        except nats.js.errors.NotFoundError:
            return 0
    finally:
        await nc.close()


class ServiceProcess:
    """One service as a real OS process (`python -m services.cli <name>`), killable with SIGKILL."""

    def __init__(
        self, name: str, config_path: Path, log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.config_path = config_path
        self.log_path = log_dir / f"{name}-{os.getpid()}-{time.time_ns()}.log"
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", self.name, "--config", str(self.config_path)],
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=REPO,
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def relais_up(
    data_dir: Path, port: int, cwd: Path, config: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`relais up` as the README has a user run it (or with `-c config`), with its output in
    `cwd/relais-up.log` (a pipe nobody reads would block it once full). Stopped with Ctrl-C
    (SIGINT) on leaving, unless it already exited; killed if that takes over 30 s."""
    with open(cwd / "relais-up.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--data-dir", str(data_dir), "--port", str(port)]
            + (["--config", str(config)] if config else []),
            cwd=cwd,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        stop_process(proc, signal.SIGINT, grace=30)


def wait_listening(address: tuple[str, int], timeout: float = 20.0) -> None:
    wait_for_port(address[0], address[1], timeout)
