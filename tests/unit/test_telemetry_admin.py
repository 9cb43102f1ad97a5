"""Pure parts of the admin commands: span trees, message history, pause keys, site matching."""

from __future__ import annotations

import pytest

from services.admin.history import arrival_of, render_history
from services.admin.queue import admin_bounce_reply, matches_site
from services.admin.status import Status, render_status
from services.admin.trace import render_message, render_tree, trace_ids_for
from services.core import telemetry as t
from services.core.envelope import BodyRef, Envelope
from services.core.events import Event
from services.core.pause import PauseError, parse_pause_key, pause_key

TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(span_id: str, parent: str, name: str, start_ms: int, dur_ms: int, **attrs: object) -> dict:
    return {
        "trace_id": TRACE,
        "span_id": span_id,
        "parent_id": parent,
        "name": name,
        "kind": "INTERNAL",
        "service": "relais-test",
        "start": start_ms * 1_000_000,
        "end": (start_ms + dur_ms) * 1_000_000,
        "attributes": attrs,
        "events": [],
        "links": [],
        "status": "UNSET",
    }


SPANS = [
    span("a" * 16, "", "smtp receive", 0, 12, **{t.MESSAGE_ID: "m1", t.ACCOUNT: "acme"}),
    span("b" * 16, "a" * 16, "send relais.route", 2, 3, **{t.MESSAGE_ID: "m1"}),
    span("c" * 16, "b" * 16, "process relais.route", 20, 5, **{t.MESSAGE_ID: "m1"}),
    span("d" * 16, "c" * 16, "send relais.deliver.default", 22, 1, **{t.POOL: "default"}),
    span(
        "e" * 16, "d" * 16, "process relais.deliver.default", 30, 40, **{t.ATTEMPT: 1, t.OUTCOME: "delivered"}
    ),
]
SPANS[4]["events"] = [
    {
        "name": "relais.delivered",
        "attributes": {t.REPLY_CODE: 250, t.ENHANCED_STATUS: "2.0.0", t.RECIPIENTS: "x@y"},
    }
]


def test_span_tree_nests_children_under_parents_with_durations_and_key_attributes() -> None:
    lines = render_tree(SPANS).splitlines()
    assert lines[0].startswith("+   0.000s  smtp receive  [test]  12.0 ms")
    assert "account=acme" in lines[0] and "message_id=m1" in lines[0]
    assert "└─ send relais.route" in lines[1]
    assert lines[4].index("process relais.deliver.default") > lines[2].index("process relais.route")
    assert "attempt=1" in lines[4] and "outcome=delivered" in lines[4]
    assert "• delivered 250 2.0.0 x@y" in lines[5]


def test_an_outcome_of_more_recipients_than_its_span_event_names_says_how_many_more() -> None:
    named = [f"r{i}@y" for i in range(t.RECIPIENTS_NAMED)]
    spans = [dict(s) for s in SPANS]
    spans[4]["events"] = [
        {"name": "relais.delivered", "attributes": {t.RECIPIENTS: ",".join(named), t.RECIPIENT_COUNT: 1000}}
    ]
    assert f"• delivered  {','.join(named)} (+{1000 - t.RECIPIENTS_NAMED} more)" in render_tree(spans)


def test_a_message_is_found_by_its_id_a_dsn_by_the_original_id() -> None:
    dsn = span("f" * 16, "e" * 16, "send relais.route", 80, 1, **{t.MESSAGE_ID: "dsn1", t.DSN_FOR: "m1"})
    other = dict(span("1" * 16, "", "smtp receive", 0, 1, **{t.MESSAGE_ID: "m2"}), trace_id="f" * 32)
    assert trace_ids_for([*SPANS, dsn, other], "m1") == [TRACE]
    assert trace_ids_for([*SPANS, dsn, other], "m2") == ["f" * 32]
    assert render_message(SPANS, "nope") is None
    assert render_message(SPANS, "m1").startswith(f"trace {TRACE}  (5 spans; test)")


def test_message_ids_encode_their_arrival_time() -> None:
    ms = 1_796_126_400_000  # 2026-12-01 12:00 UTC
    assert arrival_of(f"{ms:011x}" + "ab" * 6) == pytest.approx(ms / 1000)
    assert arrival_of("not-an-id") is None


