"""`relais <command>`: run one service, the whole laptop cluster, or an admin command."""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

# Relais' own modules are imported inside the commands, after main() has made Ctrl-C quiet: they
# take a good part of a second to import, and a Ctrl-C then would end in a traceback.
if TYPE_CHECKING:
    from services.core.config import Config


def _builders() -> dict[str, Callable[..., object]]:
    # Imported lazily so `relais validate` does not pay for every service's imports.
    from services.bounce.service import BounceService
    from services.delivery.service import DeliveryService
    from services.ingress.service import IngressService
    from services.router.service import RouterService

    return {
        "ingress": IngressService,
        "router": RouterService,
        "delivery": DeliveryService,
        "bounce": BounceService,
    }


SERVICES = ("ingress", "router", "delivery", "bounce")


def _load(path: str | None) -> Config:
    from services.core.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"relais: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_service(args: argparse.Namespace) -> int:
    import asyncio

    from services.core.runtime import serve, setup_logging

    setup_logging(args.log_level)
    config = _load(args.config)
    if args.nats_url:
        from services.core.config import replace

        config = replace(config, nats={"url": args.nats_url})
    asyncio.run(serve(config, args.command, _builders()[args.command]))  # type: ignore[arg-type]
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from services.core.config import ConfigError

    config = _load(args.config)
    if config.dkim:
        from services.router.dkim import load_keys

        try:
            load_keys(config)  # unreadable or wrong-type key files fail here, not at router start
        except ConfigError as exc:
            print(f"relais: invalid configuration: {exc}", file=sys.stderr)
            return 2
    from services.delivery.shaping import load_shaping

    try:
        load_shaping(config.delivery.shaping_file)  # built-in rules + the operator's file, if any
    except ConfigError as exc:
        print(f"relais: invalid configuration: {exc}", file=sys.stderr)
        return 2
    print(
        f"ok: {len(config.accounts)} account(s), {len(config.pools)} pool(s), "
        f"{len(config.sender_domains)} sender domain mapping(s), delivery mode {config.delivery.mode}"
    )
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    from services.core.config import ConfigError
    from services.router.dkim import dns_record, load_keys

    try:
        keys = load_keys(_load(args.config))
    except ConfigError as exc:
        print(f"relais: invalid configuration: {exc}", file=sys.stderr)
        return 2
    for domain_keys in keys.values():
        for key in domain_keys:
            name, txt = dns_record(key)
            # Zone-file syntax: one record, split into character-strings of at most 255 bytes.
            chunks = " ".join(f'"{txt[i : i + 255]}"' for i in range(0, len(txt), 255))
            print(f"{name}. IN TXT ( {chunks} )")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.core.config import ConfigError
    from services.core.embedded import NatsServerFailed
    from services.up import run_up

    try:
        return run_up(data_dir=Path(args.data_dir), config_path=args.config, smtp_port=args.port)
    except ConfigError as exc:  # read before anything starts
        print(f"relais: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except NatsServerFailed as exc:  # its store dir in use, its port taken, no binary
        print(f"relais: {exc}", file=sys.stderr)
        return 1


def cmd_mailbox(args: argparse.Namespace) -> int:
    from services.delivery.capture import list_captured

    config = _load(args.config)
    mailbox = Path(config.delivery.capture_dir)
    messages = list_captured(mailbox)
    if args.action == "list":
        if not messages:
            print(f"(no messages in {mailbox})")
        for m in messages:
            print(f"{m.job_id}  {m.size:>8}  from <{m.sender}>  to {', '.join(m.recipients)}")
        return 0
    for m in messages:
        if args.id in (m.job_id, m.message_id):
            sys.stdout.write(m.path.read_bytes().decode("utf-8", "replace"))
            return 0
    print(f"relais: no captured message {args.id}", file=sys.stderr)
    return 1


def cmd_account_hash(args: argparse.Namespace) -> int:
    from services.core.accounts import hash_password

    password = args.password or getpass.getpass("password: ")
    print(hash_password(password))
    return 0


def cmd_account(args: argparse.Namespace) -> int:
    from services.admin.commands import run_with_config
    from services.ingress import admin

    return run_with_config(args, admin.run)


def cmd_suppression(args: argparse.Namespace) -> int:
    from services.admin.commands import run_with_config
    from services.bounce import admin

    return run_with_config(args, admin.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relais", description="Distributed SMTP relay on NATS JetStream")
    sub = parser.add_subparsers(dest="command", required=True)

    for name in SERVICES:
        p = sub.add_parser(name, help=f"run the {name} service")
        p.add_argument("--config", "-c", help="TOML config file (default: $RELAIS_CONFIG)")
        p.add_argument("--nats-url", help="override nats.url")
        p.add_argument("--log-level", default="INFO")
        p.set_defaults(func=cmd_service)

    p = sub.add_parser("up", help="run everything on this machine with an embedded nats-server")
    p.add_argument("--data-dir", default="relais-data")
    p.add_argument("--config", "-c", help="config file (default: generated in the data dir)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="SMTP port on 127.0.0.1 of the generated config (default: the one it was generated with, 2525)",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("validate", help="check a config file")
    p.add_argument("config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("dkim", help="print the DNS TXT records publishing the configured DKIM keys")
    p.add_argument("config")
    p.set_defaults(func=cmd_dkim)

    p = sub.add_parser("mailbox", help="list or show mail captured by `relais up`")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("id", nargs="?")
    p.add_argument("--config", "-c", default="relais-data/relais.toml")
    p.set_defaults(func=cmd_mailbox)

    p = sub.add_parser("suppression", help="list, add, remove or check suppressed addresses of an account")
    from services.bounce.admin import add_arguments as suppression_arguments

    suppression_arguments(p)
    p.set_defaults(func=cmd_suppression)

    p = sub.add_parser("account", help="account tools")
    acct = p.add_subparsers(dest="account_command", required=True)
    h = acct.add_parser("hash", help="print the scrypt hash of a password for the config file")
    h.add_argument("--password")
    h.set_defaults(func=cmd_account_hash)
    from services.ingress.admin import add_arguments as account_arguments

    account_arguments(acct, cmd_account)

    from services.admin.commands import register as register_admin

    register_admin(sub, shaping_sites=_shaping_sites)
    return parser


def _shaping_sites(config: Config) -> frozenset[str]:
    """The site names the configured shaping rules give, for `relais pause site`. Raises ConfigError."""
    from services.delivery.shaping import load_shaping

    return load_shaping(config.delivery.shaping_file).claiming_sites()


def _interrupted_while_starting(signum: int, _frame: FrameType | None) -> None:
    """Ctrl-C while `relais` is still importing, before its command started anything: it ends
    at once, as killed by the signal (what shells report as 130, and what Python itself does
    after an uncaught KeyboardInterrupt), only without the traceback."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _quiet_ctrl_c_while_starting() -> Callable[[], None]:
    """Makes a Ctrl-C quiet until the command begins; returns what puts Python's handler back.
    Only Python's own handler is replaced: a SIGINT ignored by the shell (a job started in the
    background) stays ignored, and `relais up` then leaves it so too."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return lambda: None
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    return lambda: signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    restore = _quiet_ctrl_c_while_starting()
    try:
        args = build_parser().parse_args(argv)
    except BaseException:  # --help, a usage error
        restore()
        raise
    # `relais up` keeps it until its own stop handlers replace it (services.up._on_stop_signals),
    # after more imports; every other command gets Python's KeyboardInterrupt back, as before.
    if args.command != "up":
        restore()
    if args.command == "mailbox" and args.action == "show" and not args.id:
        print("relais: mailbox show needs a message id", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
