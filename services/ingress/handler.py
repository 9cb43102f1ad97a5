"""The aiosmtpd adapter: each hook gathers facts, asks policy for a verdict, and answers."""

from __future__ import annotations

import datetime
import email.utils
import logging
import time
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.core.addresses import recipient_key
from services.core.bus import BrokerUnavailable
from services.core.config import AccountConfig, Config
from services.core.envelope import META_POOL, new_message_id
from services.core.telemetry import recording, tracer
from services.ingress import headers, policy
from services.ingress.accounts import AccountStore
from services.ingress.auth import Authenticator
from services.ingress.budget import ByteBudget
from services.ingress.handoff import Handoff, Submission, past_the_client, unavailable_reply
from services.ingress.limits import MessageRates, SessionRegistry
from services.ingress.replies import (
    ACCOUNTS_UNAVAILABLE,
    LOCAL_ERROR,
    TOO_MANY_CONNECTIONS,
)
from services.ingress.session import facts, peer_ip, tls_facts

log = logging.getLogger(__name__)

_BODY_8BIT = "BODY=8BITMIME"


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    message_id: str,
    account: str,
    tls: tuple[str, str] | None,
    extended: bool = True,
    smtputf8: bool = False,
) -> bytes:
    """`account`: the account the client authenticated as (SMTP AUTH), "" for none: a relay
    network's client did not, and "ESMTPA" says it did (RFC 3848). `extended`: the client said
    EHLO, not HELO; `smtputf8`: the transaction asked for SMTPUTF8 (RFC 6531 3.7.3's names)."""
    base = "UTF8SMTP" if smtputf8 else "ESMTP" if extended else "SMTP"
    protocol = base + ("S" if tls else "") + ("A" if account else "")
    tls_part = f"\r\n\t(using {tls[0]} with cipher {tls[1]})" if tls else ""
    auth_part = f"\r\n\t(authenticated as {account})" if account else ""
    # RFC 5321 4.1.3: an IPv6 address literal carries its tag. A PROXY header may name no address.
    literal = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    ip_part = f" ([{literal}])" if peer_ip else ""
    # A numeric zone (RFC 5321 4.4); "GMT" is RFC 5322's obsolete syntax, never to be generated.
    stamp = email.utils.format_datetime(datetime.datetime.now(datetime.UTC))
    return (
        f"Received: from {helo or 'unknown'}{ip_part}{tls_part}{auth_part}\r\n"
        f"\tby {hostname} (Relais) with {protocol} id {message_id};\r\n"
        f"\t{stamp}\r\n"
    ).encode()


