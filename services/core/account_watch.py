"""A live copy of the account records in NATS KV (bucket relais-accounts), kept by a watch.

The ingress authenticates against it and the bounce service posts each account's webhook from
it, so `relais account` changes reach every replica within moments, without a restart. Reading
it costs nothing per message: the watch pushes every change as it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from nats.js import JetStreamContext

from services.core.accounts import AccountRecordError, decode_account
from services.core.config import AccountConfig
from services.core.kv_watch import REMOVALS, follow
from services.core.topology import ACCOUNTS_BUCKET

log = logging.getLogger(__name__)


class AccountWatch:
    """`accounts` is the config file's until the first snapshot of KV arrives (`loaded`), then
    the records in KV, updated as they change. The listeners given to `on_change` are called
    after every change, the first snapshot included: one watch serves every reader in a
    process."""

    def __init__(
        self,
        js: JetStreamContext,
        initial: Mapping[str, AccountConfig],
        *,
        check_password_hash: bool = True,
    ) -> None:
        self._js = js
        self._check_password_hash = check_password_hash
        self._listeners: list[Callable[[], None]] = []
        self.accounts: dict[str, AccountConfig] = dict(initial)
        self.loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change the watch applies (the first snapshot included)."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                snapshot: dict[str, AccountConfig] = {}
                initial = True
                async with contextlib.aclosing(follow(self._js, ACCOUNTS_BUCKET)) as entries:
                    async for entry in entries:
                        if entry is None:  # the end of the stored records: swap in the complete view
                            self.accounts = snapshot
                            initial = False
                            self.loaded.set()
                            self._changed()
                            continue
                        target = snapshot if initial else self.accounts
                        if entry.operation in REMOVALS or not entry.value:
                            target.pop(entry.key, None)
                        else:
                            try:
                                target[entry.key] = decode_account(
                                    entry.value, check_password_hash=self._check_password_hash
                                )
                            except AccountRecordError as exc:
                                log.error("ignoring invalid account record %r: %s", entry.key, exc)
                                target.pop(entry.key, None)
                        if not initial:
                            log.info("account %s updated", entry.key)
                            self._changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS away: keep the last known view and watch again (the watch replays it all).
                log.warning("accounts watch interrupted, retrying: %r", exc)
                await asyncio.sleep(1.0)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()
