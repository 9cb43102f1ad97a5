"""Every service's HTTP endpoint for Kubernetes and Prometheus: /healthz, /readyz, /metrics.

A deliberately tiny HTTP/1.1 server on asyncio (GET only, one request per connection), so the
probes run on the service's own event loop: if the loop is wedged, /healthz stops answering,
which is exactly what a liveness probe should see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from services.core import metrics

log = logging.getLogger(__name__)

# A readiness check answers (ok, detail); it must be cheap and bounded in time.
Check = Callable[[], Awaitable[tuple[bool, str]]]
Refresh = Callable[[], Awaitable[None]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class HealthServer:
    listen: str
    checks: Mapping[str, Check] = field(default_factory=dict)
    refresh: Refresh | None = None
    check_timeout: float = 3.0
    _server: asyncio.Server | None = None
    address: tuple[str, int] | None = None

    async def start(self) -> None:
        host, port = split_listen(self.listen)
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        log.info("health and metrics on http://%s:%s (/healthz /readyz /metrics)", *self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        results: dict[str, str] = {}
        ready = True
        for name, check in self.checks.items():
            try:
                ok, detail = await asyncio.wait_for(check(), self.check_timeout)
            except Exception as exc:
                ok, detail = False, f"check failed: {exc!r}"
            ready = ready and ok
            results[name] = ("ok" if ok else "FAIL") + (f" ({detail})" if detail else "")
        return ready, results

    async def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, results = await self.readiness()
            body = "".join(f"{name}: {state}\n" for name, state in results.items())
            return (200 if ready else 503), "text/plain", body.encode()
        if path == "/metrics":
            if self.refresh is not None:
                try:
                    await asyncio.wait_for(self.refresh(), self.check_timeout)
                except Exception as exc:
                    # Stale queue gauges are better than no metrics at all.
                    log.warning("refreshing queue metrics failed: %r", exc)
            return 200, metrics.CONTENT_TYPE, metrics.exposition()
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            for _ in range(100):  # headers are not needed: read up to the blank line
                if await asyncio.wait_for(reader.readline(), 5) in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"GET only\n"
            else:
                status, ctype, body = await self._respond(target)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
