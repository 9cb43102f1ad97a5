"""The MX sinks record exactly what clients send and reply as programmed."""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Callable

import aiosmtplib
import pytest

from tests.support.certs import TestPKI
from tests.support.smtp_sink import DATA_OK_REPLY, TEMPFAIL_REPLY, SMTPSink

MakeSink = Callable[..., SMTPSink]
MESSAGE = b"From: a@sender.test\r\nTo: b@rcpt.test\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


def reply_code(reply: str) -> int:
    return int(reply.split()[0])


def test_two_sinks_on_one_port_record_separately(make_sink: MakeSink, sink_port: int) -> None:
    mx1, mx2 = make_sink("127.0.0.2"), make_sink("127.0.0.3")
    assert mx1.port == mx2.port == sink_port
    with smtplib.SMTP("127.0.0.2", sink_port, local_hostname="client.test") as client:
        client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    with smtplib.SMTP("127.0.0.3", sink_port) as client:
        client.sendmail("c@sender.test", ["d@rcpt.test"], MESSAGE)

    (got1,) = mx1.wait_for(1, timeout=5)
    (got2,) = mx2.wait_for(1, timeout=5)
    assert (got1.mail_from, got1.rcpt_tos, got1.helo) == ("a@sender.test", ["b@rcpt.test"], "client.test")
    assert (got2.mail_from, got2.rcpt_tos) == ("c@sender.test", ["d@rcpt.test"])
    # smtplib dot-stuffs ".leading dot"; the sink records the unstuffed original bytes.
    assert got1.data == MESSAGE
    assert got1.parsed()["Subject"] == "hi"
    assert not got1.tls
    assert mx1.connections == mx2.connections == 1


