"""The envelope codec is the contract between services: it must round-trip exactly."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from services.core.bus import Poison, Retry, undecodable
from services.core.envelope import (
    NEXT_SCHEMA,
    SCHEMA_VERSION,
    Attempt,
    BodyRef,
    BounceNotice,
    Envelope,
    EnvelopeDecodeError,
    NewerSchema,
    Verdict,
    job_msg_id,
    new_message_id,
)
from services.core.outcome import Bounced, Delivered, Reply
from tests.support.relais import an_envelope


def _envelope(**kw: object) -> Envelope:
    fields: dict[str, Any] = {"body": b"hi\r\n\x00\xff", "received_at": 1700000000.25} | kw
    return an_envelope("a@x.test", "b@x.test", **fields)


def test_round_trip_keeps_every_field() -> None:
    env = _envelope(
        job_id="abc-0",
        pool="p1",
        domain="x.test",
        site="google",
        mx_hosts=("mx1.x.test", "mx2.x.test"),
        attempts=(Attempt(1.5, Reply(451, "4.3.0", "later", "DATA"), "mx1.x.test", "127.0.0.5"),),
        trace_context="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        kind="dsn",
        dsn_ret="FULL",
        dsn_envid="env-1",
        client_ip="127.0.0.1",
        meta={"tls": "TLSv1.3 TLS_AES_256_GCM_SHA384"},
    )
    assert Envelope.from_msgpack(env.to_msgpack()) == env


def test_raw_body_bytes_are_carried_untouched() -> None:
    body = bytes(range(256)) * 3
    env = _envelope(body=BodyRef(size=len(body), inline=body))
    assert Envelope.from_msgpack(env.to_msgpack()).body.inline == body


def test_stored_body_reference_round_trips() -> None:
    env = _envelope(body=BodyRef(size=10_000_000, object_name="0123"))
    decoded = Envelope.from_msgpack(env.to_msgpack())
    assert decoded.body == BodyRef(size=10_000_000, object_name="0123")
    assert not decoded.body.is_inline


def test_a_later_schema_version_is_refused_as_a_later_releases() -> None:
    wire = msgpack.unpackb(_envelope().to_msgpack())
    wire["v"] = SCHEMA_VERSION + 1
    with pytest.raises(NewerSchema) as caught:
        Envelope.from_msgpack(msgpack.packb(wire))
    # Left for an upgraded replica; terminating it would drop accepted mail.
    assert isinstance(undecodable(caught.value), Retry)


@pytest.mark.parametrize("version", [0, "1", None])
def test_an_unknown_schema_version_is_poison(version: object) -> None:
    wire = msgpack.unpackb(_envelope().to_msgpack())
    wire["v"] = version
    with pytest.raises(EnvelopeDecodeError) as caught:
        Envelope.from_msgpack(msgpack.packb(wire))
    assert isinstance(undecodable(caught.value), Poison)


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2])])
def test_garbage_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(EnvelopeDecodeError):
        Envelope.from_msgpack(payload)


def test_bounce_notice_round_trip() -> None:
    notice = BounceNotice(
        envelope=_envelope(job_id="j-1"),
        failures=(
            Bounced("a@x.test", Reply(550, "5.1.1", "no such user", "RCPT"), "mx1.x.test"),
            Bounced(
                "b@x.test",
                Reply(554, "4.4.7", "expired; last reply: 450", "RCPT"),
                "mx1.x.test",
                expired=True,
            ),
        ),
        releases_body=False,
    )
    decoded = BounceNotice.from_msgpack(notice.to_msgpack())
    assert decoded == notice
    assert [f.expired for f in decoded.failures] == [False, True], "expiry is per recipient"


@pytest.mark.parametrize("expired", [True, False])
def test_a_notice_from_before_per_failure_expiry_still_decodes(expired: bool) -> None:
    wire = msgpack.unpackb(
        BounceNotice(_envelope(), (Bounced("a@x.test", Reply(451, "4.4.1", "no route")),)).to_msgpack()
    )
    for failure in wire["failures"]:
        del failure["exp"]
    wire["expired"] = expired
    (failure,) = BounceNotice.from_msgpack(msgpack.packb(wire)).failures
    assert failure.expired is expired


def test_a_notice_with_relayed_recipients_round_trips_as_the_next_schema() -> None:
    # A bounce service of the release before would send a DSN of its failures only and release
    # the body: this notice must look newer to it, and be left for an upgraded replica.
    notice = BounceNotice(
        _envelope(job_id="j-1"),
        (Bounced("b@x.test", Reply(550, "5.1.1", "no such user", "RCPT"), "mx.x.test"),),
        relayed=(Delivered("a@x.test", Reply(250, "2.0.0", "queued", "DATA"), "mx.x.test"),),
    )
    assert msgpack.unpackb(notice.to_msgpack())["v"] == NEXT_SCHEMA
    assert BounceNotice.from_msgpack(notice.to_msgpack()) == notice
    failures_only = BounceNotice(_envelope(), notice.failures)
    assert msgpack.unpackb(failures_only.to_msgpack())["v"] == SCHEMA_VERSION
    # Its own body reference: an older bounce service would never release it.
    holding = BounceNotice(_envelope(), notice.failures, releases_body=False, holds_body="j-1#bn1")
    assert msgpack.unpackb(holding.to_msgpack())["v"] == NEXT_SCHEMA
    assert BounceNotice.from_msgpack(holding.to_msgpack()) == holding


def test_verdict_round_trip() -> None:
    verdict = Verdict(
        _envelope(job_id="j-1"), Reply(451, "4.4.3", "DNS failed", "DNS"), False, 1.7e9 + 0.5, 0.25
    )
    assert Verdict.from_msgpack(verdict.to_msgpack()) == verdict


def test_a_verdict_with_suppressed_recipients_round_trips_as_the_next_schema() -> None:
    # A router of the release before reads only bounce-or-defer verdicts: this one must look
    # newer to it (left for an upgraded replica), not malformed (dropped).
    verdict = Verdict(_envelope(job_id="j-1"), None, False, 1.0, 0.5, ("a@x.test",), "hard_bounce")
    wire = msgpack.unpackb(verdict.to_msgpack())
    assert wire["v"] == NEXT_SCHEMA > SCHEMA_VERSION
    assert Verdict.from_msgpack(verdict.to_msgpack()) == verdict
    plain = Verdict(_envelope(), Reply(550, "5.1.2", "no domain"), True, 1.0, 0.5)
    assert msgpack.unpackb(plain.to_msgpack())["v"] == SCHEMA_VERSION
    with pytest.raises(NewerSchema):
        Envelope.from_msgpack(msgpack.packb({**wire["envelope"], "v": NEXT_SCHEMA}))


def test_a_verdict_without_its_decision_time_is_poison() -> None:
    wire = msgpack.unpackb(
        Verdict(_envelope(), Reply(550, "5.1.2", "no domain"), True, 1.0, 0.5).to_msgpack()
    )
    del wire["at"]
    with pytest.raises(EnvelopeDecodeError):
        Verdict.from_msgpack(msgpack.packb(wire))


def test_a_jobs_verdict_and_delivery_job_share_one_msg_id_per_attempt() -> None:
    job = _envelope(job_id="m-3")
    retried = job.with_attempt(Attempt(1.0, Reply(451, "4.4.3", "DNS failed", "DNS")))
    assert job_msg_id(job) == "m-3.0"
    assert job_msg_id(retried) == "m-3.1", "a retry is a new attempt, free to get another fate"


def test_message_ids_sort_by_time_and_do_not_collide() -> None:
    ids = [new_message_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(i.isalnum() for i in ids)


def test_key_is_job_id_once_routed() -> None:
    env = _envelope()
    assert env.key == env.id
    assert _envelope(job_id="m-3").key == "m-3"


def test_late_store_guard_only_applies_to_the_ingress_copy() -> None:
    env = _envelope(accept_by=1000.0)
    assert not env.refused_when_stored_at(1001.0), "within the clock margin: keep"
    assert env.refused_when_stored_at(1010.0)
    assert not _envelope().refused_when_stored_at(1e12), "no deadline recorded: never refused"
    assert not _envelope(accept_by=1000.0, job_id="x-0").refused_when_stored_at(1e12), (
        "routed jobs are past it"
    )
