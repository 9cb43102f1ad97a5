"""The admin commands of `relais`: status, message, trace, pause/resume, requeue, bounce-queue,
topology apply.

All but `trace` talk to NATS only (`--nats-url` or the config's nats.url), so they work against
any cluster from anywhere that reaches it. `trace` reads the local JSON-lines trace file.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Collection, Coroutine
from pathlib import Path
from typing import Any

import nats.errors
from nats.js.errors import BucketNotFoundError, NotFoundError

from services.core.bus import BrokerUnavailable, Bus, connect
from services.core.config import Config, ConfigError, load_config, replace
from services.core.pause import PAUSE_KINDS, PausedAgain, PauseError, PauseState, pause_name

DEFAULT_TRACES = "relais-data/traces.jsonl"


def config_for(args: argparse.Namespace) -> Config:
    """The configuration an admin command runs with: the file's, `--nats-url` over its URL."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"relais: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if getattr(args, "nats_url", None):
        config = replace(config, nats={"url": args.nats_url})
    return config


# How NATS failing during a command shows: a JetStream error (a stream or bucket missing), no
# answer in time, the connection lost.
_NATS_FAILURES = (BrokerUnavailable, nats.errors.Error, TimeoutError, OSError)


def run_against_nats(config: Config, command: Coroutine[Any, Any, int]) -> int:
    """Run an admin command; NATS failing is one line on stderr and exit status 1, not a
    traceback (nor, for a cluster without Relais' streams, a bare "not found")."""
    # The transport logs reconnects and disconnects, which is noise on an operator's terminal.
    logging.basicConfig(level=logging.ERROR)
    try:
        return asyncio.run(command)
    except _NATS_FAILURES as exc:
        print(f"relais: {_nats_failure(config, exc)}", file=sys.stderr)
        return 1


def run_with_config(
    args: argparse.Namespace, command: Callable[[Config, argparse.Namespace], Coroutine[Any, Any, int]]
) -> int:
    """`command(config, args)` for a command that connects by itself (account, suppression)."""
    config = config_for(args)
    return run_against_nats(config, command(config, args))


def _nats_failure(config: Config, exc: BaseException) -> str:
    if isinstance(exc, BrokerUnavailable):
        return str(exc)
    if isinstance(exc, NotFoundError | BucketNotFoundError):
        what = getattr(exc, "description", None) or "bucket not found"
        return f"NATS at {config.nats.url}: {what}: no Relais topology there (the services' cluster?)"
    return f"NATS at {config.nats.url}: {exc!r}"


def _with_bus(
    args: argparse.Namespace, action: Callable[[Bus], Awaitable[int]], config: Config | None = None
) -> int:
    config = config if config is not None else config_for(args)

    async def main() -> int:
        try:
            bus = await asyncio.wait_for(
                connect(config.nats, "relais-admin"), config.nats.connect_timeout + 3
            )
        except Exception as exc:
            print(f"relais: cannot reach NATS at {config.nats.url}: {exc!r}", file=sys.stderr)
            return 1
        try:
            return await action(bus)
        finally:
            await bus.close()

    return run_against_nats(config, main())


def cmd_status(args: argparse.Namespace) -> int:
    from services.admin.status import collect_status, render_status

    async def action(bus: Bus) -> int:
        status = await collect_status(bus, interval=args.interval, scan_sites=not args.no_scan)
        print(render_status(status))
        return 0

    return _with_bus(args, action)


def cmd_message(args: argparse.Namespace) -> int:
    from services.admin.history import lookup_of, message_events, render_history

    asked = lookup_of(args.id)

    async def action(bus: Bus) -> int:
        events = await message_events(bus.js, asked.message_id)
        print(render_history(asked.message_id, events, job=asked.job_key))
        return 0 if events else 1

    return _with_bus(args, action)