def test_peer_is_the_client_source_address(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    with smtplib.SMTP("127.0.0.2", sink_port, source_address=("127.0.0.5", 0)) as client:
        client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    (got,) = sink.wait_for(1, timeout=5)
    assert got.peer[0] == "127.0.0.5"


async def test_aiosmtplib_with_source_address_and_smtputf8(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.3")
    await aiosmtplib.send(
        "From: ü@sender.test\r\n\r\nhällo\r\n".encode(),
        sender="ü@sender.test",
        recipients=["b@rcpt.test"],
        mail_options=["SMTPUTF8"],
        hostname="127.0.0.3",
        port=sink_port,
        source_address=("127.0.0.5", 0),
        start_tls=False,
    )
    (got,) = await sink.async_wait_for(1, timeout=5)
    assert got.peer[0] == "127.0.0.5"
    assert got.mail_from == "ü@sender.test"
    # aiosmtpd upper-cases MAIL parameters.
    assert "SMTPUTF8" in got.mail_options


def test_null_sender_is_recorded_as_angle_brackets(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        client.sendmail("<>", ["postmaster@rcpt.test"], MESSAGE)
    assert sink.wait_for(1, timeout=5)[0].mail_from == "<>"


def test_tempfail_data_then_accept(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 2
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError) as failed:
                client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
            assert failed.value.smtp_code == reply_code(TEMPFAIL_REPLY)
            client.rset()
        client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    assert len(sink.wait_for(1, timeout=5)) == 1
    assert sink.data_commands == 3 and sink.tempfail_data == 0


def test_permanent_data_reply(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    sink.data_reply = "554 5.7.1 Message rejected as spam"
    with smtplib.SMTP("127.0.0.2", sink_port) as client, pytest.raises(smtplib.SMTPDataError) as failed:
        client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    assert failed.value.smtp_code == 554
    assert sink.messages == []


def test_rcpt_replies_accept_part_of_the_recipients(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"bad@rcpt.test": "550 5.1.1 No such user", "later@rcpt.test": "450 4.2.1 Busy"}
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        refused = client.sendmail(
            "a@sender.test", ["Bad@rcpt.test", "ok@rcpt.test", "later@rcpt.test"], MESSAGE
        )
    assert refused == {
        "Bad@rcpt.test": (550, b"5.1.1 No such user"),
        "later@rcpt.test": (450, b"4.2.1 Busy"),
    }
    assert sink.wait_for(1, timeout=5)[0].rcpt_tos == ["ok@rcpt.test"]


def test_rcpt_default_rejects_everyone_else(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = "550 5.1.1 No such user"
    sink.rcpt_replies = {"vip@rcpt.test": "250 2.1.5 Welcome"}
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        refused = client.sendmail("a@sender.test", ["vip@rcpt.test", "x@rcpt.test"], MESSAGE)
        assert set(refused) == {"x@rcpt.test"}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@sender.test", ["y@rcpt.test"], MESSAGE)
    assert sink.wait_for(1, timeout=5)[0].rcpt_tos == ["vip@rcpt.test"]


def test_delay_data_tarpits(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_data = 0.5
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    assert time.monotonic() - started >= 0.5
    # smtplib reports its read timeout as a disconnect.
    with smtplib.SMTP("127.0.0.2", sink_port, timeout=0.2) as client:
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)


def test_starttls_with_the_test_ca(make_sink: MakeSink, sink_port: int, pki: TestPKI) -> None:
    sink = make_sink("127.0.0.2", tls_context=pki.server_context())
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        # smtplib checks the certificate against the host it connected to: the IP SAN.
        client.starttls(context=pki.client_context())
        client.ehlo("client.test")
        client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    (got,) = sink.wait_for(1, timeout=5)
    assert got.tls and got.helo == "client.test"


async def test_starttls_by_mx_name_with_aiosmtplib(make_sink: MakeSink, sink_port: int, pki: TestPKI) -> None:
    sink = make_sink("127.0.0.3", tls_context=pki.server_context())
    client = aiosmtplib.SMTP(
        hostname="127.0.0.3", port=sink_port, start_tls=False, tls_context=pki.client_context()
    )
    async with client:
        await client.starttls(server_hostname="mx1.example.test")
        await client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    assert (await sink.async_wait_for(1, timeout=5))[0].tls


def test_wrong_certificate_fails_verification(make_sink: MakeSink, sink_port: int, pki: TestPKI) -> None:
    make_sink("127.0.0.2", tls_context=pki.wrong_server_context())
    with smtplib.SMTP("127.0.0.2", sink_port) as client, pytest.raises(ssl.SSLCertVerificationError):
        client.starttls(context=pki.client_context())


def test_require_tls_refuses_mail_before_starttls(make_sink: MakeSink, sink_port: int, pki: TestPKI) -> None:
    sink = make_sink("127.0.0.2", tls_context=pki.server_context(), require_tls=True)
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        client.ehlo("client.test")
        code, _ = client.mail("a@sender.test")
        assert code == 530
        client.starttls(context=pki.client_context())
        client.ehlo("client.test")
        client.sendmail("a@sender.test", ["b@rcpt.test"], MESSAGE)
    assert sink.wait_for(1, timeout=5)[0].tls


def test_host_without_sink_refuses(make_sink: MakeSink, sink_port: int) -> None:
    make_sink("127.0.0.2")
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.4", sink_port, timeout=2)


def test_wait_for_times_out_with_a_useful_message(make_sink: MakeSink) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    with pytest.raises(TimeoutError, match=r"received 0 of 1 messages.*connections=0"):
        sink.wait_for(1, timeout=0.1)


async def test_async_wait_for_times_out(make_sink: MakeSink) -> None:
    sink = make_sink("127.0.0.2")
    with pytest.raises(TimeoutError, match=r"127\.0\.0\.2"):
        await sink.async_wait_for(1, timeout=0.1)


def test_sink_restarts_and_reply_constant_is_what_clients_see(make_sink: MakeSink, sink_port: int) -> None:
    sink = make_sink("127.0.0.2")
    sink.stop()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.2", sink_port, timeout=2)
    sink.start()
    with smtplib.SMTP("127.0.0.2", sink_port) as client:
        client.ehlo()
        client.mail("a@sender.test")
        client.rcpt("b@rcpt.test")
        code, text = client.data(MESSAGE)
    assert f"{code} {text.decode()}" == DATA_OK_REPLY
