"""`kill` (SIGTERM) unwinds a test run or a benchmark the way Ctrl-C does, and the programs a run
starts get the signals a terminal gives, even when the run was started in the background.

Python's default for SIGTERM is to die on the spot, skipping every `finally`, fixture teardown
and `with` exit, which leaves the nats-servers, services and sinks the run started running for
good. Raised as KeyboardInterrupt, the signal goes through the same clean-up as Ctrl-C: pytest
tears its fixtures down, `asyncio.run` cancels its tasks, and context managers stop their
processes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


def _unwind(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _ignore(signum: int, _frame: FrameType | None) -> None:
    """Ignores the signal here, yet (being a handler) leaves the default to programs run."""


def unwind_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _unwind)
    # A run started in the background (`.ci/run &`) or under `nohup` has SIGINT or SIGHUP
    # ignored, and so would every process it starts, since an ignored signal stays ignored
    # across exec. `relais up` leaves an inherited SIG_IGN alone, so its tests' Ctrl-C and closed
    # terminal would never arrive. A handled signal is reset to its default at exec: the programs
    # get what a terminal gives them, and this run still outlives a hang-up as it was asked to.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _ignore)


@contextlib.contextmanager
def handlers_restored(*signums: int) -> Iterator[None]:
    """The handlers of these signals as they were, put back on exit: for a test that installs
    its own (as `relais up` does when run in the test process)."""
    saved = {signum: signal.getsignal(signum) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
