"""DKIM through the whole pipeline: signed once by the router, prepended by delivery, verified
by dkimpy at the receiving sink with public keys served by the loopback DNS server."""

from __future__ import annotations

import asyncio
import email
from pathlib import Path

import dkim as dkimpy
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from services.core.config import DkimKeyConfig
from services.core.metrics import REGISTRY
from services.core.topology import route_subject
from services.router.dkim import public_txt
from tests.integration.router.conftest import asubmit_many
from tests.support.dns_server import DNSServer
from tests.support.relais import SENDER_DOMAIN, an_envelope, message


def _write_keys(tmp_path: Path, zone: DNSServer) -> list[DkimKeyConfig]:
    keys = {
        "rsa2026": ("rsa-sha256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ed2026": ("ed25519-sha256", ed25519.Ed25519PrivateKey.generate()),
    }
    configs = []
    for selector, (algorithm, key) in keys.items():
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = tmp_path / f"{selector}.pem"
        path.write_bytes(pem)
        zone.add(f"{selector}._domainkey.{SENDER_DOMAIN}", "TXT", public_txt(pem))
        configs.append(DkimKeyConfig(selector=selector, key_file=str(path), algorithm=algorithm))
    return configs


def _verifier(zone: DNSServer):  # dkimpy's dnsfunc
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [zone.host]
    resolver.port = zone.port

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)  # type: ignore[attr-defined]

    return txt


def _verify_all(data: bytes, zone: DNSServer) -> list[bytes]:
    """Verify every DKIM-Signature; return the algorithms (a=) that verified."""
    verifier = dkimpy.DKIM(data)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    verified = []
    for i in range(count):
        assert verifier.verify(i, dnsfunc=_verifier(zone)), f"signature {i} does not verify"
        verified.append(verifier.signature_fields[b"a"])
    return verified


async def test_rsa_and_ed25519_signatures_verify_at_the_receiver(
    make_stack, make_sink, zone, tmp_path
) -> None:
    stack = await make_stack(dkim={SENDER_DOMAIN: _write_keys(tmp_path, zone)})
    sink = make_sink("127.0.0.2")
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", ["v@alpha.test"], message())])
    (got,) = await sink.async_wait_for(1)
    assert got.data.startswith(b"DKIM-Signature: ")
    algorithms = await asyncio.to_thread(_verify_all, got.data, zone)
    assert sorted(algorithms) == [b"ed25519-sha256", b"rsa-sha256"]
    header = got.parsed()["DKIM-Signature"]
    assert "from : from" in header.replace("\r\n", "").replace("\n", ""), "From is over-signed"
    # Reply-To is over-signed although absent: adding one after signing breaks both signatures.
    head, _, body = got.data.partition(b"\r\n\r\n")
    tampered = head + b"\r\nReply-To: <evil@bad.test>\r\n\r\n" + body
    verifier = dkimpy.DKIM(tampered)
    for i in range(2):
        assert not await asyncio.to_thread(verifier.verify, i, dnsfunc=_verifier(zone))


async def test_a_large_multi_domain_message_is_signed_once_and_verifies_everywhere(
    make_stack, make_sink, zone, tmp_path
) -> None:
    stack = await make_stack(
        nats={"inline_body_max": 4096}, dkim={SENDER_DOMAIN: _write_keys(tmp_path, zone)}
    )
    alpha, beta = make_sink("127.0.0.2"), make_sink("127.0.0.3")
    big = message(body="".join(f"line {i} of a body stored in the Object Store\r\n" for i in range(3000)))
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", ["v@alpha.test", "w@beta.test"], big)])
    (a,) = await alpha.async_wait_for(1)
    (b,) = await beta.async_wait_for(1)
    for got in (a, b):
        assert sorted(await asyncio.to_thread(_verify_all, got.data, zone)) == [
            b"ed25519-sha256",
            b"rsa-sha256",
        ]

    def signatures(data: bytes) -> list[str]:
        return [str(v) for v in email.message_from_bytes(data).get_all("DKIM-Signature", [])]

    assert signatures(a.data) == signatures(b.data), "one signing for both recipient domains"


async def test_a_sender_domain_without_keys_is_sent_unsigned(make_stack, make_sink, zone, tmp_path) -> None:
    stack = await make_stack(dkim={"other.test": _write_keys(tmp_path, zone)})
    sink = make_sink("127.0.0.2")
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", ["v@alpha.test"], message())])
    (got,) = await sink.async_wait_for(1)
    assert b"DKIM-Signature" not in got.data


def _sign_failures(reason: str) -> float:
    return REGISTRY.get_sample_value("relais_dkim_sign_failures_total", {"reason": reason}) or 0.0


async def test_a_message_the_signer_cannot_parse_is_sent_unsigned_and_counted(
    make_stack, make_sink, zone, tmp_path
) -> None:
    """dkimpy raises IndexError (not a DKIMException) when the first header line is a
    continuation line; the message must still go out, unsigned, rather than be retried for ever."""
    stack = await make_stack(
        services=("router", "delivery"), dkim={SENDER_DOMAIN: _write_keys(tmp_path, zone)}
    )
    sink = make_sink("127.0.0.2")
    data = b" continued: x\r\nFrom: <news@acme.test>\r\nSubject: odd\r\n\r\nHello.\r\n"
    env = an_envelope("v@alpha.test", body=data)
    before = _sign_failures("message")
    await stack._buses[0].publish(route_subject(), env.to_msgpack())
    (got,) = await sink.async_wait_for(1)
    assert b"DKIM-Signature" not in got.data and got.data.endswith(b"Hello.\r\n")
    assert _sign_failures("message") == before + 1
