"""MTA-STS policy hosts: HTTPS on loopback with the test PKI. `PolicyServer` answers requests
with canned responses; a `RawTlsHost` subclass plays a connection by hand, for what an HTTP
server cannot: a response dripped byte by byte, a connection ended without close_notify."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

# The policy host by IP literal, or by the name RFC 8461 gives it (known to the test zone only).
LITERAL = "https://127.0.0.1:{port}/{domain}"
NAMED = "https://mta-sts.{domain}:{port}/{domain}"

Response = tuple[int, dict[str, str], bytes]


def text_plain(body: bytes, content_type: str = "text/plain") -> Response:
    return 200, {"Content-Type": content_type, "Content-Length": str(len(body))}, body


class _Handler(BaseHTTPRequestHandler):
    server: PolicyServer

    def do_GET(self) -> None:
        self.server.requests.append((self.headers.get("Host", ""), self.path))
        status, headers, body = self.server.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class PolicyServer(ThreadingHTTPServer):
    """HTTPS (HTTP/1.0 responses, closed after each) on 127.0.0.1; `routes` maps a request path
    to its response (404 otherwise). Records TCP `connections` (counted before any TLS), the SNI
    name of each handshake in `server_names` and the (Host, path) of each request in `requests`."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Response] = {}
        self.connections = 0
        self.requests: list[tuple[str, str]] = []
        self.server_names: list[str | None] = []
        context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        self._tls = context

    def get_request(self) -> tuple[socket.socket, object]:
        sock, peer = self.socket.accept()
        self.connections += 1
        return self._tls.wrap_socket(sock, server_side=True), peer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading a long body is expected here

    def url(self, template: str) -> str:
        """`template` (LITERAL, NAMED) with this server's port, `{domain}` left to fill."""
        return template.format(port=self.server_address[1], domain="{domain}")


@contextlib.contextmanager
def serving_policies(context: ssl.SSLContext) -> Iterator[PolicyServer]:
    """A PolicyServer presenting `context`'s certificate, serving on a thread until exit."""
    server = PolicyServer(context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class RawTlsHost(ABC):
    """A TCP listener on 127.0.0.1 (a free port) whose connections, accepted one at a time on a
    thread while in a `with` block, go to `_answer` before any TLS; `connections` counts them."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            self.connections += 1
            sock.settimeout(5)
            self._answer(sock)

    @abstractmethod
    def _answer(self, sock: socket.socket) -> None:
        """Play one connection to its end (socket errors included)."""
