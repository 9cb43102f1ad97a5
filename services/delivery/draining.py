"""What a draining delivery worker raises instead of starting what the grace period before its
kill was not sized for."""

from __future__ import annotations


class Stopping(Exception):
    """The worker is stopping: no new connection is opened and no message's final dot is sent,
    so no recipient has a verdict; the job goes back to the pool for another worker. Only a
    reply after a dot sent before the stop is still waited for (deploy/k8s: the grace period)."""
