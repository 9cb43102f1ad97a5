"""AUTH PLAIN and LOGIN (RFC 4616, draft-murchison-sasl-login) against the live accounts.

Replaces aiosmtpd's synchronous authenticator: the throttle and session registry live in NATS,
and scrypt runs in a thread, so one login never stalls every other session on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
import weakref

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session

from services.core.accounts import hash_password, verify_password
from services.core.config import AccountConfig
from services.ingress.accounts import AccountStore
from services.ingress.limits import AuthThrottle, SessionRegistry, Take
from services.ingress.replies import (
    AUTH_AUTHZID,
    AUTH_BAD_BASE64,
    AUTH_INVALID,
    AUTH_MALFORMED,
    AUTH_OK,
    AUTH_THROTTLED,
    AUTH_UNAVAILABLE,
    TOO_MANY_SESSIONS,
)
from services.ingress.session import facts

log = logging.getLogger(__name__)

_AUTH_CACHE_SECONDS = 300.0
# LOGIN's challenges as Postfix and Dovecot send them. Clients ought to ignore them
# (draft-murchison-sasl-login) but some compare: Go's widely copied LOGIN helper and curl abort on
# aiosmtpd's "User Name\0" and "Password\0" (aiosmtpd issue #566).
LOGIN_USERNAME_CHALLENGE = "Username:"
LOGIN_PASSWORD_CHALLENGE = "Password:"


class PasswordChecker:
    """scrypt off the event loop, a few at a time, with a short memory of recent successes.

    scrypt costs ~16 MiB and tens of milliseconds by design; bulk senders authenticate on every
    connection, so a verified (user, password, hash) triple is remembered for a few minutes.
    """

    def __init__(self, concurrency: int = 4) -> None:
        self._verified: dict[str, float] = {}
        # One scrypt per (user, password, hash) at a time: a sender opening 50 connections at
        # once must not cost 50 derivations (about a second of CPU each ten).
        self._pending: dict[str, asyncio.Task[bool | None]] = {}
        self._slots = asyncio.Semaphore(concurrency)
        # Unknown users are checked against this, so timing does not reveal which names exist.
        self._decoy = hash_password("relais-decoy")

    async def check(
        self,
        login: bytes,
        password: bytes,
        account: AccountConfig | None,
        throttle: AuthThrottle | None = None,
        ip: str = "",
        known: bool = False,
    ) -> bool | None:
        """True when right, False when wrong, None when `throttle` refused the attempt.

        Sessions sending the same credentials at once share one scrypt and count as one attempt:
        the first reserves it as a failure before deriving (`AuthThrottle.reserve` says why) and
        refunds it when the password is right. A remembered success costs no counter writes.
        `known`: `ip` logged in as this user recently (`AuthThrottle.locked`)."""
        encoded = account.password_hash if account is not None else self._decoy
        key = hashlib.sha256(b"\0".join([login, password, encoded.encode()])).hexdigest()
        if account is not None and self._verified.get(key, 0.0) > time.monotonic():
            return True
        pending = self._pending.get(key)
        if pending is None:
            # A task of its own, finished even when the session that started it hangs up: else
            # the sessions sharing it would be cancelled with it, and a right password would stay
            # counted as a failed guess (enough such drops lock the owner out).
            pending = asyncio.create_task(
                self._derive(key, login, password, encoded, account is not None, throttle, ip, known)
            )
            pending.add_done_callback(_retrieved)
            self._pending[key] = pending
        ok = await asyncio.shield(pending)
        return ok if ok is None else ok and account is not None

    def running(self) -> set[asyncio.Task[bool | None]]:
        """The checks not done yet, some perhaps of sessions that left: the service's stop waits
        for them, or a right password's refund would meet a closed NATS connection and stay
        counted as a failed guess."""
        return set(self._pending.values())

    async def _derive(
        self,
        key: str,
        login: bytes,
        password: bytes,
        encoded: str,
        exists: bool,
        throttle: AuthThrottle | None,
        ip: str,
        known: bool,
    ) -> bool | None:
        """`check`'s shared part: reserve, scrypt, refund and remember a success."""
        try:
            username = login.decode("utf-8", "replace")
            take = await throttle.reserve(ip, username, known) if throttle is not None else Take()
            if take is None:
                return None
            secret = password.decode("utf-8", "replace")
            async with self._slots:
                ok = await asyncio.to_thread(verify_password, secret, encoded)
            if not ok or not exists:
                return False
            if throttle is not None:
                await throttle.refund(take)
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = time.monotonic() + _AUTH_CACHE_SECONDS
            return True
        finally:
            del self._pending[key]