def cmd_trace(args: argparse.Namespace) -> int:
    from services.admin.history import lookup_of
    from services.admin.trace import load_spans, render_message, trace_files

    path = args.file
    if path is None:
        try:
            config = load_config(args.config)
            path = config.telemetry.traces_file or DEFAULT_TRACES
        except ConfigError:
            path = DEFAULT_TRACES
    files = trace_files(path)
    if not files:
        print(f'relais: no trace file at {path} (set telemetry.traces = "jsonl")', file=sys.stderr)
        return 1
    try:
        spans = load_spans(files)
    except OSError as exc:
        print(
            f"relais: cannot read the trace file {exc.filename or path}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    # A job key or a copied id finds its message's traces, as with `relais message`.
    text = render_message(spans, lookup_of(args.id).message_id)
    if text is None:
        print(f"relais: no spans for {args.id} in {path}", file=sys.stderr)
        return 1
    print(text)
    return 0


SITE_HELP = (
    "site, as the router names it and `relais status` lists it (a [sites] rule's name, else the"
    " registrable part of the primary MX host: alpha.test for mx1.alpha.test; never an MX host),"
    " or recipient domain"
)


# The site names delivery's shaping rules give (`relais` wires delivery's reader of them in).
ShapingSites = Callable[[Config], Collection[str]]


def _no_shaping_sites(config: Config) -> Collection[str]:
    return ()


def cmd_pause(args: argparse.Namespace) -> int:
    config = config_for(args)
    shaping_sites: ShapingSites = getattr(args, "shaping_sites", _no_shaping_sites)

    async def action(bus: Bus) -> int:
        state = PauseState(bus.js)
        # Said as stored (bücher.test as xn--bcher-kva.test), the name `relais status` lists.
        name = pause_name(args.kind, args.name)
        try:
            if args.command == "pause":
                who = f"{getpass.getuser()}@{socket.gethostname()}"
                await state.pause(
                    args.kind,
                    args.name,
                    reason=args.reason or "",
                    by=who,
                    shaping_sites=lambda: shaping_sites(config),
                )
                print(f"paused {args.kind} {name}")
            elif await state.resume(args.kind, args.name):
                print(f"resumed {args.kind} {name}")
            else:
                print(f"{args.kind} {name} was not paused")
        except PausedAgain as exc:  # the command line was fine: the state moved under it
            print(f"relais: {exc}", file=sys.stderr)
            return 1
        except PauseError as exc:
            print(f"relais: {exc}", file=sys.stderr)
            return 2
        return 0

    return _with_bus(args, action, config)


def _no_site(args: argparse.Namespace) -> bool:
    """An empty site (an unset shell variable) is refused: it names no site, and read as one it
    would match every job deferred before MX resolution, whatever its domain."""
    if args.site.strip():
        return False
    print(
        f"relais: {args.command}: the site is empty; name a site or domain ('all' for every site)",
        file=sys.stderr,
    )
    return True


def _hint_unmatched(done: Collection[object], hint: str) -> None:
    """After a run that found nothing: what the site was matched against, on stderr. The exit
    status stays 0 (nothing to do is no failure)."""
    if not done and hint:
        print(f"relais: {hint}", file=sys.stderr)


def cmd_requeue(args: argparse.Namespace) -> int:
    from services.admin.queue import requeue, unmatched_hint

    if _no_site(args):
        return 2

    async def action(bus: Bus) -> int:
        done = await requeue(bus, args.site)
        for job in done:
            print(f"requeued {job.envelope.key}  {', '.join(job.envelope.recipients)}")
        print(f"{len(done)} deferred job(s) for {args.site} requeued")
        _hint_unmatched(done, unmatched_hint(args.site))
        return 0

    return _with_bus(args, action)


def cmd_bounce_queue(args: argparse.Namespace) -> int:
    from services.admin.queue import bounce_queue, unmatched_hint

    if _no_site(args):
        return 2

    async def action(bus: Bus) -> int:
        done = await bounce_queue(bus, args.site, args.reason)
        for job in done:
            print(f"bounced {job.envelope.key}  {', '.join(job.envelope.recipients)}")
        print(f"{len(done)} deferred job(s) for {args.site} bounced: {args.reason}")
        _hint_unmatched(done, unmatched_hint(args.site))
        return 0

    return _with_bus(args, action)


def cmd_topology(args: argparse.Namespace) -> int:
    from services.admin import topology_apply
    from services.core.runtime import setup_logging

    if args.serve:
        setup_logging(args.log_level)
    return topology_apply.main(config_for(args), keep_serving=args.serve)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file (default: $RELAIS_CONFIG)")
    p.add_argument("--nats-url", help="override nats.url")


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    shaping_sites: ShapingSites = _no_shaping_sites,
) -> None:
    """Add the admin subcommands to `relais`' parser. `shaping_sites` reads the site names of the
    configured shaping rules, which `relais pause site` accepts though the router never gives
    them: admin reads no other service's files itself."""
    p = sub.add_parser(
        "status", help="streams, consumer lag per pool, rates, queued and deferred mail per site, pauses"
    )
    _common(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds to sample outcome rates (0: skip)")
    p.add_argument("--no-scan", action="store_true", help="skip counting queued and deferred mail per site")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("message", help="the history of one message: received, attempts, outcome, trace id")
    _common(p)
    p.add_argument(
        "id", help="message id (as in `250 ... queued as <id>`) or job key (<id>-<n>, as logs name jobs)"
    )
    p.set_defaults(func=cmd_message)

    p = sub.add_parser("trace", help="print the span tree of a message from the local trace file")
    p.add_argument("id", help="message id or trace id")
    p.add_argument("--config", "-c", default=None, help="config naming telemetry.traces_file")
    p.add_argument("--file", "-f", type=Path, default=None, help=f"trace file (default: {DEFAULT_TRACES})")
    p.set_defaults(func=cmd_trace)

    for name, verb in (("pause", "stop sending"), ("resume", "resume sending")):
        p = sub.add_parser(name, help=f"{verb} for a pool, source IP or site")
        _common(p)
        p.add_argument("kind", choices=PAUSE_KINDS)
        p.add_argument("name")
        if name == "pause":
            p.add_argument("--reason", default="")
        p.set_defaults(func=cmd_pause, shaping_sites=shaping_sites)

    p = sub.add_parser("requeue", help="retry deferred mail for a site now ('all' for every site)")
    _common(p)
    p.add_argument("site", help=SITE_HELP)
    p.set_defaults(func=cmd_requeue)

    p = sub.add_parser("topology", help="JetStream streams, consumers and buckets")
    actions = p.add_subparsers(dest="topology_command", required=True)
    p = actions.add_parser(
        "apply", help="create or update them, for services with nats.declare_topology = false (as admin)"
    )
    _common(p)
    p.add_argument("--serve", action="store_true", help="then keep running with /healthz and /readyz")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_topology)

    p = sub.add_parser("bounce-queue", help="bounce deferred mail for a site, with a reason (DSNs are sent)")
    _common(p)
    p.add_argument("site", help=SITE_HELP)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_bounce_queue)
