"""The router's view of an account (default pool, allowed pools, owned domains).

Accounts live in NATS KV (bucket relais-accounts: seeded from the config file by the ingress,
then changed live by `relais account`); the router reads the same records, so a pool changed
there takes effect here too. Records are cached for a few seconds: routing every message must
not cost a KV round trip. A name missing from KV falls back to the config file's account.
"""

from __future__ import annotations

import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.core.accounts import AccountRecordError, decode_account
from services.core.config import AccountConfig, Config
from services.core.topology import ACCOUNTS_BUCKET

log = logging.getLogger(__name__)


def account_from_record(data: bytes) -> AccountConfig | None:
    """An account record as the ingress writes it, or None if unusable."""
    try:
        # The router never authenticates, so a record is usable whatever its password hash.
        return decode_account(data, check_password_hash=False)
    except AccountRecordError:
        return None


class AccountView:
    def __init__(self, js: JetStreamContext, config: Config, ttl: float = 5.0) -> None:
        self._js = js
        self._config = config
        self._ttl = ttl
        self._kv: KeyValue | None = None
        self._cache: dict[str, tuple[float, AccountConfig | None]] = {}

    async def get(self, name: str) -> AccountConfig | None:
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        account = await self._fetch(name)
        self._cache[name] = (now + self._ttl, account)
        return account

    async def _fetch(self, name: str) -> AccountConfig | None:
        fallback = self._config.accounts.get(name)
        if not name:
            return fallback
        if self._kv is None:
            self._kv = await self._js.key_value(ACCOUNTS_BUCKET)
        try:
            entry = await self._kv.get(name)
        except KeyNotFoundError:
            return fallback
        account = account_from_record(entry.value) if entry.value else None
        if account is None:
            log.error("account record %r in KV is unusable; using the config file's", name)
            return fallback
        return account
