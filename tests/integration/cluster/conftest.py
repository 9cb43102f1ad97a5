"""One cluster for every scenario in this folder: 3 NATS nodes (R3), two replicas of each service.

Starting it costs ~10 s of a 2-core machine, so the scenarios share it (package scope); each
scenario uses its own tag in every recipient address, heals the cluster before it starts, and
audits only its own messages.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster
from tests.support.relais import ACCOUNT, PASSWORD
from tests.support.smtp_load import Result, Submission, run_load

# Every scenario: this many messages at this pace, i.e. about 20 s of steady load.
MESSAGES = 3000
RATE = 150.0
SESSIONS = 20


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base: Path = tmp_path_factory.mktemp("cluster")
    with Cluster(base, nats_nodes=3) as c:
        yield c


@pytest.fixture
def healthy_cluster(cluster: Cluster) -> Iterator[Cluster]:
    cluster.heal()
    asyncio.run(cluster.nats.wait_ready(60.0))
    try:
        yield cluster
    except Exception:
        raise
    finally:
        cluster.heal()


Step = tuple[float, str, Callable[[], Any]]


async def drive(
    cluster: Cluster, subs: list[Submission], timeline: list[Step], *, rate: float = RATE
) -> list[Result]:
    """Send `subs` at `rate` through every ingress replica while the timeline's faults happen."""
    load = asyncio.create_task(
        run_load(cluster.ingress_addresses, subs, sessions=SESSIONS, auth=(ACCOUNT, PASSWORD), rate=rate)
    )
    started = time.monotonic()
    for at, label, action in timeline:
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        print(f"  t={time.monotonic() - started:5.1f}s  {label}")
        result = action()
        if inspect.isawaitable(result):
            await result
    results = await load
    print(f"  t={time.monotonic() - started:5.1f}s  load finished")
    return results
