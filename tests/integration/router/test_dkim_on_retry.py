"""A job deferred by the receiver comes back through the router for its retry: it must go out
with the signatures made on the first pass, not a second set, and they must still verify over
the bytes delivery sends (an SMTPUTF8 message with folded and non-ASCII fields; two To: fields,
which it had, are refused at submission now, as by Gmail)."""

from __future__ import annotations

import asyncio

from tests.integration.router.test_dkim_signing import _verify_all, _write_keys
from tests.support.relais import SENDER_DOMAIN, asubmit, wait_for_events

MESSAGE = (
    f"From: Acme Bücher <news@{SENDER_DOMAIN}>\r\n"
    "To: Someone <v@alpha.test>\r\n"
    "Cc: Another <w@alpha.test>\r\n"
    "Subject: Grüße =?utf-8?q?aus_K=C3=B6ln?= and a subject long enough\r\n"
    "\tto be folded onto a second line\r\n"
    "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    ".a line starting with a dot\r\n"
    f"{'x' * 990}\r\n"
    "Grüße\r\n"
).encode()


async def test_a_retried_job_keeps_its_one_set_of_signatures(make_stack, make_sink, zone, tmp_path) -> None:
    stack = await make_stack(dkim={SENDER_DOMAIN: _write_keys(tmp_path, zone)})
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1  # the first attempt is deferred; the retry is routed again
    code, text = await asubmit(
        stack.smtp_address,
        recipients=["v@alpha.test", "w@alpha.test"],
        data=MESSAGE,
        mail_options=["SMTPUTF8"],
    )
    assert code == 250, text
    (got,) = await sink.async_wait_for(1)
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred[0].attempt == 1, "delivered on the retry"
    assert got.data.count(b"DKIM-Signature:") == 2, "one signature per key, not one per pass"
    assert sorted(await asyncio.to_thread(_verify_all, got.data, zone)) == [b"ed25519-sha256", b"rsa-sha256"]
