"""`relais suppression list|add|remove|check`: the operator's view of the suppression lists."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime

from nats.js import JetStreamContext

from services.core.addresses import mailbox_error
from services.core.bus import connect, is_kv_delete, leader_last
from services.core.config import Config, parse_duration, valid_name
from services.core.suppression import Suppression, SuppressionList
from services.core.topology import ACCOUNTS_BUCKET, kv_stream, kv_subject

REASONS = ("manual", "hard_bounce", "complaint")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "never"


def describe(entry: Suppression) -> str:
    why = entry.reason + (f" ({entry.category})" if entry.category else "")
    since, expires = _when(entry.at), _when(entry.expires_at)
    return f"{entry.address}  {why}  since {since}  expires {expires}  source {entry.source or '-'}"


def _expiry(value: str) -> float:
    """`--expires`: seconds from now. Checked while parsing, so a typo is a usage error that
    touches nothing, not a traceback after connecting."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        # An entry expired at birth would report "suppressed" and suppress nothing.
        raise argparse.ArgumentTypeError(f"{value!r} is no time at all (leave --expires out for never)")
    return seconds


def _usage_error(args: argparse.Namespace) -> str:
    """What makes this command line unusable before anything is asked of NATS; "" when nothing."""
    if args.action == "list":
        return ""
    if args.action == "remove" and args.address is not None:
        # Asked after looking for an entry: those stored before `add` checked its address
        # (`add " "`) must still be removable, by the text they were added with.
        return ""
    return _address_error(args.action, args.address or "")


def _address_error(action: str, address: str) -> str:
    """What makes `address` no mail address to `action`; "" when nothing."""
    address = address.strip()
    if not address:
        return f"suppression {action} needs an address"
    # Else `add " "` stored an entry for no one, listed as if it suppressed someone.
    problem = mailbox_error(address)
    if problem:
        return f"suppression {action}: {address!r} is no mail address: it has {problem}"
    return ""


async def _known_account(js: JetStreamContext, config: Config, account: str) -> bool:
    """Whether the account exists: in the config file, or in KV, where `relais account add`
    writes the accounts (the file only seeds them). Read through the stream leader, which the
    bounce pod's NATS user may (it may not direct-get account records)."""
    if account in config.accounts:
        return True
    if not valid_name(account):  # no KV key, and a wildcard would match someone else's record
        return False
    record = await leader_last(js, kv_stream(ACCOUNTS_BUCKET), kv_subject(ACCOUNTS_BUCKET, account))
    return record is not None and not is_kv_delete(record) and bool(record.data)


async def run(config: Config, args: argparse.Namespace) -> int:
    refused = _usage_error(args)
    if refused:
        print(f"relais: {refused}", file=sys.stderr)
        return 2
    bus = await connect(config.nats, "relais-admin")
    try:
        if not args.force and not await _known_account(bus.js, config, args.account):
            unknown = f"unknown account {args.account!r} (use --force to manage it anyway)"
            print(f"relais: {unknown}", file=sys.stderr)
            return 2
        suppression = SuppressionList(bus.js)
        if args.action == "list":
            entries = await suppression.list(args.account)
            for entry in entries:
                print(json.dumps(asdict(entry)) if args.json else describe(entry))
            if not entries and not args.json:
                print(f"(no suppressed addresses for account {args.account})")
            return 0
        address = args.address.strip().lower()
        if args.action == "add":
            expires = time.time() + args.expires if args.expires else 0.0
            entry = Suppression(
                account=args.account,
                address=address,
                reason=args.reason,
                source=args.source or "operator",
                expires_at=expires,
            )
            await suppression.add(entry)
            print(f"suppressed {address} for account {args.account}")
            return 0
        if args.action == "remove":
            # Under the keys the text derives, as any removal: an entry is found by its own text.
            if await suppression.remove(args.account, address):
                print(f"removed {address if not mailbox_error(address) else repr(address)}")
                return 0
            refused = _address_error(args.action, args.address)
            if refused:
                print(f"relais: {refused}", file=sys.stderr)
                return 2
            print(f"{address} was not suppressed")
            return 1
        found = await suppression.get(args.account, address)
        print(describe(found) if found else f"{address} is not suppressed for account {args.account}")
        return 0 if found else 1
    finally:
        await bus.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "add", "remove", "check"])
    p.add_argument("address", nargs="?")
    p.add_argument("--account", "-a", required=True)
    p.add_argument("--reason", choices=REASONS, default="manual")
    p.add_argument("--source", default="", help="who or what asked for it (default: operator)")
    p.add_argument("--expires", type=_expiry, default=0.0, help="e.g. 30d; default: never")
    p.add_argument("--json", action="store_true", help="list as JSON lines")
    p.add_argument("--force", action="store_true", help="allow an account neither in the config nor in KV")
    p.add_argument("--config", "-c", help="TOML config file (default: $RELAIS_CONFIG)")
    p.add_argument("--nats-url", help="override nats.url")
