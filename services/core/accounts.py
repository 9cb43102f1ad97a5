"""Accounts: scrypt password hashes (never plaintext), and the account record kept in NATS KV.

The record (bucket relais-accounts, key = account name) is JSON of the `AccountConfig` fields.
The ingress writes and watches it, the router reads it; both decode it here, so a field added to
`AccountConfig` reaches every service in the same shape.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets

from services.core.config import AccountConfig

# RFC 7914 interactive-login parameters: about 16 MiB and tens of milliseconds per check,
# which makes offline guessing expensive and online guessing slow.
_N, _R, _P = 2**14, 8, 1
# Octets of digest `hash_password` writes. A stored digest cut shorter (a copy that lost its
# tail, a hand-made record) is refused: one of a single octet matches one wrong password in 256.
_DKLEN = 32

_FIELDS = frozenset(f.name for f in dataclasses.fields(AccountConfig))


class AccountRecordError(ValueError):
    """A KV value that is not a valid account record."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        if len(expected) < _DKLEN:
            return False
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected), maxmem=2**26
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


def encode_account(account: AccountConfig) -> bytes:
    return json.dumps(dataclasses.asdict(account), sort_keys=True).encode()


def decode_account(data: bytes, *, check_password_hash: bool = True) -> AccountConfig:
    """The account in a KV record; raises AccountRecordError.

    Fields this version does not know are dropped, so a replica still running the previous
    release reads records a newer one wrote. `check_password_hash=False` is for readers that
    never authenticate (the router wants only pools and domains).
    """
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        account = AccountConfig(**{k: v for k, v in raw.items() if k in _FIELDS})
    except (ValueError, TypeError) as exc:
        raise AccountRecordError(str(exc)) from exc
    if not isinstance(account.password_hash, str):
        # A hand-edited record must be skipped, not crash the watch that loads every account.
        raise AccountRecordError("password_hash is not a string")
    if check_password_hash and not account.password_hash.startswith("scrypt$"):
        raise AccountRecordError("password_hash is not an scrypt hash")
    webhook = (account.webhook_url, account.webhook_secret, account.webhook_previous_secret)
    until = account.webhook_previous_secret_until
    if (
        not all(isinstance(v, str) for v in webhook)
        or isinstance(until, bool)
        or not isinstance(until, int | float)
    ):
        # Checked and signed with by every bounce replica: a wrong type there would raise in its watch.
        raise AccountRecordError("a webhook field has the wrong type")
    return account
