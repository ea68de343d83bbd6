"""A sipis daemon under measurement: a seeded store, a generated config, a child process.

Seeding goes straight into the SQLite store (as a previous run of sipis would have left it),
not through the HTTPS API: 100,000 API calls would take longer than the benchmarks. The rows
are written in one transaction with the store's own encryption (``SqliteStore`` internals,
falling back to one ``insert`` per record if those ever move); the file is kept per size in
the work directory and copied for each run.

The daemon runs as ``python -m bench.sipis_run -c FILE`` (``sipis run`` plus optional timing
hooks, see that module) in its own process group; its CPU and memory are read from /proc.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
import yaml

from bench.common import HOST, ROOT, BenchError, proc_cpu, proc_max_rss, proc_rss, stop_process
from bench.kamailio import DOMAIN, _free_port, password

BUNDLE = "com.example.phone"


def user(n: int) -> str:
    return f"s{n:06d}"


def contact_token(n: int) -> str:
    return f"benchtok{n:06d}"


def push_token(n: int) -> str:
    return f"{n:064x}"


async def _seed(directory: Path, registrar: str, count: int, expires: int) -> None:
    from sipis.store.crypto import KeyRing, make_verifier, new_secret
    from sipis.store.models import InstanceRecord, RegistrationStatus
    from sipis.store.sqlite import SqliteStore

    keyring = KeyRing.generate_file(directory / "sipis.key")
    store = SqliteStore(directory / "sipis.db", keyring)
    await store.open()
    now = time.time()
    verifier = make_verifier(new_secret())
    records = [InstanceRecord(
        id=f"bench{n:06d}xxxxxxxxxxxxxxxxx", secret_verifier=verifier, app=BUNDLE,
        aor=f"sip:{user(n)}@{DOMAIN}", username=user(n), password=password(user(n)),
        registrar=registrar, outbound_proxy=None, expires=expires, push_provider="apns",
        push_token=push_token(n), push_environment="production",
        contact_token=contact_token(n),
        instance_urn=f"urn:uuid:00000000-0000-4000-8000-{n:012d}", lifetime=6 * 86400,
        created_at=now, last_heard_at=now, expires_at=now + 6 * 86400,
        registration=RegistrationStatus(state="registered", last_registered_at=now),
    ) for n in range(count)]
    try:
        conn = getattr(store, "_conn", None)
        encrypt = getattr(store, "_params_encrypted", None)
        insert = getattr(sys.modules["sipis.store.sqlite"], "_INSERT", None)
        if isinstance(conn, sqlite3.Connection) and encrypt is not None and insert:
            rows = [encrypt(rec) for rec in records]
            with conn:
                conn.executemany(insert, rows)
        else:
            for rec in records:
                await store.insert(rec)
    finally:
        await store.close()


def seed_store(directory: Path, cache: Path, registrar_port_marker: str, count: int,
               expires: int) -> None:
    """A store with ``count`` instances in ``directory`` (copied from ``cache`` when there).

    The registrar stored for each instance is ``sip:127.0.0.1:PORT`` with a placeholder port
    that :func:`point_store_at` rewrites, so one cached file serves every run.
    """
    key = f"store-{count}-{expires}"
    cached = cache / key
    if not (cached / "sipis.db").exists():
        tmp = cache / (key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trio.run(_seed, tmp, registrar_port_marker, count, expires)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("sipis.db", "sipis.key"):
        shutil.copy2(cached / name, directory / name)
    (directory / "sipis.key").chmod(0o600)


def point_store_at(directory: Path, marker: str, registrar: str) -> None:
    """Rewrite the placeholder registrar of every stored instance (a plain column)."""
    with sqlite3.connect(directory / "sipis.db") as conn:
        conn.execute("UPDATE instances SET registrar = ? WHERE registrar = ?",
                     (registrar, marker))


def settings(directory: Path, *, rate: float, burst: int, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """A daemon config: loopback only, info logs, no TLS API (nothing here uses the API)."""
    port = _free_port()
    base: dict[str, Any] = {
        "log": {"level": "info"},
        "store": {"path": str(directory / "sipis.db"), "key_file": str(directory / "sipis.key")},
        "sip": {
            "public_host": HOST,
            "listen": [{"transport": "udp", "host": HOST, "port": port},
                       {"transport": "tcp", "host": HOST, "port": port}],
            "upstream_allow": ["127.0.0.0/8"],
        },
        "registrar": {"default_expires": 600, "min_expires": 30, "max_expires": 7200,
                      "register_rate": rate, "register_burst": burst},
        "api": {"listen": {"host": HOST, "port": _free_port()}, "tls": {"enabled": False}},
        "metrics": {"enabled": False},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


class SipisProcess:
    """``python -m bench.sipis_run -c FILE`` as a child; ready when it logs ``ready``."""

    def __init__(self, directory: Path, config: dict[str, Any], *,
                 env: dict[str, str] | None = None, cpus: frozenset[int] | None = None
                 ) -> None:
        self.directory = directory
        self.cpus = cpus  # where it may run (bench.common.cores_apart); None: anywhere
        self.config = config
        self.config_path = directory / "sipis.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "sipis.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def reconfigure(self, **registrar: Any) -> None:
        """Change ``registrar`` settings for the next start (e.g. the REGISTER rate)."""
        self.config["registrar"] = {**self.config["registrar"], **registrar}
        self.config_path.write_text(yaml.safe_dump(self.config))

    @property
    def sip_port(self) -> int:
        return int(self.config["sip"]["listen"][0]["port"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait for the ready line; returns the monotonic start time."""
        import os

        self.runs += 1
        mark = f"==== bench run {self.runs}\n"
        with self.log_path.open("a") as f:
            f.write(mark)
        log = self.log_path.open("ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sipis_run", "run", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=ROOT, env={**os.environ, **self.env})
        log.close()
        if self.cpus is not None:  # before it starts its threads: they inherit it
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"sipis exited: {self.log_tail()}")
            text = self.log_path.read_text(errors="replace")
            if " ready" in text.rsplit(mark, 1)[-1]:
                return started
            if time.monotonic() > deadline:
                raise BenchError(f"sipis not ready after {timeout:.0f}s: {self.log_tail()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> int:
        return proc_rss(self.pid)

    def max_rss(self) -> int:
        return proc_max_rss(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None

    def count_log(self, needle: str, run: int | None = None) -> int:
        """Lines of the given run (default: all runs) that contain ``needle``."""
        text = self.log_text()
        if run is not None:
            parts = text.split(f"==== bench run {run}\n", 1)
            text = parts[1].split("==== bench run", 1)[0] if len(parts) > 1 else ""
        return sum(1 for line in text.splitlines() if needle in line)
