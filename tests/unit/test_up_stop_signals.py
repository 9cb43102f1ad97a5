"""Which signals stop `relais up`: SIGTERM always; Ctrl-C (SIGINT) and a closed terminal (SIGHUP)
unless the shell started it with them ignored (`nohup`, a background job), as Unix commands do.
And which stop it at once, once a stop is under way: another Ctrl-C or SIGTERM, not a SIGHUP."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from services.up import StopRequests, _on_stop_signals
from tests.support.signals import handlers_restored

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture
def restored_signals() -> Iterator[None]:
    with handlers_restored(*SIGNALS):
        yield


def _stop(*_: object) -> None:
    pass


def test_each_stop_signal_stops_it(restored_signals: None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _on_stop_signals(_stop)
    assert all(signal.getsignal(sig) is _stop for sig in SIGNALS)


@pytest.mark.parametrize("ignored", [signal.SIGINT, signal.SIGHUP], ids=["background-job", "nohup"])
def test_a_signal_ignored_at_start_stays_ignored(restored_signals: None, ignored: signal.Signals) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN if sig == ignored else signal.SIG_DFL)
    _on_stop_signals(_stop)
    assert signal.getsignal(ignored) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is _stop
    other = signal.SIGHUP if ignored == signal.SIGINT else signal.SIGINT
    assert signal.getsignal(other) is _stop


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM)],
)
def test_a_second_ctrl_c_or_sigterm_stops_at_once(first: signal.Signals, second: signal.Signals) -> None:
    requests = StopRequests()
    requests(first)
    assert requests.stopping() and not requests.at_once()
    requests(second)
    assert requests.at_once()


def test_a_closed_terminal_hanging_up_twice_still_stops_gracefully() -> None:
    # The shell sends its jobs SIGHUP, and the kernel the terminal's foreground group once the
    # shell has exited: `relais up` hears both.
    requests = StopRequests()
    requests(signal.SIGHUP)
    requests(signal.SIGHUP)
    assert requests.stopping() and not requests.at_once()


def test_after_a_stop_it_began_itself_the_first_signal_stops_at_once() -> None:
    # A service failed: the stop is under way without a signal, and a Ctrl-C then is impatience.
    requests = StopRequests()
    requests.under_way()
    assert not requests.at_once()
    requests(signal.SIGINT)
    assert requests.at_once()
