"""VERP return paths: `<prefix>+<account>.<token>@<return path domain>`, authenticated by HMAC.

Delivery sends each job with such a MAIL FROM, so a bounce that arrives days later (to that
address) names its account and message without any state kept on our side (but the account
records, for a long account name: see below). The token is

    base32( head | day | message id | mac )      head = version (2 bits) | scope (1 bit) | hex length (5 bits)

* day: the UTC day the address was signed (days since 1970-01-01, 2 bytes, good until 2149).
  A token is believed for `bounce.verp_max_age` after that day ends, no longer: a forwarded
  copy or a list archive keeps its Return-Path for ever, and whoever finds it months later
  must not be able to have its recipient suppressed.
* message id: a `new_message_id()` (23 lowercase hex digits) packed into 12 bytes; any other id
  is carried as its UTF-8 bytes (hex length 0).
* mac: the first 10 bytes of HMAC-SHA256(secret, account, message id, scope, day). 80 bits: a
  forger gets no feedback, so guessing one is out of reach; a changed day breaks it like any
  other field.
* scope: what the MAC binds besides the message. A job with one recipient binds that recipient
  (exact VERP: a bounce can only ever suppress the address the message went to). A job with
  several recipients (delivery sends a domain's recipients in one transaction) binds the
  recipient *domain*: the bounce's Final-Recipient must then be at that domain. That keeps one
  MAIL FROM per transaction and the local part short, at the price that a recipient of such a
  message who forges a bounce could name another address at the same domain; see the README
  of services/bounce.

Version 1 tokens (the release before) have no day; mail queued before an upgrade may bounce
after it, so they still verify, dated by the arrival time in their MAC-covered message id.

Local parts are matched case-insensitively (some MTAs fold case), hence base32.

A local part may have 64 octets (RFC 5321 4.5.3.1.1); longer ones are refused by receivers that
check (our own inbound listener among them), so the bounce would never come back. The token is
40 characters, and account names may have 63. An account whose name fits (up to 21 characters
with the default prefix) is named as is; a longer one by its handle, `_` and 12 base32
characters of a SHA-256 of the name (no account name starts with `_`):

    <prefix>+_<handle>.<token>@<return path domain>

The bounce service finds the account whose name has that handle among the account records (it
follows them anyway); the MAC covers the full name as before, so a handle only says where to
look, never vouches for anything, and the token is the same either way. The handle is unkeyed,
so rotating secrets does not change it: short names are in the clear anyway. Sixty bits keep
two accounts from sharing one by chance; two that did would make one's long-form bounces fail
the MAC, not count for the other. With a prefix of up to 9 characters (config checks it) every
account name fits one of the two forms.

Key rotation: the first secret signs, every listed secret verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.core.addresses import domain_as_written, domain_of
from services.core.config import BounceConfig
from services.core.envelope import Envelope

_VERSION = 2
_VERSION_UNDATED = 1  # signed by the release before: no day in the token
_MAC_LEN = 10
_DAY_LEN = 2
_DAY = 86400
# How far ahead of our clock a signing replica's clock may have been.
_CLOCK_SKEW_DAYS = 1
_HEX_ID = re.compile(r"^[0-9a-f]{1,24}$")
# `new_message_id()`: 11 hex digits of milliseconds since the epoch, then 12 of randomness.
_TIMED_ID = re.compile(r"^[0-9a-f]{23}$")
_ACCOUNT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SCOPE_RECIPIENT = 0x20
_LOCAL_PART_MAX = 64  # octets, RFC 5321 4.5.3.1.1
# Marks an account handle in the local part: account names start with a letter or digit.
_HANDLE_MARK = "_"
_HANDLE_LEN = 12  # base32 characters, 60 bits


@dataclass(frozen=True, slots=True)
class ReturnPath:
    """What a VERP address says, before its MAC is checked against a recipient."""

    account: str
    message_id: str
    # True: the MAC binds one recipient address; False: it binds the recipient domain.
    single_recipient: bool
    mac: bytes
    # UTC day (since the epoch) the token was signed; None for a version 1 token, which has none.
    day: int | None = None


def utc_day(when: float) -> int:
    return int(when // _DAY)


def _scope(single_recipient: bool, recipients: Sequence[str]) -> str:
    """What the MAC binds: the recipient, or its domain; the domain in `domain_key`'s spelling,
    so a bounce that names the recipient in A-labels (or U-labels) verifies either way."""
    address = recipients[0].strip()
    domain = domain_of(address)
    if single_recipient:
        return f"{address.rpartition('@')[0].lower()}@{domain}"
    return "@" + domain


def _legacy_scope(single_recipient: bool, recipient: str) -> str:
    # How releases before this one spelt it (the domain lower-cased as written): their tokens,
    # in mail sent before an upgrade, must still verify. Differs only for internationalised
    # domains. Only version 1 tokens can carry it, so it goes with them.
    return recipient.strip().lower() if single_recipient else "@" + domain_as_written(recipient)


def _mac(secret: str, account: str, message_id: str, scope: str, day: int | None) -> bytes:
    fields = [account.encode(), message_id.encode(), scope.encode()]
    if day is None:  # version 1, byte for byte: tokens already out there must keep verifying
        data = b"\0".join([b"relais-verp-v1", *fields])
    else:
        data = b"\0".join([b"relais-verp-v2", *fields, str(day).encode()])
    return hmac.new(secret.encode(), data, hashlib.sha256).digest()[:_MAC_LEN]


def encode_token(
    secret: str, account: str, message_id: str, recipients: Sequence[str], *, now: float | None = None
) -> str:
    if not recipients:
        raise ValueError("a return path needs at least one recipient")
    single = len(recipients) == 1
    day = utc_day(time.time() if now is None else now)
    head = (_VERSION << 6) | (_SCOPE_RECIPIENT if single else 0)
    if _HEX_ID.match(message_id):
        head |= len(message_id)
        packed = int(message_id, 16).to_bytes(12, "big")
    else:
        packed = message_id.encode()
    mac = _mac(secret, account, message_id, _scope(single, recipients), day)
    raw = bytes([head]) + day.to_bytes(_DAY_LEN, "big") + packed + mac
    return base64.b32encode(raw).decode().rstrip("=").lower()


def decode_token(account: str, token: str) -> ReturnPath | None:
    text = token.upper()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None
    if not raw:
        return None
    version = raw[0] >> 6
    if version == _VERSION:
        head, day, rest = raw[0], int.from_bytes(raw[1 : 1 + _DAY_LEN], "big"), raw[1 + _DAY_LEN :]
    elif version == _VERSION_UNDATED:
        head, day, rest = raw[0], None, raw[1:]
    else:
        return None
    if len(rest) < 1 + _MAC_LEN:
        return None
    packed, mac = rest[:-_MAC_LEN], rest[-_MAC_LEN:]
    hex_len = head & 0x1F
    if hex_len:
        if len(packed) != 12 or hex_len > 24:
            return None
        message_id = f"{int.from_bytes(packed, 'big'):0{hex_len}x}"
        if len(message_id) != hex_len:
            return None
    else:
        try:
            message_id = packed.decode()
        except UnicodeDecodeError:
            return None
    return ReturnPath(account, message_id, bool(head & _SCOPE_RECIPIENT), mac, day)


def is_current(path: ReturnPath, *, now: float, max_age: float) -> bool:
    """Whether a report to `path` may still be believed at `now`: signed at most `max_age`
    before (the whole signing day counts, so never less than max_age after the send)."""
    if path.day is not None:
        signed_by = (path.day + 1) * _DAY
        return now - signed_by <= max_age and path.day <= utc_day(now) + _CLOCK_SKEW_DAYS
    # A version 1 token: the message's arrival, which its id carries, is the latest it can be
    # dated by. Arrival comes before the send, so this is the stricter reading. An id that
    # carries no time cannot be dated, and such a token is not believed.
    if not _TIMED_ID.match(path.message_id):
        return False
    arrived = int(path.message_id[:11], 16) / 1000
    return now - arrived <= max_age


def account_handle(account: str) -> str:
    """What names `account` in a return path whose local part its name would make too long."""
    digest = hashlib.sha256(b"relais-verp-account\0" + account.encode()).digest()
    return base64.b32encode(digest).decode()[:_HANDLE_LEN].lower()


def accounts_by_handle(accounts: Iterable[str]) -> dict[str, str]:
    """The index `parse_verp` looks handles up in, built from the names of every account."""
    return {account_handle(account): account for account in accounts}


def verp_address(
    *,
    prefix: str,
    domain: str,
    secret: str,
    account: str,
    message_id: str,
    recipients: Sequence[str],
    now: float | None = None,
) -> str:
    token = encode_token(secret, account, message_id, recipients, now=now)
    local = f"{prefix}+{account}.{token}"
    if len(local) > _LOCAL_PART_MAX:
        local = f"{prefix}+{_HANDLE_MARK}{account_handle(account)}.{token}"
    return f"{local}@{domain}"


def parse_verp(
    address: str, *, prefix: str, domain: str, accounts: Mapping[str, str] | None = None
) -> ReturnPath | None:
    """The claims of a VERP address at our return path domain, or None if it is not one.

    `accounts` (`accounts_by_handle`) names the account of an address that carries a handle;
    such an address whose handle is not there (no such account, or no index) is None too."""
    local, _, at = address.strip().strip("<>").rpartition("@")
    if not local or at.lower().rstrip(".") != domain.lower().rstrip("."):
        return None
    local = local.lower()
    lead = f"{prefix.lower()}+"
    if not local.startswith(lead):
        return None
    account, dot, token = local[len(lead) :].rpartition(".")
    if account.startswith(_HANDLE_MARK):
        account = (accounts or {}).get(account[len(_HANDLE_MARK) :], "")
    if not dot or not _ACCOUNT.match(account):
        return None
    return decode_token(account, token)


def verify(path: ReturnPath, recipient: str, secrets: Sequence[str]) -> bool:
    """Whether `recipient` is one the message was really sent to, as far as the MAC can tell."""
    local, at, _ = recipient.rpartition("@")
    # No message of ours went to a longer name (the ingress takes 64 characters of local part,
    # DNS 253 of domain): a domain-bound MAC would otherwise vouch for a name of any length.
    if not at or not local or len(local) > 64 or len(domain_of(recipient)) > 253:
        return False
    scopes = {_scope(path.single_recipient, [recipient])}
    if path.day is None:  # only the release before spelt scopes the old way too
        scopes.add(_legacy_scope(path.single_recipient, recipient))
    return any(
        hmac.compare_digest(_mac(secret, path.account, path.message_id, scope, path.day), path.mac)
        for secret in secrets
        if secret
        for scope in scopes
    )


def return_path(config: BounceConfig, env: Envelope) -> str:
    """The MAIL FROM delivery uses for a job: its VERP address, or the sender as given.

    The null sender stays null (a DSN must never be bounced), and so does a DSN's.
    """
    if not (config.verp and config.verp_secrets and config.return_path_domain):
        return env.sender
    if not env.sender or env.kind != "message" or not env.recipients or not env.account:
        return env.sender
    return verp_address(
        prefix=config.verp_prefix,
        domain=config.return_path_domain,
        secret=config.verp_secrets[0],
        account=env.account,
        message_id=env.id,
        recipients=env.recipients,
    )
