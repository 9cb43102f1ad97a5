"""The ingress service: SMTP listeners in front of the hand-off to JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import resource
import weakref
from collections.abc import Callable

from services.core import metrics
from services.core.bodies import BodyStore
from services.core.bus import Bus
from services.core.config import Config, ListenerConfig, listener_configs
from services.core.health import split_listen
from services.core.runtime import EXIT_SECONDS
from services.ingress.accounts import AccountStore
from services.ingress.auth import Authenticator, PasswordChecker
from services.ingress.budget import ByteBudget
from services.ingress.door import Door
from services.ingress.handler import IngressHandler
from services.ingress.handoff import Handoff
from services.ingress.limits import (
    AuthThrottle,
    ConnectionGate,
    Counters,
    MessageRates,
    SessionRegistry,
)
from services.ingress.protocol import RelaisSMTP
from services.ingress.prototype import Prototype
from services.ingress.server_clock import ServerClock
from services.ingress.tls import TlsCertificates

log = logging.getLogger(__name__)


class _QuietDeprecation(logging.Filter):
    """aiosmtpd 1.4 sets the deprecated Session.login_data itself on every successful AUTH and
    then warns about it: one useless warning per session at bulk-sender rates."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in str(record.msg)


logging.getLogger("mail.log").addFilter(_QuietDeprecation())

# File descriptors beside the listeners' connections: NATS, DNS, TLS certificate reloads, logs.
_FD_RESERVE = 64
# How long a PROXY-protocol listener waits for the header before dropping the connection.
_PROXY_TIMEOUT = 10.0
_TLS_HANDSHAKE_TIMEOUT = 30.0
# On stop, sessions in the middle of DATA get this long to finish (Kubernetes gives 30 s).
_DRAIN_SECONDS = 20.0
# A session whose client left after the final dot goes on handing its message over
# (`past_the_client`): at most this many broker round trips of `nats.publish_timeout` each (the
# rate counters' increments, the envelope's publish, a refund sent twice; or, queued, the wait
# for room to report it). A password check, likewise: its count, scrypt, a refund sent twice.
# Then events are sent.
_HANDOFF_ROUND_TRIPS = 4
# Then accepted events still being published get this long.
_EVENT_DRAIN_SECONDS = 5.0
# The drain has ended every session by then; this only bounds a server's own close.
_SERVER_CLOSE_SECONDS = 1.0


def stop_seconds(config: Config) -> float:
    """The longest an ingress takes from SIGTERM to its exit: sessions in DATA finish, hand-offs
    still running get their broker round trips, the servers close, the events of what was
    accepted are sent, the process exits. Its grace period in deploy/k8s holds this (beside the
    preStop pause), and `relais up` waits this long for it."""
    drain = _DRAIN_SECONDS + _HANDOFF_ROUND_TRIPS * config.nats.publish_timeout
    return drain + _SERVER_CLOSE_SECONDS + _EVENT_DRAIN_SECONDS + EXIT_SECONDS


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard one, as Go programs (nats-server
    among them) do at start: the common soft default of 1,024 fails accepts, and NATS
    reconnects, long before the listeners are full. The soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _check_open_files(connections: int) -> None:
    limit = raise_open_files_limit()
    if connections and limit != resource.RLIM_INFINITY and connections + _FD_RESERVE > limit:
        log.warning(
            "open-files limit %d is below the listeners' %d connections (ingress.max_connections per "
            "listener) plus %d: a busy replica will fail accepts; raise the limit or lower the setting",
            limit,
            connections,
            _FD_RESERVE,
        )