def test_history_lists_each_step_with_its_reply_and_the_final_outcome() -> None:
    reply = {"code": 451, "enhanced": "4.3.0", "text": "try later", "command": "DATA"}
    events = [
        Event("accepted", "m1", "acme", ["x@alpha.test"], at=1000.0, sender="s@acme.test", trace_id=TRACE),
        Event(
            "deferred",
            "m1",
            "acme",
            ["x@alpha.test"],
            at=1001.0,
            attempt=1,
            reply=reply,
            site="mx.alpha.test",
            detail={"retry_at": "1060"},
            trace_id=TRACE,
        ),
        Event(
            "delivered",
            "m1",
            "acme",
            ["x@alpha.test"],
            at=1061.0,
            attempt=1,
            trace_id=TRACE,
            reply={"code": 250, "enhanced": "2.0.0", "text": "ok"},
            mx_host="mx.alpha.test",
        ),
    ]
    text = render_history("m1", events)
    lines = text.splitlines()
    assert lines[0] == "message m1  account acme  from <s@acme.test>"
    assert TRACE in lines[1]
    assert "deferred" in lines[3] and '"451 4.3.0 try later"' in lines[3] and "next try" in lines[3]
    assert "delivered" in lines[4] and "mx=mx.alpha.test" in lines[4]
    assert lines[-1] == "final: delivered"
    assert render_history("m9", []) == "no events for m9"


def test_pause_keys_round_trip_and_reject_what_cannot_be_a_key() -> None:
    for kind, name in (
        ("pool", "bulk"),
        ("site", "mx.alpha.test"),
        ("source", "192.0.2.1"),
        ("source", "2001:db8::1"),
    ):
        assert parse_pause_key(pause_key(kind, name)) == (kind, name)
    assert pause_key("site", "MX.Alpha.Test.") == "pause.site.mx.alpha.test"
    for kind, name in (("host", "x"), ("site", ""), ("site", "a b"), ("pool", "a*")):
        with pytest.raises(PauseError):
            pause_key(kind, name)


def test_sites_match_the_mx_host_or_the_domain_of_a_job() -> None:
    env = Envelope(
        id="m1",
        sender="s@acme.test",
        recipients=("x@alpha.test",),
        account="acme",
        sender_domain="acme.test",
        body=BodyRef(size=1, inline=b"x"),
        domain="alpha.test",
        site="mx.alpha.test",
    )
    assert (
        matches_site(env, "mx.alpha.test") and matches_site(env, "ALPHA.test.") and matches_site(env, "all")
    )
    assert not matches_site(env, "beta.test")
    reply = admin_bounce_reply("customer asked")
    assert (reply.code, reply.enhanced_status) == (550, "5.0.0") and "customer asked" in reply.text


def test_a_dsn_shows_in_the_history_of_the_message_it_reports_on() -> None:
    from services.core.events import event_for
    from services.core.outcome import Reply

    dsn = Envelope(
        id="d1",
        sender="",
        recipients=("s@acme.test",),
        account="acme",
        sender_domain="acme.test",
        body=BodyRef(size=1, inline=b"x"),
        kind="dsn",
        meta={"dsn_for": "m1"},
    )
    delivered = event_for("delivered", dsn, ["s@acme.test"], Reply(250, "2.0.0", "ok"))
    assert delivered.detail["dsn_for"] == "m1"
    bounced = Event(
        "bounced",
        "m1",
        "acme",
        ["x@alpha.test"],
        at=1000.0,
        sender="s@acme.test",
        reply={"code": 550, "enhanced": "5.1.1", "text": "no"},
    )
    text = render_history("m1", [bounced, delivered])
    assert "DSN d1 to s@acme.test" in text
    assert text.splitlines()[-1] == "final: bounced"


def test_status_lists_queued_and_deferred_recipients_by_site_largest_first() -> None:
    status = Status(
        queued_sites={"beta.test": 1, "alpha.test": 7},
        queued_truncated=True,
        deferred_sites={"gamma.test": 2},
    )
    out = render_status(status).split("\n\n")
    queued = next(block for block in out if block.startswith("QUEUED")).splitlines()
    assert queued[0] == "QUEUED RECIPIENTS BY SITE (waiting for delivery or in it) (scan truncated)"
    assert [line.split() for line in queued[1:]] == [["alpha.test", "7"], ["beta.test", "1"]]
    deferred = next(block for block in out if block.startswith("DEFERRED")).splitlines()
    assert deferred == ["DEFERRED RECIPIENTS BY SITE", "  gamma.test                                     2"]
    assert "QUEUED: none" in render_status(Status())
