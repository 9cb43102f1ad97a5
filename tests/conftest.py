"""Fixtures shared by both test tiers, and the tier markers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.certs import TestPKI, make_test_pki
from tests.support.dns_server import DNSServer
from tests.support.signals import unwind_on_sigterm
from tests.support.smtp_sink import SMTPSink

if TYPE_CHECKING:
    # Imported lazily: a half-written services package must not break collecting every test.
    from services.core.bus import Bus
    from services.core.embedded import EmbeddedNats

_TESTS_DIR = Path(__file__).parent
_TIER_MARKERS = {"unit": pytest.mark.unit, "integration": pytest.mark.integration}
_CLUSTER_PACKAGE = ("integration", "cluster")
_CLUSTER_NODEIDS = "tests/integration/cluster/"
# Hosts the sinks may use; 127.0.0.1 is left to the services under test and the DNS server.
SINK_HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 10))


def pytest_configure(config: pytest.Config) -> None:
    # A CI timeout or a `kill` then tears the fixtures down: no server outlives the run. An
    # xdist controller passes the signal on to its workers, whose fixtures hold the servers.
    controller = not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))
    unwind_on_sigterm(children_first=controller)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_FilesOnOneWorker(), "relais-xdist-files")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier, taken from its directory, so `-m unit` needs no decorators."""
    for item in items:
        parts = _parts(item)
        if parts and parts[0] in _TIER_MARKERS:
            item.add_marker(_TIER_MARKERS[parts[0]])
    # The cluster scenarios are the longest group by far (`_FilesOnOneWorker`): started last, the
    # other workers would sit idle while one ran them.
    items.sort(key=lambda item: _parts(item)[:2] != _CLUSTER_PACKAGE)


def _parts(item: pytest.Item) -> tuple[str, ...]:
    """The test file's path under tests/, in parts; empty for a file outside it."""
    try:
        return item.path.relative_to(_TESTS_DIR).parts
    except ValueError:
        return ()


class _FilesOnOneWorker:
    """With several pytest-xdist workers (`bootstrap.py test` runs one per core), each test file
    runs in order on one worker, as its tests were written to, and the cluster scenarios
    (`tests/integration/cluster`) all on one: they share a package-scoped 3-node cluster, which
    every worker would otherwise start again, two at once more than 2 cores can carry.

    A scheduler rather than `xdist_group` marks: pytest-xdist 3.8 applies those by renaming the
    test's node id, which pytest 9 no longer lets it do."""

    @pytest.hookimpl
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        from xdist.scheduler import LoadFileScheduling

        class Scheduling(LoadFileScheduling):
            def _split_scope(self, nodeid: str) -> str:
                if nodeid.startswith(_CLUSTER_NODEIDS):
                    return _CLUSTER_NODEIDS
                return super()._split_scope(nodeid)

        return Scheduling(config, log)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    from tests.support.nats import start_nats

    server = start_nats(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def topology_bus(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    """A Bus connected to a fresh nats-server on which Relais' topology is declared."""
    from services.core.bus import connect
    from services.core.config import Config, NatsConfig
    from services.core.topology import ensure_topology

    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-topology")
    try:
        await ensure_topology(bus.js, config)
        yield bus
    finally:
        await bus.close()


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer("127.0.0.1") as server:
        yield server


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def sink_port() -> int:
    from services.core.embedded import free_port

    return free_port(*SINK_HOSTS)


@pytest.fixture
def make_sink(sink_port: int) -> Iterator[Callable[..., SMTPSink]]:
    """Factory: make_sink("127.0.0.2", tls_context=...) -> a started SMTPSink on sink_port."""
    with ExitStack() as stack:

        def make(host: str, **kwargs: Any) -> SMTPSink:
            return stack.enter_context(SMTPSink(host, sink_port, **kwargs))

        yield make
