"""`relais account add/list/disable/enable/passwd/webhook`: accounts in NATS KV, live on every
ingress replica (authentication) and bounce replica (webhooks)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import secrets
import sys
import time
import urllib.parse

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from services.core.accounts import hash_password
from services.core.bus import connect
from services.core.config import AccountConfig, Config, parse_duration, webhook_problem
from services.core.topology import (
    ACCOUNTS_BUCKET,
    EVENTS_STREAM,
    ensure_topology,
    ensure_webhooks_consumers,
    webhooks_binding,
)
from services.ingress.accounts import (
    AccountRecordError,
    create_account,
    get_account,
    has_record,
    list_accounts,
    put_account,
    set_disabled,
    update_account,
    valid_name,
)


def add_arguments(sub: argparse._SubParsersAction, func: object) -> None:  # type: ignore[type-arg]
    """The account subcommands next to `relais account hash`."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="TOML config file (default: $RELAIS_CONFIG)")
        p.add_argument("--nats-url", help="override nats.url")
        p.set_defaults(func=func)

    p = sub.add_parser("add", help="create an account (takes effect on every replica)")
    p.add_argument("name")
    p.add_argument(
        "--replace",
        action="store_true",
        help="if the account exists, replace it: password, domains, pools, limits and webhook all "
        "become what this command gives (a disabled account is enabled)",
    )
    p.add_argument("--domain", action="append", default=[], help="sender domain (repeat for several)")
    p.add_argument("--pool", default="default")
    p.add_argument("--allow-pool", action="append", default=[], help="pool selectable by X-Relais-Pool")
    p.add_argument("--password", help="default: prompt")
    p.add_argument("--max-per-hour", type=int, default=0)
    p.add_argument("--max-per-day", type=int, default=0)
    p.add_argument("--max-sessions", type=int, default=0)
    p.add_argument("--webhook-url", default="", help="POST the account's events here (http:// or https://)")
    p.add_argument(
        "--webhook-secret", default="", help="HMAC signing secret (default: generated, printed once)"
    )
    common(p)
    p = sub.add_parser("webhook", help="set, rotate the secret of, or remove an account's event webhook")
    p.add_argument("name")
    change = p.add_mutually_exclusive_group()
    change.add_argument("--url", help="POST the account's events here (keeps the current secret)")
    change.add_argument("--clear", action="store_true", help="remove the webhook and its unposted events")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret", help="HMAC signing secret, at least 16 characters")
    secret.add_argument("--new-secret", action="store_true", help="generate a new secret (printed once)")
    p.add_argument(
        "--overlap",
        metavar="DURATION",
        help="with --secret or --new-secret: the current secret signs too for this long (e.g. 24h), "
        "so the receiver can switch at any moment within it (default: it stops at once)",
    )
    common(p)
    p = sub.add_parser("list", help="list accounts")
    common(p)
    helps = {
        "disable": "refuse AUTH for an account",
        "enable": "allow AUTH again",
        "passwd": "set a new password",
    }
    for action, text in helps.items():
        p = sub.add_parser(action, help=text)
        p.add_argument("name")
        if action == "passwd":
            p.add_argument("--password", help="default: prompt")
        common(p)


def describe(name: str, account: AccountConfig) -> str:
    limits = []
    if account.max_messages_per_hour:
        limits.append(f"{account.max_messages_per_hour}/h")
    if account.max_messages_per_day:
        limits.append(f"{account.max_messages_per_day}/d")
    if account.max_sessions:
        limits.append(f"{account.max_sessions} sessions")
    pools = ",".join([account.pool, *account.pools])
    state = "disabled" if account.disabled else "active"
    webhook = f"  webhook={shown_url(account.webhook_url)}" if account.webhook_url else ""
    return (
        f"{name:<20} {state:<8} pools={pools:<16} domains={','.join(account.domains) or '-'}"
        f"  limits={' '.join(limits) or '-'}{webhook}"
    )


