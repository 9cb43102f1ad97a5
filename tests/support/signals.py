"""`kill` (SIGTERM) unwinds a test run or a benchmark the way Ctrl-C does, and Ctrl-C works even
in a run started in the background.

Python's default for SIGTERM is to die on the spot, skipping every `finally`, fixture teardown
and `with` exit, which leaves the nats-servers, services and sinks the run started running for
good. Raised as KeyboardInterrupt, the signal goes through the same clean-up as Ctrl-C: pytest
tears its fixtures down, `asyncio.run` cancels its tasks, and context managers stop their
processes.
"""

from __future__ import annotations

import signal
from types import FrameType


def _unwind(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def unwind_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _unwind)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # Started in the background (`.ci/run &`, nohup): the shell made SIGINT ignored, and so
        # it would be in every process the run starts, as no terminal leaves it. `relais up`
        # leaves an inherited SIG_IGN alone, so its tests' Ctrl-C would never arrive.
        signal.signal(signal.SIGINT, signal.default_int_handler)
