"""Subject and consumer names are built and parsed in one place; they must round-trip."""

from __future__ import annotations

import pytest

from services.cli import SERVICES
from services.core import topology as t
from services.core.config import Config, PoolConfig
from services.core.runtime import owned_bindings


@pytest.mark.parametrize("account", ["acme", "a-b_c", "X9"])
@pytest.mark.parametrize("kind", t.EVENT_KINDS)
def test_event_subject_round_trip(account: str, kind: str) -> None:
    assert t.parse_event_subject(t.event_subject(account, kind)) == (account, kind)


@pytest.mark.parametrize("pool", ["default", "newsletters", "pool-2", "t_1"])
def test_pool_names_round_trip_through_subjects_and_consumers(pool: str) -> None:
    assert t.pool_of_deliver_subject(t.deliver_subject(pool)) == pool
    assert t.pool_of_delivery_consumer(t.delivery_consumer(pool)) == pool
    assert t.delivery_binding(pool).subject == t.deliver_subject(pool)


@pytest.mark.parametrize("bad", ["a.b", "a b", "a*", ">", "", "a.>"])
def test_names_that_would_span_or_wildcard_tokens_are_refused(bad: str) -> None:
    with pytest.raises(t.SubjectError):
        t.deliver_subject(bad)
    with pytest.raises(t.SubjectError):
        t.route_retry_subject(bad, 1)


@pytest.mark.parametrize(
    "subject", ["relais.deliver", "relais.deliver.a.b", "other.deliver.a", "relais.route", "relais.submit"]
)
def test_parsers_refuse_foreign_subjects(subject: str) -> None:
    with pytest.raises(t.SubjectError):
        t.pool_of_deliver_subject(subject)


def test_every_consumer_filter_lies_inside_its_stream() -> None:
    config = Config(pools={"default": PoolConfig(), "bulk": PoolConfig()})
    streams = {s.name: s.subjects for s in t.stream_configs(config)}
    for binding in t.consumer_bindings(config):
        subjects = streams[binding.stream]
        assert any(
            binding.subject == s or (s.endswith(".>") and binding.subject.startswith(s[:-1]))
            for s in subjects
        ), binding


def test_retry_schedules_live_in_the_stream_of_their_target() -> None:
    # ADR-51: a schedule's target subject must belong to the schedule's own stream.
    streams = {s.name: s for s in t.stream_configs(Config())}
    route = streams[t.ROUTE_STREAM]
    assert route.allow_msg_schedules
    assert t.route_subject() in route.subjects
    assert t.route_retry_subject("k", 1).startswith("relais.retry.route.")


def test_new_mail_enters_a_stream_that_takes_neither_schedules_nor_roll_ups() -> None:
    """nats-server gives a stream that takes schedules roll-ups too: whoever may publish one
    of its subjects could empty it. The ingress and bounce publish new mail to the submit
    stream, which takes neither; the route stream keeps the schedules (retries) alone."""
    streams = {s.name: s for s in t.stream_configs(Config())}
    submit, route = streams[t.SUBMIT_STREAM], streams[t.ROUTE_STREAM]
    assert submit.subjects == [t.submit_subject()]
    assert not submit.allow_msg_schedules and submit.allow_rollup_hdrs is False
    assert t.submit_subject() not in route.subjects
    # The same queue as the route stream in every other respect.
    for field in ("retention", "storage", "num_replicas", "duplicate_window", "max_bytes", "max_msgs"):
        assert getattr(submit, field) == getattr(route, field), field
    # The router takes both with one handler; each consumer is declared alike.
    config = Config()
    submit_consumer = t.consumer_config(t.submit_binding(), config)
    route_consumer = t.consumer_config(t.router_binding(), config)
    assert submit_consumer.durable_name == t.SUBMIT_CONSUMER != route_consumer.durable_name
    assert submit_consumer.filter_subject == t.submit_subject()
    submit_consumer.durable_name = route_consumer.durable_name
    submit_consumer.filter_subject = route_consumer.filter_subject
    assert submit_consumer == route_consumer
    assert {b.durable for b in owned_bindings("router", config)} >= {t.SUBMIT_CONSUMER, t.ROUTER_CONSUMER}


def test_replicas_follow_config() -> None:
    from services.core.config import NatsConfig

    config = Config(nats=NatsConfig(replicas=3))
    assert {s.num_replicas for s in t.stream_configs(config)} == {3}


def test_dsn_windows_are_scheduled_in_the_stream_of_the_flush_they_fire() -> None:
    streams = {s.name: s for s in t.stream_configs(Config())}
    flush = streams[t.BOUNCE_FLUSH_STREAM]
    assert flush.allow_msg_schedules
    assert t.bounce_flush_subject() in flush.subjects
    assert t.bounce_window_subject("0193abc", "0193def") == "relais.bounce.window.0193abc.0193def"
    assert any(
        s.endswith(".>") and t.bounce_window_subject("m", "w").startswith(s[:-1]) for s in flush.subjects
    )
    # The bounce consumer's exact subject stays outside the flush stream (no overlap).
    assert t.bounce_subject() not in flush.subjects
    with pytest.raises(t.SubjectError):
        t.bounce_window_subject("a.b", "w")


def test_msg_ids_are_remembered_past_a_redelivery_after_a_lost_ack() -> None:
    # Outputs published again after `ack_wait` (the input came back) must still be deduplicated.
    from services.core.config import NatsConfig

    for ack_wait in (30.0, 120.0, 600.0):
        config = Config(nats=NatsConfig(ack_wait=ack_wait))
        # The limits stream holds counters, written without msg ids.
        windows = {s.name: s.duplicate_window for s in t.stream_configs(config) if s.name != t.LIMITS_STREAM}
        assert all(w is not None and w >= 2 * ack_wait for w in windows.values()), windows
    assert Config().nats.duplicate_window == 300.0


def test_every_consumer_is_reported_by_a_service() -> None:
    # A consumer no service owns has no lag in /metrics and no place in /readyz: the DSN
    # windows' flush consumer was missing from the bounce service's.
    config = Config()
    owned = {b.durable for name in SERVICES for b in owned_bindings(name, config)}
    assert {b.durable for b in t.consumer_bindings(config)} <= owned
