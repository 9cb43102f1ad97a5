"""VERP return paths of long account names: the local part stays within the 64 octets of RFC
5321 4.5.3.1.1 (receivers that check, our own inbound listener among them, refuse a longer one,
and the bounce never comes back), and the bounce still names its account and message."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings
from services.core.config import BounceConfig, ConfigError, load_config
from services.core.returnpath import accounts_by_handle, parse_verp, verify, verp_address
from tests.support.bounce_samples import postfix_dsn

SECRET = "0123456789abcdef0123"
DOMAIN = "bounces.relais.test"
CONFIG = BounceConfig(verp=True, return_path_domain=DOMAIN, verp_secrets=[SECRET])
MESSAGE_ID = "0192a3b4c5d6e7f8091a2b3"
LONG = "northwind-traders-transactional-mail-eu1"  # 40 characters
assert len(LONG) == 40


def signed(account: str, recipient: str = "bob@alpha.test", prefix: str = "b") -> str:
    return verp_address(
        prefix=prefix,
        domain=DOMAIN,
        secret=SECRET,
        account=account,
        message_id=MESSAGE_ID,
        recipients=[recipient],
    )


@pytest.mark.parametrize("prefix", ["b", "bounce-99"])
@pytest.mark.parametrize("length", range(1, 64))
def test_every_account_name_gives_a_local_part_of_at_most_64_octets_that_names_it(
    prefix: str, length: int
) -> None:
    account = ("acct-" + "x" * 63)[:length].rstrip("-") or "a"
    address = signed(account, prefix=prefix)
    assert len(address.partition("@")[0].encode()) <= 64
    path = parse_verp(address, prefix=prefix, domain=DOMAIN, accounts=accounts_by_handle(["acme", account]))
    assert path is not None and (path.account, path.message_id) == (account, MESSAGE_ID)
    assert verify(path, "bob@alpha.test", [SECRET])


def test_a_name_that_fits_is_still_written_as_is_and_read_without_the_records() -> None:
    # The form of every earlier release: bounces to it need no account index, on any replica.
    account = "a" * 21  # the longest that fits with the default prefix
    address = signed(account)
    assert address.startswith(f"b+{account}.")
    path = parse_verp(address, prefix="b", domain=DOMAIN)
    assert path is not None and path.account == account


def test_a_long_name_is_named_by_its_handle_which_only_the_records_resolve() -> None:
    address = signed(LONG)
    local = address.partition("@")[0]
    assert LONG not in local and local.startswith("b+_")
    assert parse_verp(address, prefix="b", domain=DOMAIN) is None, "no index: not a token we can read"
    assert parse_verp(address, prefix="b", domain=DOMAIN, accounts=accounts_by_handle(["acme"])) is None
    path = parse_verp(address.upper(), prefix="b", domain=DOMAIN, accounts=accounts_by_handle([LONG]))
    assert path is not None and path.account == LONG, "MTAs that fold case"


def test_the_mac_still_covers_the_full_name_so_a_handle_vouches_for_nothing() -> None:
    address = signed(LONG)
    handle = address.partition("+_")[2].partition(".")[0]
    # An index that resolved the handle to another account (a collision) gets no bounce counted.
    other = "northwind-traders-transactional-mail-eu2"
    path = parse_verp(address, prefix="b", domain=DOMAIN, accounts={handle: other})
    assert path is not None and path.account == other
    assert not verify(path, "bob@alpha.test", [SECRET])


def test_long_name_return_paths_of_earlier_releases_still_verify() -> None:
    """Those written with the whole name (longer than 64 octets): mail sent before the upgrade
    that does come back still counts, version 2 and version 1 tokens alike."""
    data = b"\0".join([b"relais-verp-v1", LONG.encode(), MESSAGE_ID.encode(), b"bob@alpha.test"])
    mac = hmac.new(SECRET.encode(), data, hashlib.sha256).digest()[:10]
    raw = bytes([(1 << 6) | 0x20 | len(MESSAGE_ID)]) + int(MESSAGE_ID, 16).to_bytes(12, "big") + mac
    v1 = f"b+{LONG}.{base64.b32encode(raw).decode().rstrip('=').lower()}@{DOMAIN}"
    v2 = f"b+{LONG}.{signed(LONG).partition('.')[2]}"
    for address in (v1, v2):
        path = parse_verp(address, prefix="b", domain=DOMAIN)
        assert path is not None and path.account == LONG
        assert verify(path, "bob@alpha.test", [SECRET])


def test_a_bounce_to_a_long_name_return_path_is_attributed_to_its_account() -> None:
    to = signed(LONG, "gone@alpha.test")
    raw = postfix_dsn(to=to, recipient="gone@alpha.test")
    every_account = accounts_by_handle(["acme", LONG])
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES, accounts=every_account).findings
    assert (finding.account, finding.message_id, finding.recipient) == (LONG, MESSAGE_ID, "gone@alpha.test")
    verdict = findings(raw, [to], CONFIG, DEFAULT_RULES, accounts=accounts_by_handle(["acme"]))
    assert verdict.findings == [] and verdict.rejected


@pytest.mark.parametrize(("prefix", "accepted"), [("bounce-99", True), ("bounces-99", False)])
def test_a_prefix_that_leaves_no_room_for_the_handle_is_refused(
    tmp_path: Path, prefix: str, accepted: bool
) -> None:
    path = tmp_path / "relais.toml"
    path.write_text(
        f'[bounce]\nverp = true\nreturn_path_domain = "{DOMAIN}"\nverp_secrets = ["{SECRET}"]\n'
        f'verp_prefix = "{prefix}"\n'
    )
    if accepted:
        assert load_config(path, env={}).bounce.verp_prefix == prefix
    else:
        with pytest.raises(ConfigError, match=r"bounce\.verp_prefix: at most 9"):
            load_config(path, env={})