class IngressHandler:
    """One per listener; `mode` is "submission", "implicit-tls" or "inbound"."""

    def __init__(
        self,
        config: Config,
        handoff: Handoff,
        *,
        mode: str = "submission",
        accounts: AccountStore,
        rates: MessageRates,
        sessions: SessionRegistry,
        auth: Authenticator,
        budget: ByteBudget | None = None,
    ) -> None:
        self._config = config
        self._handoff = handoff
        self.mode = mode
        self._budget = budget if budget is not None else ByteBudget(0)
        self._accounts = accounts
        self._rates = rates
        self._sessions = sessions
        self._auth = auth
        self._local_domains = policy.local_domains(config)

    @property
    def inbound(self) -> bool:
        return self.mode == "inbound"

    # -- connection ------------------------------------------------------------------------------

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope, proxy_data: Any) -> bool:
        # Only load balancers get this far: others were closed when accepted (door.py).
        if not getattr(proxy_data, "valid", False):
            return False
        ip = facts(session).client_ip = peer_ip(session)
        if not server.admit(ip):  # type: ignore[attr-defined]
            await server.push(str(TOO_MANY_CONNECTIONS))
            return False
        return True

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses[:-1] if not (self.inbound and r.startswith("250-AUTH"))]
        out += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        out += [] if self.inbound else ["250-DSN"]
        out += ["250 HELP"]
        return out

    def session_closed(self, session: Session) -> None:
        state = facts(session)
        if state.holds_session_slot:
            state.holds_session_slot = False
            self._sessions.release(state.account)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The client's handshake after STARTTLS failed (aiosmtpd then closes, answering
            # nothing): a scanner or a client that does not trust us, no fault of ours.
            log.info("STARTTLS handshake failed: %r", error.__cause__)
            return str(LOCAL_ERROR)
        # Never show a client our internals; a 4xx makes it retry, which is right for our faults.
        log.exception("SMTP session error: %r", error)
        return str(LOCAL_ERROR)

    # -- AUTH: aiosmtpd finds auth_<MECH> methods on the handler -------------------------------

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if self.inbound:
            return AuthResult(success=False, handled=False)
        return await self._auth.plain(server, args)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if self.inbound:
            return AuthResult(success=False, handled=False)
        return await self._auth.login(server, args)

    # -- envelope ----------------------------------------------------------------------------------

    def _account(self, session: Session) -> tuple[str, AccountConfig | None]:
        state = facts(session)
        if session.authenticated and state.account:
            return state.account, self._accounts.get(state.account)
        ingress = self._config.ingress
        if ingress.relay_networks and policy.in_networks(state.client_ip, ingress.relay_networks):
            name = ingress.relay_networks_account
            return name, self._accounts.get(name)
        return "", None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        sender = "" if address == "<>" else address
        if self.inbound:
            verdict = policy.inbound_sender_verdict(sender, smtputf8=envelope.smtp_utf8)
        elif not self._accounts.ready:
            return str(ACCOUNTS_UNAVAILABLE)
        else:
            name, account = self._account(session)
            verdict = policy.sender_verdict(account, sender, smtputf8=envelope.smtp_utf8)
            if verdict is None and account is not None:
                verdict = self._rates.check(name, account)
        # Last: the budget's state is nobody's business before the sender is known to be allowed.
        room = self._budget.room(anonymous=self.inbound)
        verdict = verdict or policy.storage_verdict(mail_options, room)
        if verdict:
            return str(verdict)
        # aiosmtpd needs a truthy mail_from to accept RCPT; "<>" stands for the null sender.
        envelope.mail_from = sender or "<>"
        envelope.mail_options.extend(mail_options)
        envelope.dsn_ret, envelope.dsn_envid = getattr(server, "dsn_mail", ("", ""))  # type: ignore[attr-defined]
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        ingress = self._config.ingress
        if self.inbound:
            address = policy.local_postmaster(address, self._local_domains)
            verdict = policy.inbound_recipient_verdict(
                address,
                _accepted_rcpts(envelope),
                ingress.max_recipients,
                self._local_domains,
                smtputf8=envelope.smtp_utf8,
            )
        else:
            verdict = policy.recipient_verdict(
                address, _accepted_rcpts(envelope), ingress.max_recipients, smtputf8=envelope.smtp_utf8
            )
        if verdict:
            return str(verdict)
        # Every RCPT accepted counts against the limit, a repeated one too (as in Postfix):
        # otherwise repeating one recipient would hold a session open for ever without an error.
        envelope.rcpt_accepted = _accepted_rcpts(envelope) + 1  # type: ignore[attr-defined]
        keys = _recipient_keys(envelope)
        key = recipient_key(address)
        if key in keys:
            # As Postfix's duplicate filter: accepted, but delivered (and reported) once.
            return "250 2.1.5 Ok"
        keys.add(key)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        notify, orcpt = getattr(server, "dsn_rcpt", ("", ""))
        if notify:
            _dsn_map(envelope, "dsn_notify")[address] = notify
        if orcpt:
            _dsn_map(envelope, "dsn_orcpt")[address] = orcpt
        return "250 2.1.5 Ok"

    # -- DATA ----------------------------------------------------------------------------------------

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        ingress = self._config.ingress
        data = envelope.original_content or b""
        eight_bit = _BODY_8BIT in envelope.mail_options or envelope.smtp_utf8
        verdict = policy.content_verdict(
            data,
            ingress.bare_line_endings,
            eight_bit_declared=eight_bit,
            max_header_size=ingress.max_header_size,
            lines=getattr(envelope, "line_stats", None),
        )
        if verdict:
            return str(verdict)
        # With bare_line_endings = "normalise" the DATA reader made every line end CRLF already.
        head, rest = headers.split_message(data)
        verdict = policy.hop_verdict(head)
        if verdict:
            return str(verdict)
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        state = facts(session)
        tls = tls_facts(session)
        meta: dict[str, str] = {"listener": self.mode}
        if tls:
            meta |= {"tls_version": tls[0], "tls_cipher": tls[1], "tls": f"{tls[0]} {tls[1]}"}
        if envelope.smtp_utf8:
            meta["smtputf8"] = "1"
        if _BODY_8BIT in envelope.mail_options:
            meta["body"] = "8BITMIME"
        message_id = new_message_id()
        if self.inbound:
            inbound = Submission(
                account="",
                sender=sender,
                recipients=tuple(envelope.rcpt_tos),
                sender_domain=policy.domain_of(sender) if sender else "",
                data=self._received(session, envelope, message_id, "", tls) + data,
                client_ip=state.client_ip,
                meta=meta,
                kind="inbound",
            )
            # As a submission's: cut between the body's store and the envelope's publish, the
            # body would stay in the Object Store for days with nothing to read or discard it.
            return await past_the_client(self._queue(session, inbound, message_id))
        name, account = self._account(session)
        # Asked again: the account may have been disabled, or lost the domain, since MAIL FROM.
        verdict = policy.sender_verdict(account, sender, smtputf8=envelope.smtp_utf8)
        if verdict:
            return str(verdict)
        assert account is not None  # sender_verdict refuses a missing account
        block = headers.HeaderBlock(head)  # parsed once for every question below
        verdict = policy.from_header_verdict(account, block)
        if verdict and (not sender or ingress.from_header_check == "reject"):
            # Null sender: the From: header is the only identity there is, so it must be owned.
            return str(verdict)
        # After the ownership check, whose reason a foreign From: keeps; before the report-only
        # log, which a refused message should not write. Submission only: the inbound listener
        # takes bounces and reports as they come.
        refusal = policy.header_fields_verdict(block)
        if refusal:
            return str(refusal)
        if verdict:
            meta["from_not_owned"] = "1"
            log.info(
                "account %s sent From: %s, Sender: %s (report-only)",
                name,
                policy.from_header_domains(block),
                policy.from_header_domains(block, "sender"),
            )
        sender_domain = policy.domain_of(sender) if sender else policy.from_header_domains(block)[0]
        campaign = policy.control_value(block.first(headers.CAMPAIGN_HEADER))
        if campaign:
            meta["campaign"] = campaign
        requested_pool = block.first(headers.POOL_HEADER)
        if requested_pool is not None:
            pool = policy.control_value(requested_pool)
            verdict = policy.pool_verdict(pool, account, self._config.pools)
            if verdict:
                return str(verdict)
            meta[META_POOL] = pool
        message = headers.join(
            block.without(headers.CONTROL_HEADERS + headers.DROPPED_HEADERS),
            headers.missing_fields(block, message_id=message_id, hostname=ingress.hostname, now=time.time()),
            rest,
        )
        authenticated = name if session.authenticated else ""  # not a relay network's client
        submission = Submission(
            account=name,
            sender=sender,
            recipients=tuple(envelope.rcpt_tos),
            sender_domain=sender_domain,
            data=self._received(session, envelope, message_id, authenticated, tls) + message,
            client_ip=state.client_ip,
            meta=meta,
            dsn_ret=getattr(envelope, "dsn_ret", ""),
            dsn_envid=getattr(envelope, "dsn_envid", ""),
            dsn_notify=dict(getattr(envelope, "dsn_notify", {})),
            dsn_orcpt=dict(getattr(envelope, "dsn_orcpt", {})),
        )
        return await past_the_client(self._queue_counted(session, submission, message_id, account))

    async def _queue_counted(
        self, session: Session, sub: Submission, message_id: str, account: AccountConfig
    ) -> str:
        """Count the message against its account's rate, queue it, and refund the count unless it
        was queued: the quota is used exactly by the messages queued."""
        try:
            verdict, take = await self._rates.reserve(sub.account, account, message_id)
        except BrokerUnavailable as exc:
            return unavailable_reply(exc)
        if verdict:
            return str(verdict)
        reply = str(LOCAL_ERROR)  # what the client sees if queueing raises (handle_exception)
        try:
            reply = await self._queue(session, sub, message_id)
        finally:
            if not reply.startswith("250"):
                await self._rates.refund(take)
        return reply

    def _received(
        self,
        session: Session,
        envelope: Envelope,
        message_id: str,
        account: str,
        tls: tuple[str, str] | None,
    ) -> bytes:
        return received_header(
            helo=session.host_name or "",
            peer_ip=facts(session).client_ip,
            hostname=self._config.ingress.hostname,
            message_id=message_id,
            account=account,
            tls=tls,
            extended=bool(session.extended_smtp),
            smtputf8=bool(envelope.smtp_utf8),
        )

    async def _queue(self, session: Session, sub: Submission, message_id: str) -> str:
        if not recording():
            # What OpenTelemetry's no-op tracer would make the span: the current one, unchanged
            # (attaching it as current again, and back, cost ~3% of the CPU per message).
            return await self._handoff.queue(sub, message_id=message_id, span=trace.get_current_span())
        with tracer().start_as_current_span(
            "smtp receive",
            kind=SpanKind.SERVER,
            attributes={
                "relais.message_id": message_id,
                "relais.account": sub.account,
                "relais.sender_domain": sub.sender_domain,
                "client.address": sub.client_ip,
                "relais.recipient_count": len(sub.recipients),
                "relais.listener": self.mode,
            },
        ) as span:
            reply = await self._handoff.queue(sub, message_id=message_id, span=span)
            span.set_attribute("smtp.reply", reply[:3])
            return reply


def _accepted_rcpts(envelope: Envelope) -> int:
    """RCPT commands accepted in this transaction, repeated recipients included."""
    return getattr(envelope, "rcpt_accepted", len(envelope.rcpt_tos))


def _recipient_keys(envelope: Envelope) -> set[str]:
    """The recipients accepted so far in this transaction, by `recipient_key`; a set, so a
    thousand RCPTs cost a thousand lookups rather than half a million comparisons."""
    found = getattr(envelope, "rcpt_keys", None)
    if found is None:
        found = {recipient_key(a) for a in envelope.rcpt_tos}
        envelope.rcpt_keys = found  # type: ignore[attr-defined]
    return found


def _dsn_map(envelope: Envelope, name: str) -> dict[str, str]:
    found = getattr(envelope, name, None)
    if found is None:
        found = {}
        setattr(envelope, name, found)
    return found
