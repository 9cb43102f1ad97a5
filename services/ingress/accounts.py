"""Accounts in NATS KV (bucket relais-accounts), seeded from the config file, watched live.

Key = account name; value = the record services/core/accounts.py encodes and decodes.
`[accounts.<name>]` tables in the config file are written to KV only when the key does not exist
yet, so `relais account disable` is not undone by a restart; from then on KV is the truth and
every ingress replica follows its changes within moments, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.core.account_watch import AccountWatch
from services.core.accounts import AccountRecordError, decode_account, encode_account
from services.core.bus import CAS_ATTEMPTS
from services.core.config import AccountConfig, valid_name
from services.core.kv_watch import stored
from services.core.topology import ACCOUNTS_BUCKET

log = logging.getLogger(__name__)


class AccountStore:
    """This replica's live view of the accounts; `get` never touches the network."""

    def __init__(self, js: JetStreamContext, seed: Mapping[str, AccountConfig]) -> None:
        self._js = js
        self._seed = dict(seed)
        # Until the first KV snapshot arrives, the config file is the best knowledge there is.
        self._watch = AccountWatch(js, seed)

    @property
    def loaded(self) -> asyncio.Event:
        return self._watch.loaded

    @property
    def ready(self) -> bool:
        """Whether the accounts were read from KV. Until then `get` answers from the config
        file, which may still list an account an operator has disabled since."""
        return self.loaded.is_set()

    def get(self, name: str) -> AccountConfig | None:
        return self._watch.accounts.get(name)

    def names(self) -> list[str]:
        return sorted(self._watch.accounts)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change the watch applies (the first snapshot included)."""
        self._watch.on_change(listener)

    async def start(self, wait: float = 5.0) -> None:
        try:
            kv = await self._js.key_value(ACCOUNTS_BUCKET)
            await seed_accounts(kv, self._seed)
        except Exception as exc:
            log.warning("accounts KV unavailable, using the config file's accounts for now: %r", exc)
        self._watch.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.loaded.wait(), wait)

    async def stop(self) -> None:
        await self._watch.stop()


async def seed_accounts(kv: KeyValue, seed: Mapping[str, AccountConfig]) -> None:
    for name, account in seed.items():
        with contextlib.suppress(KeyWrongLastSequenceError):
            await kv.create(name, encode_account(account))


async def put_account(js: JetStreamContext, name: str, account: AccountConfig) -> None:
    """Write the record, replacing any the name has."""
    kv = await _records_of(js, name)
    await kv.put(name, encode_account(account))


async def create_account(js: JetStreamContext, name: str, account: AccountConfig) -> bool:
    """Write the record of a new account; False, writing nothing, when the name has one. A KV
    create, which the server refuses once the key holds a value: of two admins adding one name
    at the same moment exactly one succeeds (a read, then a put, would let both, the later win)."""
    kv = await _records_of(js, name)
    try:
        await kv.create(name, encode_account(account))
    except KeyWrongLastSequenceError:
        return False
    return True


async def has_record(js: JetStreamContext, name: str) -> bool:
    """Whether the name has a record, readable or not (what makes `create_account` refuse)."""
    kv = await js.key_value(ACCOUNTS_BUCKET)
    try:
        await kv.get(name)
    except KeyNotFoundError:  # none, or deleted
        return False
    return True


async def _records_of(js: JetStreamContext, name: str) -> KeyValue:
    if not valid_name(name):
        raise AccountRecordError("account names are lowercase letters, digits, '-' and '_'")
    return await js.key_value(ACCOUNTS_BUCKET)


async def get_account(js: JetStreamContext, name: str) -> AccountConfig | None:
    kv = await js.key_value(ACCOUNTS_BUCKET)
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:
        return None
    return decode_account(entry.value) if entry.value else None


async def list_accounts(js: JetStreamContext) -> dict[str, AccountConfig]:
    out: dict[str, AccountConfig] = {}
    for entry in sorted(await stored(js, ACCOUNTS_BUCKET), key=lambda e: e.key):
        try:
            out[entry.key] = decode_account(entry.value)
        except AccountRecordError as exc:
            # Listed without it, as the ingress does, rather than no list at all.
            log.error("ignoring invalid account record %r: %s", entry.key, exc)
    return out


async def update_account(
    js: JetStreamContext, name: str, change: Callable[[AccountConfig], AccountConfig]
) -> AccountConfig | None:
    """Apply `change` to the stored record by compare-and-set, reading again when another
    command wrote in between: a `disable` and a `passwd` at the same moment both take effect,
    instead of the later write restoring what the earlier one changed. None: no such account."""
    kv = await js.key_value(ACCOUNTS_BUCKET)
    for _ in range(CAS_ATTEMPTS):
        try:
            entry = await kv.get(name)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        changed = change(decode_account(entry.value))
        try:
            await kv.update(name, encode_account(changed), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        return changed
    raise AccountRecordError(f"account {name} kept changing under this command: try again")


async def set_disabled(js: JetStreamContext, name: str, disabled: bool) -> bool:
    changed = await update_account(js, name, lambda account: dataclasses.replace(account, disabled=disabled))
    return changed is not None