def shown_url(url: str) -> str:
    """The URL without the password a receiver's basic auth put in it."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def new_webhook_secret() -> str:
    # 256 bits, as the signing secrets Stripe and Svix hand out.
    return secrets.token_hex(32)


async def run(config: Config, args: argparse.Namespace) -> int:
    action = args.account_command
    if action != "list" and not valid_name(args.name):
        print("relais: account names are lowercase letters, digits, '-' and '_'", file=sys.stderr)
        return 2
    if action == "add":
        unknown = [p for p in [args.pool, *args.allow_pool] if p not in config.pools]
        if unknown:
            print(f"relais: unknown pool(s) {', '.join(unknown)}", file=sys.stderr)
            return 2
    bus = await connect(config.nats, "relais-account-admin")
    try:
        try:
            await bus.js.key_value(ACCOUNTS_BUCKET)
        except BucketNotFoundError:
            if not config.nats.declare_topology:
                no_bucket = "no account bucket: apply the topology first (relais topology apply)"
                print(f"relais: {no_bucket}", file=sys.stderr)
                return 1
            # First command against a fresh cluster: declare everything, as a service would.
            await ensure_topology(bus.js, config)
        if action == "list":
            for name, account in (await list_accounts(bus.js)).items():
                print(describe(name, account))
            return 0
        if action == "add":
            return await _add(bus.js, config, args)
        if action == "passwd":
            return await _passwd(bus.js, args)
        if action == "webhook":
            return await _webhook(bus.js, config, args)
        if not await set_disabled(bus.js, args.name, action == "disable"):
            return _no_account(args.name)
        print(f"{args.name} {action}d")
        return 0
    except AccountRecordError as exc:
        print(f"relais: {exc}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


def _no_account(name: str) -> int:
    print(f"relais: no account {name}", file=sys.stderr)
    return 1


def _refuse(problem: str) -> int:
    print(f"relais: {problem}", file=sys.stderr)
    return 2


def _exists(name: str, where: str) -> int:
    # Exit status 1, as for `no account`: the command line was fine, the accounts are not.
    print(
        f"relais: account {name} already exists ({where}): --replace to overwrite all of it "
        "(`passwd`, `webhook`, `disable` change one part)",
        file=sys.stderr,
    )
    return 1


async def _add(js: JetStreamContext, config: Config, args: argparse.Namespace) -> int:
    if args.webhook_secret and not args.webhook_url:
        return _refuse("--webhook-secret needs --webhook-url")
    secret = args.webhook_secret or (new_webhook_secret() if args.webhook_url else "")
    problem = webhook_problem(args.webhook_url, secret)
    if problem:
        return _refuse(problem)
    # Told before the password prompt; `create_account` below is what holds when two admins
    # add the name at once. A name only in the file would be seeded from it at an ingress's
    # start, unless a record is there by then: this one would win over the file for good.
    if not args.replace and await has_record(js, args.name):
        return _exists(args.name, "in KV")
    if not args.replace and args.name in config.accounts:
        return _exists(args.name, "in the config file")
    password = args.password or getpass.getpass("password: ")
    account = AccountConfig(
        password_hash=hash_password(password),
        domains=[d.lower() for d in args.domain],
        pool=args.pool,
        pools=args.allow_pool,
        max_messages_per_hour=args.max_per_hour,
        max_messages_per_day=args.max_per_day,
        max_sessions=args.max_sessions,
        webhook_url=args.webhook_url,
        webhook_secret=secret,
    )
    if account.webhook_url:
        # Before the record: the events of the account's first messages are kept for it.
        await ensure_webhooks_consumers(js, config, reconcile=False, accounts=[args.name])
    if args.replace:
        await put_account(js, args.name, account)
    elif not await create_account(js, args.name, account):
        return _exists(args.name, "in KV, added meanwhile")
    print(describe(args.name, account))
    if account.webhook_url and not args.webhook_secret:
        print(f"webhook secret: {secret}")
    return 0


async def _passwd(js: JetStreamContext, args: argparse.Namespace) -> int:
    if await get_account(js, args.name) is None:
        return _no_account(args.name)
    password_hash = hash_password(args.password or getpass.getpass("password: "))
    changed = await update_account(
        js, args.name, lambda current: dataclasses.replace(current, password_hash=password_hash)
    )
    return 0 if changed is not None else _no_account(args.name)


async def _webhook(js: JetStreamContext, config: Config, args: argparse.Namespace) -> int:
    """Set, re-point, re-key or remove an account's webhook. Re-pointing keeps the secret (and
    the consumer, so no event is skipped); removing deletes the consumer with the events it
    had not posted yet, as deleting a webhook at Postmark or SendGrid does."""
    overlap = 0.0
    if args.overlap is not None:
        if not (args.secret or args.new_secret):
            return _refuse("--overlap needs --secret or --new-secret")
        try:
            overlap = parse_duration(args.overlap)
        except ValueError as exc:
            return _refuse(f"--overlap: {exc}")
    current = await get_account(js, args.name)
    if current is None:
        return _no_account(args.name)
    if args.clear:
        if args.secret or args.new_secret:
            return _refuse("--clear takes no secret")
        await update_account(js, args.name, lambda account: _with_webhook(account, "", ""))
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(EVENTS_STREAM, webhooks_binding(args.name).durable)
        print(f"{args.name}: webhook removed")
        return 0
    if not (args.url or args.secret or args.new_secret):
        shown = shown_url(current.webhook_url) if current.webhook_url else "none"
        print(f"{args.name}: webhook {shown}{_overlap_note(current)}")
        return 0
    url = args.url or current.webhook_url
    if not url:
        return _refuse(f"account {args.name} has no webhook: give --url")
    if overlap and not current.webhook_secret:
        return _refuse(f"--overlap: account {args.name} has no secret to keep signing with")
    generated = args.new_secret or not (args.secret or current.webhook_secret)
    secret = new_webhook_secret() if generated else args.secret or current.webhook_secret
    problem = webhook_problem(url, secret)
    if problem:
        return _refuse(problem)
    until = time.time() + overlap if overlap else 0.0
    await ensure_webhooks_consumers(js, config, reconcile=False, accounts=[args.name])
    changed = await update_account(
        js, args.name, lambda account: _with_webhook(account, url, secret, overlap_until=until)
    )
    if changed is None:
        return _no_account(args.name)
    print(f"{args.name}: webhook {shown_url(url)}{_overlap_note(changed)}")
    if generated:
        print(f"webhook secret: {secret}")
    return 0


def _with_webhook(
    account: AccountConfig, url: str, secret: str, *, overlap_until: float = 0.0
) -> AccountConfig:
    """The record with this webhook (url "": none). A secret that changes ends any overlap at
    once (a leaked one must stop signing when it is replaced), unless `overlap_until` keeps the
    one it replaces signing until then (one overlap at a time: the secret before that stops).
    From the record as read for the compare-and-set: the secret kept is the one stored then."""
    if url and secret == account.webhook_secret:
        return dataclasses.replace(account, webhook_url=url)  # re-pointed: an overlap goes on
    keep = bool(overlap_until and url and account.webhook_secret)
    return dataclasses.replace(
        account,
        webhook_url=url,
        webhook_secret=secret,
        webhook_previous_secret=account.webhook_secret if keep else "",
        webhook_previous_secret_until=overlap_until if keep else 0.0,
    )


def _overlap_note(account: AccountConfig) -> str:
    until = account.webhook_previous_secret_until
    if not account.webhook_previous_secret or until <= time.time():
        return ""
    shown = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    return f" (the previous secret signs too until {shown})"
