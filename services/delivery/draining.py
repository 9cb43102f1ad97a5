"""What a draining delivery worker raises instead of starting what the grace period before its
kill was not sized for, and how long that grace period must be."""

from __future__ import annotations

from services.core.bus import ACK_PATIENCE
from services.core.config import Config
from services.core.runtime import EXIT_SECONDS


class Stopping(Exception):
    """The worker is stopping: no new connection is opened and no message's final dot is sent,
    so no recipient has a verdict; the job goes back to the pool for another worker. Only a
    reply after a dot sent before the stop is still waited for (deploy/k8s: the grace period)."""


def stop_seconds(config: Config) -> float:
    """The longest a worker takes from SIGTERM to its exit, each wait running to its timeout:
    the last of a message whose final dot is sent before the stop leaving without progress
    (command_timeout), the reply after the dot (data_done_timeout), the outcome stored and the
    ack confirmed through a leader election (2 x bus.ACK_PATIENCE), then the exit. A kill
    sooner can send mail twice: the MX may have taken it, and the job comes back. The grace
    period in deploy/k8s holds this, and `relais up` waits this long for delivery."""
    d = config.delivery
    return d.command_timeout + d.data_done_timeout + 2 * ACK_PATIENCE + EXIT_SECONDS
