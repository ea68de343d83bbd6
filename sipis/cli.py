"""``sipis`` command line: run the daemon, check a config, manage instances and the store key.

Commands::

    sipis run [-c FILE]                      the daemon, in the foreground
    sipis check-config [-c FILE]             validate a configuration file
    sipis instances list|show ID [-c FILE]   stored instances (never a password or full token)
    sipis instances delete ID [-c FILE]      wipe one instance (through the running daemon)
    sipis keygen [-o KEYFILE | -c FILE]      write a new store key file (never overwrites)
    sipis rotate-key [-c FILE]               move every stored value to a new key

``-c`` defaults to /etc/sipis/sipis.yaml. The admin commands reach a running daemon through
its control socket (see ``sipis.admin``) and work on the store file directly when none runs.

Exit codes follow sysexits: 0 ok; 1 no such instance; 64 usage; 65 stored values use a key the
key file lacks; 69 unavailable (store, key file or daemon); 73 cannot create the key file (it
exists); 75 another rotate-key is running; 78 configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import trio

from sipis import __version__
from sipis.config import EX_CONFIG, Config, ConfigError, format_config_error, load_config
from sipis.logs import setup_logging

DEFAULT_CONFIG = Path("/etc/sipis/sipis.yaml")
EX_NOT_FOUND = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75


class _Parser(argparse.ArgumentParser):
    """argparse with the sysexits usage code (64) instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _config_option(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    # A sub-action's -c must not reset one given before it: SUPPRESS leaves it unset.
    parser.add_argument("-c", "--config", type=Path, metavar="FILE",
                        default=argparse.SUPPRESS if inherited else DEFAULT_CONFIG,
                        help=f"configuration file (default {DEFAULT_CONFIG})")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sipis", description="SIP push-notification proxy")
    parser.add_argument("--version", action="version", version=f"sipis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the daemon in the foreground"),
                       ("check-config", "validate a configuration file"),
                       ("rotate-key", "re-encrypt every stored value under a new store key")):
        _config_option(sub.add_parser(name, help=text, description=text))
    inst = sub.add_parser("instances", help="look at or delete stored push instances")
    _config_option(inst)
    isub = inst.add_subparsers(dest="action", required=True)
    _config_option(isub.add_parser("list", help="one line per instance (no secrets)"),
                   inherited=True)
    for name, text in (("show", "one instance as JSON (no secrets)"),
                       ("delete", "wipe one instance (unREGISTER upstream if sipis runs)")):
        p = isub.add_parser(name, help=text, description=text,
                            epilog="An id that starts with '-' goes after '--'.")
        p.add_argument("id")
        _config_option(p, inherited=True)
    keygen = sub.add_parser("keygen", help="write a new store key file (mode 0600)",
                            description="Write a new store key file with one random key, "
                            "mode 0600. An existing file is never overwritten.")
    keygen.add_argument("-o", "--key-file", type=Path, metavar="KEYFILE",
                        help="where to write it (default: store.key_file of the config)")
    _config_option(keygen)
    return parser


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(format_config_error(exc), file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen" and args.key_file is not None:
        return _keygen(args.key_file)  # needs no configuration file
    config = _load(args.config)
    if args.command == "check-config":
        print(f"{args.config}: configuration OK")
        return 0
    if args.command == "keygen":
        return _keygen(Path(config.store.key_file))
    if args.command == "run":
        return _run(config, args.config)
    if args.command == "rotate-key":
        return trio.run(_rotate_key, config)
    if args.action == "delete":
        return trio.run(_delete, config, args.id)
    return trio.run(_instances, config, args)


def _fail(message: str, code: int) -> int:
    print(f"sipis: {message}", file=sys.stderr)
    return code


def _run(config: Config, path: Path) -> int:
    from sipis.admin import AdminError
    from sipis.daemon import run_daemon
    from sipis.store.errors import StoreError

    setup_logging(config.log.level, config.log.format)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(run_daemon, config, path)
    except BaseException as exc:  # errors from inside nurseries come as ExceptionGroups
        leaf = _first_leaf(exc)
        if isinstance(leaf, ConfigError):  # found while building components (a bad key file)
            print(format_config_error(leaf), file=sys.stderr)
            return EX_CONFIG
        if isinstance(leaf, AdminError):  # another daemon on the control socket, …
            return _fail(str(leaf), EX_UNAVAILABLE)
        if isinstance(leaf, StoreError):  # not a database, newer schema, unreadable values
            return _fail(f"cannot open the store: {leaf}", EX_UNAVAILABLE)
        if isinstance(leaf, OSError):  # a listen address in use or not ours
            return _fail(f"cannot start: {leaf}", EX_UNAVAILABLE)
        raise
    return 0


def _first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (itself if it is no group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _keygen(path: Path) -> int:
    from sipis.store.crypto import KeyRing
    from sipis.store.errors import CryptoError

    try:
        ring = KeyRing.generate_file(path)
    except CryptoError as exc:
        return _fail(str(exc), EX_CANTCREAT)
    print(f"wrote {path} (mode 0600) with key {ring.active_key_id}; if the daemon runs as "
          f"another user: chgrp <its group> {path} && chmod 640 {path}")
    return 0


async def _delete(config: Config, instance_id: str) -> int:
    from sipis.admin import AdminError, delete_instance
    from sipis.store.errors import StoreError

    try:
        outcome = await delete_instance(config, instance_id)
    except (AdminError, StoreError) as exc:
        return _fail(f"cannot delete {instance_id}: {exc}", EX_UNAVAILABLE)
    if not outcome.deleted:
        return _fail(f"no instance {instance_id}", EX_NOT_FOUND)
    if outcome.through_daemon:
        print(f"deleted instance {instance_id}: unregistered upstream and wiped by the "
              "running daemon")
    else:
        print(f"deleted instance {instance_id} from the store (sipis is not running): its "
              "upstream registration was not removed and expires at the provider by itself")
    return 0


async def _rotate_key(config: Config) -> int:
    from sipis.admin import AdminError, KeyMissing, RotationBusy, rotate_key
    from sipis.store.errors import StoreError

    try:
        outcome = await rotate_key(config, report=print)
    except KeyMissing as exc:
        return _fail(str(exc), EX_DATAERR)
    except RotationBusy as exc:
        return _fail(str(exc), EX_TEMPFAIL)
    except (AdminError, StoreError) as exc:  # CryptoError here: the key file is unusable
        return _fail(f"rotate-key stopped: {exc}; run it again once that is fixed",
                     EX_UNAVAILABLE)
    print(f"done: every stored value is under key {outcome.active}")
    return 0


async def _instances(config: Config, args: argparse.Namespace) -> int:
    from sipis.daemon import load_keyring
    from sipis.store.errors import NotFound, StoreError
    from sipis.store.models import redacted_token
    from sipis.store.sqlite import SqliteStore

    try:
        store = SqliteStore(Path(config.store.path), load_keyring(config))
        await store.open()
    except StoreError as exc:
        return _fail(f"cannot open the store: {exc}", EX_UNAVAILABLE)
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
            return _fail(f"no instance {args.id}", EX_NOT_FOUND)
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
