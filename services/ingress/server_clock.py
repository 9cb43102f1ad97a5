"""The NATS servers' clock as the ingress reads it, to write `accept_by` in it.

The router drops a submission that JetStream stored after its `accept_by`
(`Envelope.refused_when_stored_at`): the ingress had answered `451` by then, and the client
sends it again. It compares `accept_by` with the time the stream stored the copy, by the clock
of the server that stored it. Written by the ingress host's own clock, `accept_by` would have
every message from a host running more than `ingress.queue_timeout` behind the servers (a VM
after a suspend, NTP broken) dropped as stored too late, after its `250`; and a host running
ahead would have copies stored after a `451` delivered beside the client's retry. So the
ingress measures how far its clock is from the servers' and writes `accept_by` in theirs.

The servers' time comes from a stream info of the submit stream: its `ts` is when the answering
server gathered it (nats-server 2.10+), and the stream's leader answers, the server whose clock
stamps the submissions. The ingress reads stream infos already (it checks that the topology
exists), so this needs no permission it lacks and stores nothing. A sample is off by at most
half its round trip, which the router's clock margin absorbs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime

import nats.errors

from services.core.bus import BrokerUnavailable, Bus
from services.core.topology import SUBMIT_STREAM

log = logging.getLogger(__name__)

# How often the offset is measured again: a clock drifts slowly, but NTP may step it meanwhile.
SAMPLE_INTERVAL = 30.0
# After a sample the servers did not answer (NATS not reachable yet), the next one comes sooner.
RETRY_INTERVAL = 5.0
# How often the wall clock is compared with the monotonic one, and the jump between them that
# counts as a step (NTP correcting the clock, a resume after a suspend): the offset measured
# before is then off by the step, so it is measured again at once.
_STEP_CHECK = 1.0
_STEP = 0.5
# An offset beyond this is reported: it is corrected for `accept_by` only.
WARN_OFFSET = 2.0


async def read_server_time(bus: Bus, stream: str = SUBMIT_STREAM) -> float:
    """The time (epoch seconds) by the clock of the server that answers for `stream`, its leader.

    Raises BrokerUnavailable when none answers, or the answer holds no time."""
    try:
        reply = await bus.nc.request(
            bus.api_subject(f"STREAM.INFO.{stream}"), b"", timeout=bus.publish_timeout
        )
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise BrokerUnavailable(f"stream info of {stream}: {exc!r}") from exc
    try:
        info = json.loads(reply.data)
        return datetime.fromisoformat(info["ts"]).timestamp()
    except (ValueError, KeyError, TypeError) as exc:
        what = reply.data[:200]
        raise BrokerUnavailable(f"no server time in the stream info of {stream}: {what!r}") from exc


class ServerClock:
    """How far the NATS servers' clock is from this host's (`offset`: theirs minus ours, in
    seconds), measured at start and every `interval` seconds after (`keep_sampling`). Reading
    it is reading a float: a hand-off pays nothing for it."""

    def __init__(self, bus: Bus, *, interval: float = SAMPLE_INTERVAL, retry: float = RETRY_INTERVAL) -> None:
        self._bus = bus
        self._interval = interval
        self._retry = retry
        self.offset = 0.0
        # The wall clock minus the monotonic one at the last sample: a change of it is a step.
        self._base = time.time() - time.monotonic()
        self._reported: float | None = None  # the offset last reported as skew
        self._failing = False

    async def sample(self) -> bool:
        """Measure the offset; False when the servers did not answer (the last offset is kept,
        0 before any was measured)."""
        self._base = time.time() - time.monotonic()
        sent = time.time()
        try:
            server = await read_server_time(self._bus)
        except BrokerUnavailable as exc:
            # Once per run of failures: NATS being away is reported where it matters, in 451s.
            if not self._failing:
                log.warning(
                    "could not read the NATS servers' clock (offset kept: %+.3fs): %s", self.offset, exc
                )
            self._failing = True
            return False
        received = time.time()
        self._failing = False
        self.offset = server - (sent + received) / 2
        self._report(received - sent)
        return True

    async def keep_sampling(self) -> None:
        """Measure again every `interval` seconds (every `retry` while the servers do not
        answer), and at once when this host's clock was stepped. Runs until cancelled."""
        task = asyncio.current_task()
        due = time.monotonic() + (self._retry if self._failing else self._interval)
        while True:
            await asyncio.sleep(_STEP_CHECK)
            stepped = abs(time.time() - time.monotonic() - self._base) > _STEP
            if stepped or time.monotonic() >= due:
                measured = await self.sample()
                if task is not None and task.cancelling():
                    # Python 3.11's wait_for (inside nats-py's request) drops a cancellation
                    # that races with the reply: the service's stop would wait for this forever.
                    raise asyncio.CancelledError
                due = time.monotonic() + (self._interval if measured else self._retry)

    def _report(self, round_trip: float) -> None:
        if abs(self.offset) > WARN_OFFSET:
            if self._reported is None or abs(self.offset - self._reported) > 1.0:
                log.warning(
                    "this host's clock is %.1fs %s the NATS servers' (measured to within %.3fs): "
                    "the ingress corrects accept_by for it, nothing else: message ids, rate-limit "
                    "windows and received_at follow this clock, and delivery's leases compare the "
                    "clocks of its hosts; keep every host on NTP",
                    abs(self.offset),
                    "behind" if self.offset > 0 else "ahead of",
                    round_trip / 2,
                )
                self._reported = self.offset
        elif self._reported is not None:
            log.info("this host's clock is within %gs of the NATS servers' again", WARN_OFFSET)
            self._reported = None
