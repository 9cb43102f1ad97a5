"""Metrics fed from outcome events and consumer results, with the span attribute nouns as labels."""

from __future__ import annotations

from dataclasses import replace

from services.core import metrics
from services.core import telemetry as t
from services.core.envelope import Envelope
from services.core.events import event_for, outcome_attributes
from services.core.outcome import Reply
from tests.support.relais import an_envelope


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def envelope(**kw: object) -> Envelope:
    base: dict[str, object] = dict(
        id="0190000000aabbccddeeff",
        recipients=("a@alpha.test", "b@alpha.test"),
        account="acme-unit",
        received_at=1000.0,
        pool="unitpool",
        site="mx.unit.test",
    )
    return an_envelope(body=b"abc", **(base | kw))


def test_accepted_counts_messages_and_recipients_per_account() -> None:
    before = sample("relais_accepted_messages_total", account="acme-unit")
    before_rcpt = sample("relais_accepted_recipients_total", account="acme-unit")
    metrics.observe_event(event_for("accepted", envelope(), ["a@alpha.test", "b@alpha.test"]))
    assert sample("relais_accepted_messages_total", account="acme-unit") == before + 1
    assert sample("relais_accepted_recipients_total", account="acme-unit") == before_rcpt + 2


def test_outcomes_count_recipients_by_pool_source_and_site() -> None:
    labels = dict(outcome="delivered", pool="unitpool", source_ip="192.0.2.7", site="mx.unit.test")
    before = sample("relais_recipients_total", **labels)
    event = event_for(
        "delivered", envelope(), ["a@alpha.test"], Reply(250, "2.0.0", "ok"), source_ip="192.0.2.7"
    )
    metrics.observe_event(event)
    assert sample("relais_recipients_total", **labels) == before + 1


def test_delivery_latency_is_acceptance_to_delivery() -> None:
    count = sample("relais_delivery_latency_seconds_count", pool="unitlat")
    in_15 = sample("relais_delivery_latency_seconds_bucket", pool="unitlat", le="30.0")
    in_10 = sample("relais_delivery_latency_seconds_bucket", pool="unitlat", le="10.0")
    event = event_for("delivered", envelope(pool="unitlat"), ["a@alpha.test"], Reply(250, "2.0.0", "ok"))
    metrics.observe_event(replace(event, at=event.received_at + 15.0))
    assert sample("relais_delivery_latency_seconds_count", pool="unitlat") == count + 1
    assert sample("relais_delivery_latency_seconds_bucket", pool="unitlat", le="30.0") == in_15 + 1
    assert sample("relais_delivery_latency_seconds_bucket", pool="unitlat", le="10.0") == in_10


def test_bounces_count_by_category_defaulting_to_the_kind() -> None:
    before = sample("relais_bounces_total", pool="unitpool", bounce_category="expired")
    metrics.observe_event(event_for("expired", envelope(), ["a@alpha.test"], Reply(451, "4.4.7", "expired")))
    assert sample("relais_bounces_total", pool="unitpool", bounce_category="expired") == before + 1
    before = sample("relais_bounces_total", pool="unitpool", bounce_category="bad_mailbox")
    ev = event_for(
        "bounced",
        envelope(),
        ["a@alpha.test"],
        Reply(550, "5.1.1", "no"),
        detail={"category": "bad_mailbox"},
    )
    metrics.observe_event(ev)
    assert sample("relais_bounces_total", pool="unitpool", bounce_category="bad_mailbox") == before + 1


def test_a_delivery_consumer_handler_run_is_not_by_itself_an_attempt() -> None:
    # Delivery observes its attempts; a handler run may postpone the job without one.
    before = sample("relais_attempt_duration_seconds_count", pool="unitpool")
    acks = sample("relais_processed_total", consumer="delivery-unitpool", result="ack")
    metrics.observe_handler("delivery-unitpool", "ack", 0.2)
    metrics.observe_handler("router", "retry", 0.01)
    assert sample("relais_attempt_duration_seconds_count", pool="unitpool") == before
    assert sample("relais_processed_total", consumer="delivery-unitpool", result="ack") == acks + 1
    assert sample("relais_processed_total", consumer="router", result="retry") >= 1
    metrics.observe_attempt("unitpool", 0.2)
    assert sample("relais_attempt_duration_seconds_count", pool="unitpool") == before + 1


