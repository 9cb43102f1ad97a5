"""/metrics, /healthz and /readyz over real HTTP: counters after a run, readiness follows NATS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import smtplib
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from services.core.config import replace
from services.core.embedded import EmbeddedNats, free_port
from services.core.runtime import start_bus, start_health
from tests.support.prom import samples, value
from tests.support.relais import (
    ACCOUNT,
    PASSWORD,
    RelaisStack,
    ServiceProcess,
    asubmit,
    config_to_toml,
    message,
    wait_for_events,
)


def mail_from_a_domain_not_owned(address: tuple[str, int]) -> int:
    with smtplib.SMTP(*address, timeout=30) as client:
        client.ehlo("client.test")
        client.login(ACCOUNT, PASSWORD)
        code, _ = client.mail("someone@not-owned.test")
        return code


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def aget(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, url)


async def until_ready(base: str, proc: ServiceProcess, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Until the service's /readyz answers 200; its log in the failure otherwise."""
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status, _ = await aget(f"{base}/readyz")
        if status == 200:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{proc.name} never ready (last /readyz: {status}):\n{proc.log()}")


async def test_metrics_endpoint_counts_a_run_and_reports_queue_depth(stack: RelaisStack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"gone@alpha.test": "550 5.1.1 <gone@alpha.test>: no such user"}
    config = replace(stack.config, telemetry={"http_listen": f"127.0.0.1:{free_port()}"})
    bus = await start_bus(config, "test-metrics", attempts=5)
    health = await start_health(config, "delivery", bus, object())
    assert health is not None and health.address is not None
    base = f"http://{health.address[0]}:{health.address[1]}"
    try:
        before = samples((await aget(f"{base}/metrics"))[1])
        for i in range(3):
            code, _ = await asubmit(stack.smtp_address, recipients=[f"r{i}@alpha.test"], data=message())
            assert code == 250
        code, _ = await asubmit(stack.smtp_address, recipients=["gone@alpha.test"], data=message())
        assert code == 250
        refused = await asyncio.to_thread(mail_from_a_domain_not_owned, stack.smtp_address)
        assert refused >= 500
        await sink.async_wait_for(3)
        await wait_for_events(stack.config.nats.url, "delivered", 3)
        await wait_for_events(stack.config.nats.url, "bounced", 1)

        status, text = await aget(f"{base}/metrics")
        assert status == 200
        after = samples(text)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("relais_accepted_messages_total", account="acme") == 4
        assert delta("relais_accepted_recipients_total", account="acme") == 4
        assert delta("relais_recipients_total", outcome="delivered", pool="default") == 3
        assert delta("relais_recipients_total", outcome="bounced", pool="default") == 1
        assert delta("relais_bounces_total", pool="default") == 1
        assert delta("relais_delivery_latency_seconds_count", pool="default") == 3
        # (>=: the DSN of the bounce is a message of its own, routed and attempted too)
        assert delta("relais_attempt_duration_seconds_count", pool="default") >= 4
        # New mail, the DSN included, is routed from relais.submit.
        assert delta("relais_processed_total", consumer="router-submit", result="ack") >= 4
        assert delta("relais_published_total", subject="relais.submit") >= 4
        assert delta("relais_smtp_sessions_total", direction="inbound") >= 5
        assert delta("relais_delivery_connections_opened_total") >= 1  # delivery's collector
        assert delta("relais_rejected_total") >= 1
        assert delta("relais_tls_recipients_total", direction="inbound", version="none") == 4
        assert delta("relais_tls_recipients_total", direction="outbound") >= 3
        assert delta("relais_dns_cache_hits_total") + delta("relais_dns_cache_misses_total") >= 1
        # Queue depth and lag are read from JetStream at scrape time, for this service's consumers.
        assert ("relais_consumer_pending", frozenset({("consumer", "delivery-default")})) in after
        assert ("relais_stream_messages", frozenset({("stream", "RELAIS_DELIVER")})) in after
        sites = {dict(lbl).get("site") for (n, lbl) in after if n == "relais_recipients_total"}
        assert sites & {"alpha.test", "mx.alpha.test"}

        assert await aget(f"{base}/healthz") == (200, "ok\n")
        status, body = await aget(f"{base}/readyz")
        assert status == 200, body
        assert "nats: ok" in body and "topology: ok" in body and "listeners: ok" in body
        assert (await aget(f"{base}/nope"))[0] == 404
    finally:
        await health.stop()
        await bus.close()


