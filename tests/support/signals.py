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
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

# How long a pytest-xdist controller waits for its workers to unwind (a 3-node cluster's
# tear-down takes seconds) before it goes on ending the run.
_CHILDREN_UNWIND = 30.0
# Then how long the processes they left get to stop on SIGTERM, before SIGKILL.
_LEFT_UNWIND = 10.0


def _unwind(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _ignore(signum: int, _frame: FrameType | None) -> None:
    """Ignores the signal here, yet (being a handler) leaves the default to programs run."""


def _unwind_children_first(signum: int, frame: FrameType | None) -> None:
    """The children (pytest-xdist workers) get the signal first, and this process unwinds once
    the processes they started (the servers) are gone: its own unwinding would end the workers
    on the spot, their clean-up undone. What a worker has not stopped in time (or could not:
    seen with a worker whose session had already been interrupted) gets the signal itself, then
    SIGKILL, so that no server outlives the run."""
    children = _descendants({os.getpid()}, depth=1)
    _signal_all(children, signum)
    if not _wait_gone(lambda: _descendants(set(children)), _CHILDREN_UNWIND):
        left = _descendants(set(children))
        _signal_all(left, signal.SIGTERM)
        if not _wait_gone(lambda: left, _LEFT_UNWIND):
            _signal_all(left, signal.SIGKILL)
    _unwind(signum, frame)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(processes: Callable[[], list[int]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in processes()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _descendants(roots: set[int], depth: int | None = None) -> list[int]:
    """The live processes below `roots` (their children, theirs, ...; `depth` levels at most)."""
    parent_of = {pid: parent for pid in _pids() if (parent := _parent(pid)) is not None}
    found: list[int] = []
    level = roots
    while level and (depth is None or depth > 0):
        level = {pid for pid, parent in parent_of.items() if parent in level and _running(pid)}
        found += sorted(level)
        depth = None if depth is None else depth - 1
    return found


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if len(fields) > 1 else None


def _running(pid: int) -> bool:
    """Alive and not yet a zombie (reaping it is its parent's business, not ours)."""
    state = _stat(pid)[:1]
    return bool(state) and state != ["Z"]


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command's name: state, parent pid, ...; empty once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def unwind_on_sigterm(*, children_first: bool = False) -> None:
    """`children_first`: for a pytest-xdist controller, whose workers run the tests (and start
    the servers); its own unwinding would end them on the spot."""
    signal.signal(signal.SIGTERM, _unwind_children_first if children_first else _unwind)
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
