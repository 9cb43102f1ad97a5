"""The DATA byte budget of one ingress process (`ingress.max_buffered_bytes`).

Every session buffers its message in memory until JetStream has it, up to `max_message_size`
each, with transient copies on top during the hand-off; without a budget, enough concurrent
large messages exhaust the process. Each session reserves what it has received as it arrives
and gives it all back when its DATA ends, however it ends (queued, refused, broker error,
disconnect, timeout). A session that cannot reserve reads the rest of its message, discards it
and is answered 452 4.3.1, as Postfix answers when its queue is short of space.

Per process, like the connection gate: it protects this process's memory, and replicas do not
share memory.
"""

from __future__ import annotations


class ByteBudget:
    """Octets of DATA held by all sessions of this process; `capacity` 0 means no budget."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    @property
    def free(self) -> int | None:
        """Octets still free, or None without a budget."""
        return max(0, self.capacity - self.used) if self.capacity else None

    def reservation(self) -> Reservation:
        """An empty reservation for one message."""
        return Reservation(self)

    def _take(self, octets: int) -> bool:
        if self.capacity and self.used + octets > self.capacity:
            return False
        self.used += octets
        return True

    def _give(self, octets: int) -> None:
        self.used -= octets


class Reservation:
    """What one message holds of the budget: grown as its octets arrive, released once."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0

    def grow(self, octets: int) -> bool:
        """Reserve `octets` more; False (and nothing reserved) when the budget has no room."""
        if not self._budget._take(octets):
            return False
        self.held += octets
        return True

    def release(self) -> None:
        """Give back everything held; safe to call again (every path out of DATA calls it)."""
        if self.held:
            self._budget._give(self.held)
            self.held = 0
