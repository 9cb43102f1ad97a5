"""Pool choice, the per-domain split and suppression filtering: pure routing decisions."""

from __future__ import annotations

import dataclasses
import json

import pytest

from services.core.config import (
    AccountConfig,
    Config,
    ConfigError,
    DkimKeyConfig,
    PoolConfig,
    SiteConfig,
    SourceConfig,
    validate,
)
from services.core.envelope import Envelope
from services.router.accounts import account_from_record
from services.router.plan import META_POOL, Job, choose_pool, split_by_domain, without_suppressed
from tests.support.relais import an_envelope

HASH = "scrypt$16384$8$1$c2FsdA==$ZGlnZXN0"


def _config() -> Config:
    pools = {
        name: PoolConfig(sources=[SourceConfig(address=f"127.0.0.{i}")])
        for i, name in enumerate(("default", "brand", "bulk", "other"), start=2)
    }
    return Config(
        pools=pools,
        accounts={
            "acme": AccountConfig(
                password_hash=HASH, domains=["acme.test", "brand.test"], pool="default", pools=["bulk"]
            )
        },
        sender_domains={"brand.test": "brand"},
    )


def _env(sender_domain: str = "acme.test", meta: dict[str, str] | None = None, **kw: object) -> Envelope:
    recipients: tuple[str, ...] = kw.pop("recipients", ("a@x.test",))  # type: ignore[assignment]
    return an_envelope(
        *recipients,
        body=b"x",
        id="m1",
        sender=f"news@{sender_domain}",
        sender_domain=sender_domain,
        meta=meta or {},
        **kw,
    )


def _pool(env: Envelope, account: AccountConfig | None = None) -> str:
    config = _config()
    return choose_pool(config, env, account or config.accounts["acme"])


def test_account_default_pool_without_a_request() -> None:
    assert _pool(_env()) == "default"
    other = AccountConfig(password_hash=HASH, pool="other")
    assert _pool(_env(), other) == "other"


def test_requested_pool_is_honoured_when_the_account_may_use_it() -> None:
    assert _pool(_env(meta={META_POOL: "bulk"})) == "bulk"


def test_requested_pool_the_account_may_not_use_falls_back_to_its_default() -> None:
    assert _pool(_env(meta={META_POOL: "other"})) == "default"
    assert _pool(_env(meta={META_POOL: "missing"})) == "default"


def test_unknown_accounts_and_pools_fall_back_to_the_default_pool() -> None:
    config = _config()
    assert choose_pool(config, _env(meta={META_POOL: "bulk"}), None) == "default"
    gone = AccountConfig(password_hash=HASH, pool="removed-pool", pools=["removed-too"])
    assert choose_pool(config, _env(meta={META_POOL: "removed-too"}), gone) == "default"


def test_dedicated_sender_domain_pool_wins_over_any_request() -> None:
    assert _pool(_env("brand.test")) == "brand"
    assert _pool(_env("BRAND.test", meta={META_POOL: "bulk"})) == "brand"
    assert choose_pool(_config(), _env("brand.test"), None) == "brand"


def test_account_records_decode_like_the_ingress_writes_them() -> None:
    account = AccountConfig(password_hash=HASH, domains=["acme.test"], pool="bulk", pools=["other"])
    record = json.dumps({**dataclasses.asdict(account), "future_field": 1}).encode()
    assert account_from_record(record) == account
    assert account_from_record(b"not json") is None
    assert account_from_record(b"[1, 2]") is None


def test_split_groups_recipients_by_domain_with_stable_ids() -> None:
    env = _env(recipients=("a@B.test", "c@a.test", "d@b.test"))
    jobs = split_by_domain(env)
    assert jobs == [Job("m1-0", "a.test", ("c@a.test",)), Job("m1-1", "b.test", ("a@B.test", "d@b.test"))]
    assert split_by_domain(env) == jobs


def test_the_dedicated_pool_is_found_whatever_the_spelling_of_the_sender_domain() -> None:
    config = dataclasses.replace(_config(), sender_domains={"xn--bcher-kva.test": "brand"})
    account = config.accounts["acme"]
    for spelling in ("xn--bcher-kva.test", "bücher.test", "BÜCHER.test", "Bücher.test."):
        assert choose_pool(config, _env(spelling), account) == "brand", spelling


def test_one_job_for_every_spelling_of_a_recipient_domain() -> None:
    env = _env(recipients=("a@Bücher.test", "b@xn--bcher-kva.test", "c@bücher.test."))
    assert split_by_domain(env) == [
        Job("m1-0", "xn--bcher-kva.test", ("a@Bücher.test", "b@xn--bcher-kva.test", "c@bücher.test."))
    ]


def test_job_ids_follow_the_domains_as_written() -> None:
    # As the release before domain_key numbered them ("bücher" < "mail" < "xn--..."), so that a
    # message half routed by it is routed again with the same id for each domain.
    env = _env(recipients=("a@mail.test", "b@bücher.test"))
    assert [(j.job_id, j.domain) for j in split_by_domain(env)] == [
        ("m1-0", "xn--bcher-kva.test"),
        ("m1-1", "mail.test"),
    ]


def test_a_recipient_given_twice_is_in_its_job_once() -> None:
    env = _env(recipients=("a@b.test", "c@b.test", "a@b.test"))
    assert split_by_domain(env) == [Job("m1-0", "b.test", ("a@b.test", "c@b.test"))]


def test_a_recipient_whose_domain_is_spelt_two_ways_is_in_its_job_once() -> None:
    env = _env(recipients=("a@Bücher.test", "a@xn--bcher-kva.test", "A@bücher.test"))
    assert split_by_domain(env) == [Job("m1-0", "xn--bcher-kva.test", ("a@Bücher.test", "A@bücher.test"))]


def test_a_retry_stays_one_job_with_its_id() -> None:
    env = _env(recipients=("a@b.test",), job_id="m1-3")
    assert split_by_domain(env) == [Job("m1-3", "b.test", ("a@b.test",))]


def test_suppressed_recipients_leave_the_job_but_not_its_id() -> None:
    job = Job("m1-0", "b.test", ("A@b.test", "c@b.test"))
    kept, dropped = without_suppressed(job, {"a@b.test"})
    assert kept == Job("m1-0", "b.test", ("c@b.test",))
    assert dropped == ("A@b.test",)
    everything, dropped_all = without_suppressed(job, {"a@b.test", "c@b.test"})
    assert everything.recipients == () and everything.job_id == "m1-0"
    assert len(dropped_all) == 2
    assert without_suppressed(job, set()) == (job, ())


def test_config_checks_sites_and_dkim_entries() -> None:
    with pytest.raises(ConfigError, match=r"sites\.Google"):
        validate(Config(sites={"Google": SiteConfig(mx=["*.google.com"])}))
    with pytest.raises(ConfigError, match=r"sites\.google\.mx"):
        validate(Config(sites={"google": SiteConfig()}))
    with pytest.raises(ConfigError, match="algorithm"):
        validate(
            Config(dkim={"acme.test": [DkimKeyConfig(selector="s", key_file="k", algorithm="rsa-sha1")]})
        )
    validate(
        Config(dkim={"acme.test": [DkimKeyConfig(selector="s", key_file="k", algorithm="ed25519-sha256")]})
    )
