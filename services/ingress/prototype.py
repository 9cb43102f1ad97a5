"""Per-connection set-up of aiosmtpd's SMTP protocol without its per-connection reflection."""

from __future__ import annotations

import asyncio
import ssl
import types
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP


class Prototype:
    """The state aiosmtpd's `SMTP.__init__` builds by reflection, captured once per listener.

    `SMTP.__init__` rebuilds its command, AUTH-mechanism and hook tables on every connection
    (`inspect.getmembers` over the protocol and the handler, `dir()` twice, `inspect.signature`):
    ~90 µs per connection, about 7% of the ingress' CPU when every message has its own
    connection. Those tables depend only on the class, the handler and the constructor arguments,
    which are the same for every connection of a listener. So the first connection runs the real
    `__init__`; later ones copy its attributes, with methods re-bound to the new connection.

    Only immutable values, the handler, bound methods and dicts/tuples of them are copied; if
    aiosmtpd ever keeps anything else per connection, every connection takes the real path.
    How each attribute is made again is worked out once, at capture (`_recipe`): values holding
    nothing of the first connection and nothing mutable are shared, in one `dict.update`; the
    method tables are copied, or re-bound from their functions, without looking at each entry
    again (that look cost ~10 µs per connection).
    """

    def __init__(self) -> None:
        self._key: tuple[type, Any, dict[str, Any]] | None = None
        self._state: dict[str, Any] | None = None
        self._shared: dict[str, Any] = {}
        self._rebuilt: dict[str, Callable[[object], Any]] = {}

    def capture(self, conn: SMTP, handler: Any, kwargs: dict[str, Any]) -> None:
        """Remember `conn`'s attributes right after `SMTP.__init__` (before anything else)."""
        if self._key is not None:
            return
        self._key = (type(conn), handler, dict(kwargs))
        transport_keys = _stream_protocol_attributes(getattr(conn, "loop", None))
        state = {k: v for k, v in vars(conn).items() if k not in transport_keys}
        if transport_keys and all(_copyable(value, conn, handler) for value in state.values()):
            self._state = state
            self._shared = {k: v for k, v in state.items() if _shareable(v, conn)}
            self._rebuilt = {k: _recipe(v, conn) for k, v in state.items() if k not in self._shared}

    def apply(self, conn: SMTP, handler: Any, kwargs: dict[str, Any]) -> bool:
        """Initialise `conn` like `SMTP.__init__` would; False when it must run the real thing."""
        state = self._state
        if state is None or self._key != (type(conn), handler, kwargs):
            return False
        loop = state.get("loop")
        if loop is None or _running_loop() is not loop:
            return False
        # What asyncio's StreamReaderProtocol owns is always fresh, built as SMTP.__init__ does.
        asyncio.StreamReaderProtocol.__init__(
            conn,
            asyncio.StreamReader(loop=loop, limit=conn.line_length_limit),
            client_connected_cb=conn._cb_client_connected,
            loop=loop,
        )
        own = vars(conn)
        own.update(self._shared)
        for name, make in self._rebuilt.items():
            own[name] = make(conn)
        return True


# Shared safely between connections (functions: aiosmtpd's default AUTH callback).
_IMMUTABLE = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    types.FunctionType,
    ssl.SSLContext,
    asyncio.AbstractEventLoop,
)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _stream_protocol_attributes(loop: asyncio.AbstractEventLoop | None) -> frozenset[str]:
    """The attributes asyncio.StreamReaderProtocol.__init__ sets (empty: cannot tell)."""
    if loop is None or _running_loop() is not loop:
        return frozenset()
    probe = asyncio.StreamReaderProtocol(
        asyncio.StreamReader(loop=loop), client_connected_cb=lambda reader, writer: None, loop=loop
    )
    return frozenset(vars(probe))


def _copyable(value: Any, conn: object, handler: Any) -> bool:
    if isinstance(value, _IMMUTABLE) or value is handler:
        return True
    if isinstance(value, types.MethodType):
        return value.__self__ is conn or value.__self__ is handler
    if isinstance(value, dict):
        return all(_copyable(v, conn, handler) for v in value.values())
    if isinstance(value, tuple):
        return all(_copyable(v, conn, handler) for v in value)
    return False


def _shareable(value: Any, conn: object) -> bool:
    """Whether every connection may hold `value` itself: nothing mutable, nothing of `conn`."""
    if isinstance(value, types.MethodType):
        return value.__self__ is not conn
    if isinstance(value, tuple):
        return all(_shareable(v, conn) for v in value)
    return not isinstance(value, dict)


def _recipe(value: Any, source: object) -> Callable[[object], Any]:
    """How to make `value`, an attribute of `source`, for another connection."""
    if isinstance(value, dict) and all(_shareable(v, source) for v in value.values()):
        return lambda conn: dict(value)  # the handler's hooks and AUTH mechanisms
    if isinstance(value, dict) and all(_method_of(v, source) for v in value.values()):
        functions = {name: method.__func__ for name, method in value.items()}
        return lambda conn: {name: types.MethodType(f, conn) for name, f in functions.items()}
    return lambda conn: _rebind(value, source, conn)


def _method_of(value: Any, conn: object) -> bool:
    return isinstance(value, types.MethodType) and value.__self__ is conn


def _rebind(value: Any, old: object, new: object) -> Any:
    if isinstance(value, types.MethodType):
        return types.MethodType(value.__func__, new) if value.__self__ is old else value
    if isinstance(value, dict):
        return {k: _rebind(v, old, new) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # e.g. aiosmtpd's _AuthMechAttr
        return type(value)(*(_rebind(v, old, new) for v in value))
    if isinstance(value, tuple):
        return tuple(_rebind(v, old, new) for v in value)
    return value