def _shown(bound: list[tuple[str, int]]) -> str:
    """Bound addresses as an operator writes them: `127.0.0.1:2525, [::1]:2525`."""
    return ", ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in bound)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class IngressService:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        cfg = config.ingress
        bodies = BodyStore(bus.js, config.nats.inline_body_max, purges=config.nats.declare_topology)
        # This host's offset from the NATS servers' clock, in which `accept_by` is written.
        self.clock = ServerClock(bus)
        self._handoff = Handoff(
            bus, bodies, config.nats.publish_timeout, config.ingress.queue_timeout, clock=self.clock
        )
        self.accounts = AccountStore(bus.js, config.accounts)
        counters = Counters(bus, config.nats.publish_timeout)
        self._rates = MessageRates(counters)
        self.sessions = SessionRegistry(bus.js)
        self._passwords = PasswordChecker()
        self._auth = Authenticator(
            accounts=self.accounts,
            throttle=AuthThrottle(counters, cfg.auth_max_failures, cfg.auth_lockout),
            sessions=self.sessions,
            passwords=self._passwords,
        )
        # Connections per client IP, and per load balancer while a PROXY header is awaited.
        self.gate = ConnectionGate(cfg)
        # The largest message allowed: max_message_size, or with none the whole budget (a
        # message larger than the budget could never be taken; relais validate keeps the budget
        # above max_message_size otherwise).
        self._largest = cfg.max_message_size or cfg.max_buffered_bytes
        # DATA octets held by all of this process's sessions (ingress.max_buffered_bytes).
        self.budget = ByteBudget(cfg.max_buffered_bytes, largest=self._largest)
        metrics.INGRESS_BUFFERED_BYTES.set_function(lambda: self.budget.used)
        self.tls = TlsCertificates(cfg.tls_cert_file, cfg.tls_key_file) if cfg.tls_cert_file else None
        self._servers: list[asyncio.Server] = []
        self._connections: set[RelaisSMTP] = set()
        # Every connection's protocol while it lives: its session's task may outlive the
        # connection (and its place in `_connections`), a message's hand-off running to its end.
        self._protocols: weakref.WeakSet[RelaisSMTP] = weakref.WeakSet()
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners = listener_configs(config)
        # listen string as configured -> every (host, port) it bound: a name with several
        # addresses (`localhost` as 127.0.0.1 and ::1) gets a socket for each.
        self.bound: dict[str, list[tuple[str, int]]] = {}
        # listen string -> its first bound (host, port); `address` is the first listener's.
        self.addresses: dict[str, tuple[str, int]] = {}
        self.address: tuple[str, int] | None = None
        self._listening = False

    def ready(self) -> bool:
        """Whether every listener accepts connections (/readyz). Kubernetes sends a ready pod
        traffic for all its ports at once: ready after the first listener only, clients of the
        others would be refused while the rest bind, or for good when one cannot bind."""
        return self._listening

    def describe_listeners(self) -> str:
        """Each listener as configured, with its mode and what it bound, for /readyz: a name that
        gave more (or fewer) addresses than the operator expected shows there."""
        return "; ".join(
            f"{li.mode} {li.listen} on {_shown(self.bound[li.listen])}"
            if li.listen in self.bound
            else f"{li.mode} {li.listen} not bound"
            for li in self._listeners
        )

    def _factory(self, listener: ListenerConfig) -> Callable[[], RelaisSMTP]:
        cfg = self._config.ingress
        host, _ = split_listen(listener.listen)
        handler = IngressHandler(
            self._config,
            self._handoff,
            mode=listener.mode,
            accounts=self.accounts,
            rates=self._rates,
            sessions=self.sessions,
            auth=self._auth,
            budget=self.budget,
        )
        tls = self.tls.context if self.tls else None
        implicit = listener.mode == "implicit-tls"
        # AUTH over plaintext is only allowed where nothing leaves the machine; implicit TLS is
        # encrypted from the first byte, which aiosmtpd cannot see, so it is told explicitly.
        # Behind a PROXY header a loopback listener serves remote clients: no exemption there.
        local_only = tls is None and _is_loopback(host) and not listener.proxy_protocol
        require_tls = cfg.auth_require_tls and not implicit and not local_only
        # aiosmtpd's reflective set-up, paid by the listener's first connection only.
        prototype = Prototype()
        listen = listener.listen
        gauge = metrics.INGRESS_CONNECTIONS.labels(listen)
        gauge.set_function(lambda: self.gate.listener_connections(listen))
        # Implicit TLS is started by the protocol itself, after the gate counted the connection.
        door = Door(
            self.gate,
            listen,
            tls=tls if implicit else None,
            handshake_timeout=_TLS_HANDSHAKE_TIMEOUT,
            proxy=listener.proxy_protocol,
            proxy_from=tuple(listener.proxy_from),
        )

        def make() -> RelaisSMTP:
            protocol = RelaisSMTP(
                handler,
                door=door,
                budget=self.budget,
                registry=self._connections,
                max_errors=cfg.max_errors,
                prototype=prototype,
                normalise_line_endings=cfg.bare_line_endings == "normalise",
                hostname=cfg.hostname,
                ident="Relais ESMTP",
                data_size_limit=self._largest,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=None if implicit else tls,
                require_starttls=False,
                # MAIL FROM enforces AUTH itself (relay networks and the inbound listener differ).
                auth_required=False,
                auth_require_tls=require_tls,
                timeout=cfg.command_timeout,
                proxy_protocol_timeout=_PROXY_TIMEOUT if listener.proxy_protocol else None,
            )
            self._protocols.add(protocol)
            return protocol

        return make

    async def start(self) -> None:
        await self.accounts.start()
        await self.sessions.start()
        # Before the first message: measured later (`keep_sampling`) if NATS does not answer now.
        await self.clock.sample()
        loop = asyncio.get_running_loop()
        _check_open_files(len(self._listeners) * self._config.ingress.max_connections)
        try:
            for listener in self._listeners:
                host, port = split_listen(listener.listen)
                server = await loop.create_server(
                    self._factory(listener), host=host, port=port, reuse_address=True
                )
                self._servers.append(server)
                # getsockname() is (host, port) for IPv4, (host, port, flowinfo, scope) for IPv6.
                bound = [(name[0], name[1]) for name in (sock.getsockname() for sock in server.sockets)]
                self.bound[listener.listen] = bound
                self.addresses[listener.listen] = bound[0]
                self.address = self.address or bound[0]
                log.info("ingress %s listener %s on %s", listener.mode, listener.listen, _shown(bound))
        except BaseException:
            # The process then exits non-zero (the orchestrator restarts it), never ready.
            await self.stop()
            raise
        self._listening = True
        self._tasks.append(asyncio.create_task(self.clock.keep_sampling()))
        if self.tls is not None:
            self._tasks.append(asyncio.create_task(self.tls.watch(self._config.ingress.tls_reload_interval)))

    async def stop(self) -> None:
        self._listening = False
        for server in self._servers:
            server.close()
        # Drained before waiting for the servers: from Python 3.12.1 `wait_closed` waits for
        # every connection to end, and an idle session would then never hear its 421.
        await self._drain()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), _SERVER_CLOSE_SECONDS)
        self._servers = []
        # Sessions are done: the events of what they were told 250 go out before NATS closes.
        await self._bus.flush(_EVENT_DRAIN_SECONDS)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self.sessions.stop()
        await self.accounts.stop()

    async def _drain(self) -> None:
        """No new connections; idle sessions get 421 4.3.2, a DATA in progress may finish (its
        250 only after the JetStream ack, as always), then whatever is left is cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DRAIN_SECONDS
        while self._connections and loop.time() < deadline:
            for connection in list(self._connections):
                if not connection.busy:
                    connection.shut_down()
            await asyncio.sleep(0.05)
        for connection in list(self._connections):
            connection.hang_up()
        await self._sessions_ended()

    async def _sessions_ended(self) -> None:
        """Wait for sessions whose connection is gone but whose task is not: a client that left
        after the final dot, or was cut by the drain, leaves its message's hand-off running
        (`past_the_client`). Closing NATS under it would leave the message's quota taken with
        nothing queued, or its `accepted` event unsent. Likewise for password checks, which
        outlive the sessions that asked (a right password's failure count is refunded after
        scrypt). Bounded by a hand-off's own deadlines, which `stop_by` makes hold for the wait
        for room to report the `accepted` event too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _HANDOFF_ROUND_TRIPS * self._config.nats.publish_timeout
        self._handoff.stop_by(deadline)
        # aiosmtpd's task of each session (`_handler_coroutine`), None before it started.
        tasks = {getattr(protocol, "_handler_coroutine", None) for protocol in list(self._protocols)}
        sessions = {task for task in tasks if task is not None and not task.done()}
        checks = self._passwords.running()
        if not sessions and not checks:
            return
        log.info("stopping: waiting for %d sessions and %d password checks", len(sessions), len(checks))
        await asyncio.wait(sessions | checks, timeout=deadline - loop.time())

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
