"""Password checks: scrypt once per (user, password, hash) however many sessions log in at once."""

from __future__ import annotations

import asyncio

import pytest

from services.core.accounts import hash_password
from services.core.config import AccountConfig
from services.ingress import auth


async def test_concurrent_logins_share_one_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = auth.verify_password

    def counting(password: str, encoded: str) -> bool:
        calls.append(password)
        return real(password, encoded)

    monkeypatch.setattr(auth, "verify_password", counting)
    checker = auth.PasswordChecker()
    account = AccountConfig(password_hash=hash_password("right"))
    results = await asyncio.gather(*(checker.check(b"acme", b"right", account) for _ in range(20)))
    assert all(results) and len(calls) == 1
    assert await checker.check(b"acme", b"right", account) and len(calls) == 1  # cached
    wrong = await asyncio.gather(*(checker.check(b"acme", b"wrong", account) for _ in range(5)))
    assert not any(wrong) and len(calls) == 2
    # An unknown user costs a (decoy) check too, and never succeeds.
    assert not await checker.check(b"nobody", b"right", None) and len(calls) == 3
