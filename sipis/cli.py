"""``sipis`` command line: run the daemon, check a config, look at stored instances.

Exit codes follow sysexits: 0 ok, 64 usage, 69 unavailable (store), 78 configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from sipis import __version__
from sipis.config import EX_CONFIG, Config, ConfigError, format_config_error, load_config
from sipis.logs import setup_logging

DEFAULT_CONFIG = Path("/etc/sipis/sipis.yaml")
EX_UNAVAILABLE = 69


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipis", description="SIP push-notification proxy")
    parser.add_argument("--version", action="version", version=f"sipis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the daemon in the foreground"),
                       ("check-config", "validate a configuration file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    inst = sub.add_parser("instances", help="look at stored push instances")
    inst.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    isub = inst.add_subparsers(dest="action", required=True)
    isub.add_parser("list", help="one line per instance (no secrets)")
    show = isub.add_parser("show", help="one instance as JSON (no secrets)")
    show.add_argument("id")
    return parser


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(format_config_error(exc), file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = _load(args.config)
    if args.command == "check-config":
        print(f"{args.config}: configuration OK")
        return 0
    if args.command == "run":
        from sipis.daemon import run_daemon

        setup_logging(config.log.level, config.log.format)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                trio.run(run_daemon, config, args.config)
        except ConfigError as exc:  # found while building components (a bad key file, …)
            print(format_config_error(exc), file=sys.stderr)
            return EX_CONFIG
        return 0
    return trio.run(_instances, config, args)


async def _instances(config: Config, args: argparse.Namespace) -> int:
    from sipis.daemon import load_keyring
    from sipis.store.errors import NotFound, StoreError
    from sipis.store.models import redacted_token
    from sipis.store.sqlite import SqliteStore

    try:
        store = SqliteStore(Path(config.store.path), load_keyring(config))
        await store.open()
    except StoreError as exc:
        print(f"sipis: cannot open the store: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        if args.action == "list":
            for rec in await store.list_all():
                expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.expires_at))
                print(f"{rec.id}\t{rec.aor}\t{rec.push_provider}\t"
                      f"{rec.registration.state}\texpires={expires}")
            return 0
        try:
            rec = await store.get(args.id)
        except NotFound:
            print(f"sipis: no instance {args.id}", file=sys.stderr)
            return 1
        print(json.dumps({
            "id": rec.id, "app": rec.app, "aor": rec.aor, "username": rec.username,
            "registrar": rec.registrar, "outbound_proxy": rec.outbound_proxy,
            "push": {"provider": rec.push_provider, "environment": rec.push_environment,
                     "token": redacted_token(rec.push_token)},
            "created_at": rec.created_at, "expires_at": rec.expires_at,
            "registration": {"state": rec.registration.state,
                             "last_error": rec.registration.last_error},
        }, indent=2))
        return 0
    finally:
        await store.close()


if __name__ == "__main__":
    raise SystemExit(main())
