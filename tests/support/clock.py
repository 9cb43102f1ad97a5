"""An ingress host whose wall clock is off the NATS servers' (a VM after a suspend, NTP broken),
with the servers on this machine's clock: no mock of NATS, only of the clock the ingress reads."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest


def skew_ingress_clock(monkeypatch: pytest.MonkeyPatch, offset: float) -> SimpleNamespace:
    """`time.time` as every loaded ingress module reads it, `offset` seconds off this machine's;
    the monotonic clock is unchanged. Returns that clock: set its `offset` to step it."""
    clock = SimpleNamespace(**vars(time))
    clock.offset = offset
    clock.time = lambda: time.time() + clock.offset
    for name, module in list(sys.modules.items()):
        if name.startswith("services.ingress.") and getattr(module, "time", None) is time:
            monkeypatch.setattr(module, "time", clock)
    return clock