def _retrieved(task: asyncio.Task[bool | None]) -> None:
    # A check whose sessions all left has nobody to raise its failure to: not worth a warning.
    if not task.cancelled():
        task.exception()


class Authenticator:
    def __init__(
        self,
        *,
        accounts: AccountStore,
        throttle: AuthThrottle,
        sessions: SessionRegistry,
        passwords: PasswordChecker,
    ) -> None:
        self._accounts = accounts
        self._throttle = throttle
        self._sessions = sessions
        self._passwords = passwords
        # Each authenticated session and the password hash it logged in with: a new password
        # (`relais account passwd`, after a leak) must end what the old one opened, or a session
        # held open would go on sending for as long as its holder likes.
        self._logins: weakref.WeakKeyDictionary[Session, tuple[str, str]] = weakref.WeakKeyDictionary()
        accounts.on_change(self._end_stale_logins)

    def _end_stale_logins(self) -> None:
        """Sessions whose account now has another password (or is gone) are no longer
        authenticated: their next MAIL or DATA gets 530, and they may log in again."""
        for session, (name, password_hash) in list(self._logins.items()):
            account = self._accounts.get(name)
            if account is None or account.password_hash != password_hash:
                session.authenticated = False
                del self._logins[session]

    async def plain(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                await server.push(str(AUTH_BAD_BASE64))
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")  # type: ignore[union-attr]
        if len(parts) != 3:
            await server.push(str(AUTH_MALFORMED))
            return AuthResult(success=False, handled=True)
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            # RFC 4616 2: no account may act as another. Refused before any password is checked,
            # so it tells a guesser nothing and is not counted as a failed guess.
            return AuthResult(success=False, handled=False, message=str(AUTH_AUTHZID))
        return await self._authenticate(server, authcid, password)

    async def login(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(LOGIN_USERNAME_CHALLENGE)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            login = _b64(args[1])
            if login is None:
                await server.push(str(AUTH_BAD_BASE64))
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(LOGIN_PASSWORD_CHALLENGE)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, login, password)  # type: ignore[arg-type]

    async def _authenticate(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        session = server.session
        assert session is not None
        state = facts(session)
        if not self._accounts.ready:
            await server.push(str(AUTH_UNAVAILABLE))
            return AuthResult(success=False, handled=True)
        username = login.decode("utf-8", "replace")
        account = self._accounts.get(username)
        if account is not None and account.disabled:
            account = None
        secret = account.password_hash if account is not None else ""
        locked, known = await self._throttle.locked(state.client_ip, username, secret)
        ok = None
        if not locked:
            ok = await self._passwords.check(
                login, password, account, self._throttle, state.client_ip, known=known
            )
        if ok is None:
            log.warning("AUTH throttled for %s / %r", state.client_ip, username)
            await server.push(str(AUTH_THROTTLED))
            server.hang_up()  # type: ignore[attr-defined]
            return AuthResult(success=False, handled=True)
        if not ok:
            return AuthResult(success=False, handled=False, message=str(AUTH_INVALID))
        assert account is not None
        await self._throttle.remember(state.client_ip, username, account.password_hash)
        current = self._accounts.get(username)
        if current is None or current.password_hash != account.password_hash:
            # The password changed while this one was checked: it is the account's no longer.
            # (From here to `_logins` nothing awaits, so no later change can pass unseen.)
            return AuthResult(success=False, handled=False, message=str(AUTH_INVALID))
        if state.holds_session_slot:
            # Logging in again after a new password ended the first login: still one session.
            self._sessions.release(state.account)
            state.holds_session_slot = False
        if not await self._sessions.acquire(username, account.max_sessions):
            await server.push(str(TOO_MANY_SESSIONS))
            return AuthResult(success=False, handled=True)
        state.account = username
        state.holds_session_slot = True
        self._logins[session] = (username, account.password_hash)
        return AuthResult(success=True, auth_data=username, message=str(AUTH_OK))


def _b64(value: str) -> bytes | None:
    if value == "=":
        return b""  # RFC 4954 4: an empty initial response, not a missing one
    try:
        return base64.b64decode(value.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