def test_subjects_are_reduced_to_bounded_families() -> None:
    assert metrics.subject_family("relais.retry.route.job1.3") == "relais.retry"
    assert metrics.subject_family("relais.deliver.bulk") == "relais.deliver.bulk"
    assert metrics.subject_family("relais.events.acme.delivered") == "relais.events"
    assert metrics.subject_family("relais.route") == "relais.route"


def test_outcome_attributes_use_the_shared_names() -> None:
    ev = event_for("deferred", envelope(), ["a@alpha.test"], Reply(451, "4.7.1", "slow down"), mx_host="mx1")
    attrs = outcome_attributes(ev)
    assert attrs[t.OUTCOME] == "deferred"
    assert attrs[t.REPLY_CODE] == 451 and attrs[t.ENHANCED_STATUS] == "4.7.1"
    assert attrs[t.MX_HOST] == "mx1" and attrs[t.POOL] == "unitpool"


def test_exposition_is_prometheus_text() -> None:
    text = metrics.exposition().decode()
    assert "# TYPE relais_recipients_total counter" in text
    assert "# TYPE relais_attempt_duration_seconds histogram" in text
    assert "relais_dns_cache_hits_total" in text


def test_ingress_rejections_count_by_code_and_enhanced_status() -> None:
    before = sample("relais_rejected_total", reason="550 5.7.1")
    metrics.observe_smtp_reply("550 5.7.1 Relay access denied")
    metrics.observe_smtp_reply("250 2.1.0 Ok")
    assert sample("relais_rejected_total", reason="550 5.7.1") == before + 1
    before = sample("relais_rejected_total", reason="421 4.4.2")
    metrics.observe_smtp_reply("421-4.4.2 timeout")
    assert sample("relais_rejected_total", reason="421 4.4.2") == before + 1


def test_tls_usage_counts_recipients_inbound_from_the_envelope_and_outbound_per_attempt() -> None:
    env = envelope(meta={"tls_version": "TLSv1.3", "tls_cipher": "TLS_AES_256_GCM_SHA384"})
    inbound = sample("relais_tls_recipients_total", direction="inbound", version="TLSv1.3")
    accepted = event_for("accepted", env, list(env.recipients))
    assert accepted.tls_version == "TLSv1.3"
    metrics.observe_event(accepted)
    assert sample("relais_tls_recipients_total", direction="inbound", version="TLSv1.3") == inbound + 2
    plain = sample("relais_tls_recipients_total", direction="outbound", version="none")
    later = Reply(451, "4.3.0", "later")
    metrics.observe_event(event_for("deferred", envelope(), ["a@alpha.test"], later, mx_address="127.0.0.2"))
    assert sample("relais_tls_recipients_total", direction="outbound", version="none") == plain + 1
    # No MX was reached (DNS, connect failure): no transaction, so neither TLS nor plaintext.
    metrics.observe_event(event_for("deferred", envelope(), ["a@alpha.test"], later))
    assert sample("relais_tls_recipients_total", direction="outbound", version="none") == plain + 1


def test_dns_cache_hits_and_misses_are_read_from_the_resolvers() -> None:
    from services.core.config import DnsConfig
    from services.core.dns import make_resolver

    resolver = make_resolver(DnsConfig(servers=["127.0.0.1:53"]))
    hits = sample("relais_dns_cache_hits_total")
    resolver.cache.statistics.hits += 3
    assert sample("relais_dns_cache_hits_total") == hits + 3


def test_site_labels_are_capped_so_the_long_tail_cannot_explode_the_series() -> None:
    sites = metrics.BoundedLabel(cap=2)
    assert [sites.label(s) for s in ("gmail.com", "yahoo.com", "tiny.example", "gmail.com")] == [
        "gmail.com",
        "yahoo.com",
        "other",
        "gmail.com",
    ]
