"""VERP tokens are dated: a report to one is believed for bounce.verp_max_age after the day it
was signed, never later, so a Return-Path found months on (a forwarded copy, a list archive)
cannot get its recipient suppressed. Tokens of the release before carry no day and still count
while their message is recent, dated by the arrival time its id carries."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime

import pytest

from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings
from services.core.config import BounceConfig, ConfigError, load_config
from services.core.returnpath import is_current, parse_verp, utc_day, verify, verp_address
from tests.support.bounce_samples import postfix_dsn

SECRET = "s3cret-s3cret-s3cret"
DOMAIN = "bounces.relais.test"
DAY = 86400.0
MAX_AGE = 30 * DAY
CONFIG = BounceConfig(verp=True, return_path_domain=DOMAIN, verp_secrets=[SECRET], verp_max_age=MAX_AGE)
# new_message_id() of a message that arrived at 2026-11-20 10:00:00 UTC.
ARRIVED = datetime(2026, 11, 20, 10, tzinfo=UTC).timestamp()
MESSAGE_ID = "1a1f8660d005eed5eed5eed"
# Return paths the release before signed for MESSAGE_ID with SECRET (version 1, no day), taken
# from that release's code: the wire format mail queued before an upgrade carries.
PREVIOUS_RELEASE = {
    ("bob@alpha.test",): "b+acme.o4a2d6dgbuaf53k65vpo2hllntzk7a3fd66l4@bounces.relais.test",
    ("a@alpha.test", "b@alpha.test"): "b+acme.k4a2d6dgbuaf53k65vpo3h7p6kasyrl3us5zu@bounces.relais.test",
    # and by the one before that, which bound an internationalised domain as written
    ("a@bücher.test",): "b+acme.o4a2d6dgbuaf53k65vpo2jgkoi2lvevd5g6qy@bounces.relais.test",
    ("a@bücher.test", "b@bücher.test"): "b+acme.k4a2d6dgbuaf53k65vpo35gaqq6ggnrvhac74@bounces.relais.test",
}


def signed(recipients: list[str], now: float, account: str = "acme") -> str:
    return verp_address(
        prefix="b",
        domain=DOMAIN,
        secret=SECRET,
        account=account,
        message_id=MESSAGE_ID,
        recipients=recipients,
        now=now,
    )


def with_day(address: str, day: int) -> str:
    """The same address with the day bytes of its token rewritten, the MAC left as it was."""
    local, _, domain = address.partition("@")
    lead, _, token = local.rpartition(".")
    raw = bytearray(base64.b32decode(token.upper()))
    raw[1:3] = day.to_bytes(2, "big")
    return f"{lead}.{base64.b32encode(bytes(raw)).decode().lower()}@{domain}"


def test_the_signing_day_round_trips_and_the_local_part_stays_within_64_octets() -> None:
    address = signed(["bob@alpha.test"], ARRIVED, account="a" * 20)
    local = address.partition("@")[0]
    assert len(local) <= 64, "RFC 5321 local-part limit, account names up to 20 characters"
    path = parse_verp(address, prefix="b", domain=DOMAIN)
    assert path is not None and path.day == utc_day(ARRIVED) and path.message_id == MESSAGE_ID
    assert verify(path, "bob@alpha.test", [SECRET])


def test_a_token_is_believed_for_max_age_after_its_day_and_not_after() -> None:
    # Signed one second before midnight: the whole day counts, so never less than max_age.
    late_in_the_day = (utc_day(ARRIVED) + 1) * DAY - 1
    path = parse_verp(signed(["bob@alpha.test"], late_in_the_day), prefix="b", domain=DOMAIN)
    assert path is not None
    end_of_day = (utc_day(ARRIVED) + 1) * DAY
    assert is_current(path, now=late_in_the_day + 1, max_age=MAX_AGE)
    assert is_current(path, now=end_of_day + MAX_AGE, max_age=MAX_AGE)
    assert not is_current(path, now=end_of_day + MAX_AGE + 1, max_age=MAX_AGE)
    assert not is_current(path, now=late_in_the_day + 200 * DAY, max_age=MAX_AGE)


def test_a_changed_day_breaks_the_mac() -> None:
    # A found token re-dated to today by whoever found it.
    old = signed(["bob@alpha.test"], ARRIVED)
    today = utc_day(ARRIVED + 90 * DAY)
    path = parse_verp(with_day(old, today), prefix="b", domain=DOMAIN)
    assert path is not None and path.day == today
    assert is_current(path, now=ARRIVED + 90 * DAY, max_age=MAX_AGE), "the new day passes the age check"
    assert not verify(path, "bob@alpha.test", [SECRET])
    assert not verify(dataclasses.replace(path, day=None), "bob@alpha.test", [SECRET]), "nor as undated"


def test_a_token_dated_in_the_future_is_not_believed() -> None:
    path = parse_verp(signed(["bob@alpha.test"], ARRIVED + 5 * DAY), prefix="b", domain=DOMAIN)
    assert path is not None and verify(path, "bob@alpha.test", [SECRET])
    assert is_current(path, now=ARRIVED + 4 * DAY, max_age=MAX_AGE), "a day of clock skew is allowed"
    assert not is_current(path, now=ARRIVED, max_age=MAX_AGE)


@pytest.mark.parametrize(("recipients", "address"), PREVIOUS_RELEASE.items())
def test_tokens_of_the_previous_releases_verify_while_their_message_is_recent(
    recipients: tuple[str, ...], address: str
) -> None:
    path = parse_verp(address, prefix="b", domain=DOMAIN)
    assert path is not None and path.day is None and path.message_id == MESSAGE_ID
    assert verify(path, recipients[0], [SECRET])
    assert not verify(path, "victim@elsewhere.test", [SECRET])
    # Dated by the message's arrival, which comes before any send.
    assert is_current(path, now=ARRIVED + 6 * DAY, max_age=MAX_AGE)
    assert is_current(path, now=ARRIVED + MAX_AGE, max_age=MAX_AGE)
    assert not is_current(path, now=ARRIVED + MAX_AGE + 1, max_age=MAX_AGE)


def test_an_undated_token_whose_id_carries_no_time_is_not_believed() -> None:
    # "msg-1" with SECRET, as the release before encoded it.
    path = parse_verp("b+acme.mbwxgzznggzofqxhd5fxh5gd4y@bounces.relais.test", prefix="b", domain=DOMAIN)
    assert path is not None and path.message_id == "msg-1" and verify(path, "bob@alpha.test", [SECRET])
    assert not is_current(path, now=ARRIVED, max_age=MAX_AGE)


def test_a_bounce_to_an_expired_token_changes_nothing() -> None:
    to = signed(["gone@alpha.test"], ARRIVED)
    raw = postfix_dsn(to=to, recipient="gone@alpha.test")
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES, now=ARRIVED + 7 * DAY).findings
    assert finding.recipient == "gone@alpha.test" and finding.suppresses

    verdict = findings(raw, [to], CONFIG, DEFAULT_RULES, now=ARRIVED + 120 * DAY)
    assert verdict.findings == []
    assert any("verp_max_age" in reason for reason in verdict.rejected)


def test_verp_max_age_loads_from_the_environment_and_is_checked() -> None:
    env = {
        "RELAIS_BOUNCE__VERP": "true",
        "RELAIS_BOUNCE__RETURN_PATH_DOMAIN": DOMAIN,
        "RELAIS_BOUNCE__VERP_SECRETS": SECRET,
    }
    assert load_config(env=env).bounce.verp_max_age == 30 * DAY, "safe default"
    assert load_config(env={**env, "RELAIS_BOUNCE__VERP_MAX_AGE": "60d"}).bounce.verp_max_age == 60 * DAY
    # A remote MTA may queue our last attempt (up to retry.max_age after arrival) as long again.
    with pytest.raises(ConfigError, match="verp_max_age"):
        load_config(env={**env, "RELAIS_BOUNCE__VERP_MAX_AGE": "9d"})
    with pytest.raises(ConfigError, match="verp_max_age"):
        load_config(env={**env, "RELAIS_BOUNCE__VERP_MAX_AGE": "0"})
    assert load_config(env={**env, "RELAIS_RETRY__MAX_AGE": "2d", "RELAIS_BOUNCE__VERP_MAX_AGE": "4d"})