async def test_readyz_fails_when_nats_goes_away(nats_server: EmbeddedNats, stack: RelaisStack) -> None:
    config = replace(stack.config, telemetry={"http_listen": f"127.0.0.1:{free_port()}"})
    bus = await start_bus(config, "test-ready", attempts=5)
    health = await start_health(config, "router", bus, object())
    assert health is not None and health.address is not None
    base = f"http://{health.address[0]}:{health.address[1]}"
    try:
        assert (await aget(f"{base}/readyz"))[0] == 200
        nats_server.stop()
        deadline = time.monotonic() + 15
        for _ in range(100):
            status, body = await aget(f"{base}/readyz")
            if status != 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 503 and "nats: FAIL" in body, body
        assert (await aget(f"{base}/healthz"))[0] == 200, "alive, just not ready"
    finally:
        await health.stop()
        with contextlib.suppress(Exception):  # the connection is gone; closing may say so
            await asyncio.wait_for(bus.nc.close(), 5)
        nats_server.start()


async def test_a_service_process_serves_health_and_its_consumer_lag(
    stack: RelaisStack, tmp_path: Path
) -> None:
    port = free_port()
    config = replace(stack.config, telemetry={"http_listen": f"127.0.0.1:{port}"})
    path = tmp_path / "relais.toml"
    path.write_text(config_to_toml(config))
    proc = ServiceProcess("router", path, tmp_path)
    proc.start()
    try:
        await until_ready(f"http://127.0.0.1:{port}", proc)
        _, text = await aget(f"http://127.0.0.1:{port}/metrics")
        assert 'relais_consumer_pending{consumer="router-submit"}' in text
        assert 'relais_consumer_pending{consumer="router"}' in text
    finally:
        proc.stop()


async def test_a_stopping_ingress_is_not_ready_while_it_drains(stack: RelaisStack, tmp_path: Path) -> None:
    # Kubernetes keeps sending new connections to a pod whose /readyz says 200 until the
    # endpoint is removed; from SIGTERM on, a draining ingress must say it is not ready.
    http_port, smtp_port = free_port(), free_port()
    config = replace(
        stack.config,
        telemetry={"http_listen": f"127.0.0.1:{http_port}"},
        ingress={"listen": f"127.0.0.1:{smtp_port}"},
    )
    path = tmp_path / "relais.toml"
    path.write_text(config_to_toml(config))
    proc = ServiceProcess("ingress", path, tmp_path)
    proc.start()
    assert proc.process is not None
    base = f"http://127.0.0.1:{http_port}"
    try:
        await until_ready(base, proc)
        mail = message()

        def start_data() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", smtp_port), timeout=30)
            sock.recv(200)
            auth = base64.b64encode(f"\0{ACCOUNT}\0{PASSWORD}".encode()).decode()
            sock.sendall(f"EHLO c.test\r\nAUTH PLAIN {auth}\r\n".encode())
            sock.sendall(b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n")
            received = b""
            while b"354 " not in received:
                received += sock.recv(4096)
            sock.sendall(mail[:100])
            return sock

        sock = await asyncio.to_thread(start_data)
        try:
            proc.process.send_signal(signal.SIGTERM)
            status, body = 200, ""
            for _ in range(50):
                status, body = await aget(f"{base}/readyz")
                if status != 200:
                    break
                await asyncio.sleep(0.1)
            assert proc.process.poll() is None, "the DATA in progress keeps it draining"
            assert status == 503 and "running: FAIL (stopping)" in body, body
            assert (await aget(f"{base}/healthz"))[0] == 200, "alive while it drains"

            def finish() -> bytes:
                sock.sendall(mail[100:] + b"\r\n.\r\n")
                answer = b""
                while not answer.endswith(b"\r\n"):
                    answer += sock.recv(4096)
                return answer

            assert (await asyncio.to_thread(finish)).startswith(b"250 "), proc.log()
        finally:
            sock.close()
        assert await asyncio.to_thread(proc.process.wait, 30) == 0, proc.log()
    finally:
        proc.stop()
