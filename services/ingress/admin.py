"""`relais account add/list/disable/enable/passwd`: accounts in NATS KV, live on every ingress replica."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys

from nats.js.errors import BucketNotFoundError

from services.core.accounts import hash_password
from services.core.bus import connect
from services.core.config import AccountConfig, Config
from services.core.topology import ACCOUNTS_BUCKET, ensure_topology
from services.ingress.accounts import (
    AccountRecordError,
    get_account,
    list_accounts,
    put_account,
    set_disabled,
    update_account,
    valid_name,
)

ACTIONS = ("add", "list", "disable", "enable", "passwd")


def add_arguments(sub: argparse._SubParsersAction, func: object) -> None:  # type: ignore[type-arg]
    """The account subcommands next to `relais account hash`."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="TOML config file (default: $RELAIS_CONFIG)")
        p.add_argument("--nats-url", help="override nats.url")
        p.set_defaults(func=func)

    p = sub.add_parser("add", help="create or replace an account (takes effect on every replica)")
    p.add_argument("name")
    p.add_argument("--domain", action="append", default=[], help="sender domain (repeat for several)")
    p.add_argument("--pool", default="default")
    p.add_argument("--allow-pool", action="append", default=[], help="pool selectable by X-Relais-Pool")
    p.add_argument("--password", help="default: prompt")
    p.add_argument("--max-per-hour", type=int, default=0)
    p.add_argument("--max-per-day", type=int, default=0)
    p.add_argument("--max-sessions", type=int, default=0)
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
    return (
        f"{name:<20} {state:<8} pools={pools:<16} domains={','.join(account.domains) or '-'}"
        f"  limits={' '.join(limits) or '-'}"
    )


async def run(config: Config, args: argparse.Namespace) -> int:
    action = args.account_command
    if action in ("add", "disable", "enable", "passwd") and not valid_name(args.name):
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
            # First command against a fresh cluster: declare everything, as a service would.
            await ensure_topology(bus.js, config)
        if action == "list":
            for name, account in (await list_accounts(bus.js)).items():
                print(describe(name, account))
            return 0
        if action == "add":
            password = args.password or getpass.getpass("password: ")
            account = AccountConfig(
                password_hash=hash_password(password),
                domains=[d.lower() for d in args.domain],
                pool=args.pool,
                pools=args.allow_pool,
                max_messages_per_hour=args.max_per_hour,
                max_messages_per_day=args.max_per_day,
                max_sessions=args.max_sessions,
            )
            await put_account(bus.js, args.name, account)
            print(describe(args.name, account))
            return 0
        if action == "passwd":
            if await get_account(bus.js, args.name) is None:
                print(f"relais: no account {args.name}", file=sys.stderr)
                return 1
            password_hash = hash_password(args.password or getpass.getpass("password: "))
            changed = await update_account(
                bus.js, args.name, lambda current: dataclasses.replace(current, password_hash=password_hash)
            )
            if changed is None:
                print(f"relais: no account {args.name}", file=sys.stderr)
                return 1
            return 0
        if not await set_disabled(bus.js, args.name, action == "disable"):
            print(f"relais: no account {args.name}", file=sys.stderr)
            return 1
        print(f"{args.name} {action}d")
        return 0
    except AccountRecordError as exc:
        print(f"relais: {exc}", file=sys.stderr)
        return 1
    finally:
        await bus.close()
