"""VERP return paths: round trip, authentication, key rotation, and what must stay unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from services.core.config import BounceConfig
from services.core.envelope import Envelope, new_message_id
from services.core.returnpath import encode_token, parse_verp, return_path, verify, verp_address
from tests.support.relais import an_envelope

SECRET = "s3cret-s3cret-s3cret"
OLD_SECRET = "old-secret-old-secret"
DOMAIN = "bounces.relais.test"
CONFIG = BounceConfig(verp=True, return_path_domain=DOMAIN, verp_secrets=[SECRET, OLD_SECRET])


def envelope(**changes: object) -> Envelope:
    return an_envelope("bob@alpha.test", body=b"x", **changes)


def test_single_recipient_round_trip_names_account_and_message() -> None:
    env = envelope()
    address = return_path(CONFIG, env)
    local, _, domain = address.partition("@")
    assert domain == DOMAIN and local.startswith("b+acme.")
    assert len(local) <= 64, "RFC 5321 local-part limit"
    path = parse_verp(address, prefix="b", domain=DOMAIN)
    assert path is not None
    assert (path.account, path.message_id, path.single_recipient) == ("acme", env.id, True)
    assert verify(path, "bob@alpha.test", CONFIG.verp_secrets)
    assert verify(path, "Bob@Alpha.TEST", CONFIG.verp_secrets), "addresses compare case-insensitively"


def test_an_mta_that_folds_case_does_not_break_the_token() -> None:
    env = envelope()
    path = parse_verp(return_path(CONFIG, env).upper(), prefix="b", domain=DOMAIN)
    assert path is not None and path.message_id == env.id
    assert verify(path, "bob@alpha.test", CONFIG.verp_secrets)


def test_token_does_not_vouch_for_another_recipient_or_a_tampered_message() -> None:
    env = envelope()
    path = parse_verp(return_path(CONFIG, env), prefix="b", domain=DOMAIN)
    assert path is not None
    assert not verify(path, "victim@alpha.test", CONFIG.verp_secrets)
    assert not verify(dataclasses.replace(path, account="other"), "bob@alpha.test", CONFIG.verp_secrets)
    assert not verify(
        dataclasses.replace(path, message_id=new_message_id()), "bob@alpha.test", CONFIG.verp_secrets
    )
    assert not verify(path, "bob@alpha.test", ["attacker-guess-secret"])


def test_multi_recipient_job_binds_the_recipient_domain() -> None:
    env = envelope(recipients=("a@alpha.test", "b@alpha.test"), domain="alpha.test")
    path = parse_verp(return_path(CONFIG, env), prefix="b", domain=DOMAIN)
    assert path is not None and not path.single_recipient
    assert verify(path, "a@alpha.test", CONFIG.verp_secrets)
    assert verify(path, "b@alpha.test", CONFIG.verp_secrets)
    assert not verify(path, "a@beta.test", CONFIG.verp_secrets)


def test_a_domain_binding_holds_for_either_spelling_of_an_internationalised_domain() -> None:
    # Delivery signs with the domain as the message spelt it; a remote bounce may report the
    # recipient in A-labels (or the other way round).
    env = envelope(recipients=("a@bücher.test", "b@bücher.test"), domain="xn--bcher-kva.test")
    path = parse_verp(return_path(CONFIG, env), prefix="b", domain=DOMAIN)
    assert path is not None and not path.single_recipient
    assert verify(path, "a@xn--bcher-kva.test", CONFIG.verp_secrets)
    assert verify(path, "b@Bücher.test", CONFIG.verp_secrets)
    one = parse_verp(return_path(CONFIG, envelope(recipients=("a@bücher.test",))), prefix="b", domain=DOMAIN)
    assert one is not None and one.single_recipient
    assert verify(one, "A@xn--bcher-kva.test", CONFIG.verp_secrets)
    assert not verify(one, "b@xn--bcher-kva.test", CONFIG.verp_secrets)


def test_key_rotation_old_secret_still_verifies_new_addresses_use_the_first() -> None:
    env = envelope()
    old = verp_address(
        prefix="b",
        domain=DOMAIN,
        secret=OLD_SECRET,
        account="acme",
        message_id=env.id,
        recipients=env.recipients,
    )
    path = parse_verp(old, prefix="b", domain=DOMAIN)
    assert path is not None and verify(path, "bob@alpha.test", CONFIG.verp_secrets)
    assert not verify(path, "bob@alpha.test", [SECRET]), "once the old secret is removed it stops verifying"
    assert return_path(CONFIG, env) != old


def test_non_hex_message_ids_round_trip() -> None:
    token = encode_token(SECRET, "acme", "msg-1", ["x@y.test"])
    path = parse_verp(f"b+acme.{token}@{DOMAIN}", prefix="b", domain=DOMAIN)
    assert path is not None and path.message_id == "msg-1"


@pytest.mark.parametrize(
    "address",
    [
        "b+acme.zzzz@bounces.relais.test",  # not base32 of a token
        "b+acme.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@elsewhere.test",  # another domain
        "postmaster@bounces.relais.test",
        "b+@bounces.relais.test",
        "",
    ],
)
def test_things_that_are_not_return_paths(address: str) -> None:
    assert parse_verp(address, prefix="b", domain=DOMAIN) is None


def test_null_sender_dsn_and_disabled_verp_keep_the_sender() -> None:
    assert return_path(CONFIG, envelope(sender="")) == ""
    assert return_path(CONFIG, envelope(sender="", kind="dsn")) == ""
    assert return_path(BounceConfig(), envelope()) == "news@acme.test"


def test_verp_config_is_checked_and_secrets_rotate_through_the_environment() -> None:
    from services.core.config import ConfigError, load_config

    env = {
        "RELAIS_BOUNCE__VERP": "true",
        "RELAIS_BOUNCE__RETURN_PATH_DOMAIN": DOMAIN,
        "RELAIS_BOUNCE__VERP_SECRETS": f"{SECRET},{OLD_SECRET}",
    }
    assert load_config(env=env).bounce.verp_secrets == [SECRET, OLD_SECRET]
    with pytest.raises(ConfigError, match="return_path_domain"):
        load_config(env={**env, "RELAIS_BOUNCE__RETURN_PATH_DOMAIN": ""})
    with pytest.raises(ConfigError, match="16 characters"):
        load_config(env={**env, "RELAIS_BOUNCE__VERP_SECRETS": "short"})
