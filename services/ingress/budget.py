"""The DATA byte budget of one ingress process (`ingress.max_buffered_bytes`).

Every session buffers its message in memory until JetStream has it, up to `max_message_size`
each, with transient copies on top during the hand-off; without a budget, enough concurrent
large messages exhaust the process. Each session reserves what it has received as it arrives
and gives it all back when its DATA ends, however it ends (queued, refused, broker error,
disconnect, timeout). A session that cannot reserve reads the rest of its message, discards it
and is answered 452 4.3.1, as Postfix answers when its queue is short of space.

The inbound listener's sessions (port 25: anyone on the internet, no account) may together
hold only half of it, or one message of the largest size when that is more: a few anonymous
clients sending large messages slowly must not refuse every account's mail, and the largest
message must still fit.

Per process, like the connection gate: it protects this process's memory, and replicas do not
share memory.
"""

from __future__ import annotations


class ByteBudget:
    """Octets of DATA held by all sessions of this process; `capacity` 0 means no budget."""

    def __init__(self, capacity: int, *, largest: int = 0) -> None:
        self.capacity = capacity
        # What the inbound listener's sessions may hold together (`largest`: the largest
        # message allowed, 0 for none).
        self.anonymous_share = max(capacity // 2, min(largest, capacity))
        self.used = 0
        self.anonymous = 0  # the part of `used` held by the inbound listener's sessions

    @property
    def free(self) -> int | None:
        """Octets still free to an authenticated session, or None without a budget."""
        return self.room(anonymous=False)

    def room(self, *, anonymous: bool) -> int | None:
        """Octets a session may still reserve, or None without a budget."""
        if not self.capacity:
            return None
        room = self.capacity - self.used
        if anonymous:
            room = min(room, self.anonymous_share - self.anonymous)
        return max(0, room)

    def reservation(self, *, anonymous: bool = False) -> Reservation:
        """An empty reservation for one message."""
        return Reservation(self, anonymous)

    def _take(self, octets: int, anonymous: bool) -> bool:
        room = self.room(anonymous=anonymous)
        if room is not None and octets > room:
            return False
        self.used += octets
        if anonymous:
            self.anonymous += octets
        return True

    def _give(self, octets: int, anonymous: bool) -> None:
        self.used -= octets
        if anonymous:
            self.anonymous -= octets


class Reservation:
    """What one message holds of the budget: grown as its octets arrive, released once."""

    def __init__(self, budget: ByteBudget, anonymous: bool) -> None:
        self._budget = budget
        self._anonymous = anonymous
        self.held = 0

    def grow(self, octets: int) -> bool:
        """Reserve `octets` more; False (and nothing reserved) when the budget has no room."""
        if not self._budget._take(octets, self._anonymous):
            return False
        self.held += octets
        return True

    def release(self) -> None:
        """Give back everything held; safe to call again (every path out of DATA calls it)."""
        if self.held:
            self._budget._give(self.held, self._anonymous)
            self.held = 0
