"""Run a whole sipis daemon against the real peers: config, in-process and subprocess runs.

Every daemon a test starts logs through the production formatter into ``LOG_LINES`` (in
process) or into a file collected in ``SUBPROCESS_LOGS``; the session-wide check in
``tests/integration/conftest.py`` asserts that no line anywhere holds a value registered in
``SENSITIVE`` (test passwords, instance secrets, push tokens).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trustme
import yaml

from sipis.config import Config, load_config
from sipis.daemon import Daemon
from sipis.logs import JsonFormatter, LogfmtFormatter, quiet_header_loggers
from tests.peers.ports import free_port

SENSITIVE: set[str] = set()
LOG_LINES: list[str] = []
JSON_LOG_LINES: list[str] = []
SUBPROCESS_LOGS: list[Path] = []

_CA = trustme.CA()
_CERT = _CA.issue_cert("127.0.0.1", "localhost")


class _ListHandler(logging.Handler):
    """Keeps every formatted line (production format, redaction included), in logfmt and,
    for the session-wide secret check, in JSON too (``log.format: json``)."""

    _json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        LOG_LINES.append(self.format(record))
        JSON_LOG_LINES.append(self._json.format(record))


def install_log_capture() -> logging.Handler:
    handler = _ListHandler(level=logging.DEBUG)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    quiet_header_loggers()  # as the daemon does: hpack would log every HTTP/2 header
    return handler


def client_ssl_context() -> ssl.SSLContext:
    """Trust only the test CA (this machine exports SSL_CERT_FILE; we never use it)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None, capath=None,
                                     cadata=None)
    ctx.load_verify_locations(cadata=_CA.cert_pem.bytes().decode())
    return ctx


def write_tls_files(directory: Path) -> tuple[Path, Path]:
    cert = directory / "api.crt"
    key = directory / "api.key"
    _CERT.cert_chain_pems[0].write_to_path(str(cert))
    _CERT.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def daemon_settings(directory: Path, *, sip_port: int | None = None,
                    api_port: int = 0, **overrides: Any) -> dict[str, Any]:
    """A test config: loopback only, ephemeral API port, fast backoff, TLS from the test CA."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = write_tls_files(directory)
    port = sip_port or free_port("both")
    base: dict[str, Any] = {
        "log": {"level": "debug"},
        "store": {"path": str(directory / "sipis.db"), "key_file": str(directory / "sipis.key"),
                  "create_key_file": True},
        "sip": {
            "public_host": "127.0.0.1",
            "listen": [{"transport": "udp", "host": "127.0.0.1", "port": port},
                       {"transport": "tcp", "host": "127.0.0.1", "port": port}],
            "upstream_allow": ["127.0.0.0/8", "::1/128"],
            "keepalive_interval": "5s",
        },
        "registrar": {"default_expires": 600, "min_expires": 30, "max_expires": 7200,
                      "backoff_base": "1s", "backoff_cap": "4s", "register_rate": 200,
                      "register_burst": 20},
        "lifetime": {"sweep_interval": "500ms"},
        "api": {"listen": {"host": "127.0.0.1", "port": api_port},
                "tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key)},
                "create_timeout": "8s", "create_rate": {"per_minute": 6000, "burst": 1000}},
        "metrics": {"enabled": False},
    }
    return deep_merge(base, overrides)


def write_config(directory: Path, settings: dict[str, Any]) -> Path:
    path = directory / "sipis.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def make_config(directory: Path, **kw: Any) -> tuple[Config, Path]:
    path = write_config(directory, daemon_settings(directory, **kw))
    return load_config(path), path


@attrs.define
class RunningDaemon:
    daemon: Daemon
    client: httpx.AsyncClient
    config_path: Path

    @property
    def sip_port(self) -> int:
        assert self.daemon.endpoint is not None
        return self.daemon.endpoint.bound_port("udp")

    async def create(self, body: dict[str, Any]) -> httpx.Response:
        SENSITIVE.add(body["sip"]["password"])
        SENSITIVE.add(body["push"]["token"])
        resp = await self.client.post("/v1/instances", json=body)
        if resp.status_code == 201:
            SENSITIVE.add(resp.json()["secret"])
        return resp


def instance_body(kamailio: Any, *, user: str = "alice", password: str | None = None,
                  transport: str | None = None, **extra: Any) -> dict[str, Any]:
    """A POST /v1/instances body for a Kamailio user, the registrar given as IP:port."""
    from tests.conftest import DEFAULT_USERS

    body: dict[str, Any] = {
        "app": "com.example.phone",
        "sip": {"aor": f"sip:{user}@{kamailio.domain}", "username": user,
                "password": password if password is not None else DEFAULT_USERS[user],
                "registrar": kamailio.registrar_uri(transport)},
        "push": {"provider": "apns", "token": "apns-token-" + os.urandom(16).hex()},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            body[key] = {**body.get(key, {}), **value}
        else:
            body[key] = value
    return body


@asynccontextmanager
async def running_daemon(directory: Path, **kw: Any) -> AsyncIterator[RunningDaemon]:
    """A daemon in this trio run; stopped (as on SIGTERM) when the block ends."""
    config, path = make_config(directory, **kw)
    daemon = Daemon(config=config, config_path=path)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        async with httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{daemon.api_port}", verify=client_ssl_context(),
            http2=True, timeout=30,
        ) as client:
            try:
                yield RunningDaemon(daemon=daemon, client=client, config_path=path)
            finally:
                daemon.request_stop()


class DaemonProcess:
    """``python -m sipis run -c FILE`` as a child process (for SIGKILL/SIGTERM tests)."""

    def __init__(self, directory: Path, settings: dict[str, Any]) -> None:
        self.directory = directory
        self.settings = settings
        self.config_path = write_config(directory, settings)
        self.log_path = directory / f"daemon-{len(SUBPROCESS_LOGS)}.log"
        SUBPROCESS_LOGS.append(self.log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.settings['api']['listen']['port']}"

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sipis", "run", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        ctx = client_ssl_context()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sipis exited: {self.log_path.read_text()[-3000:]}")
            try:
                r = httpx.get(self.api_url + "/readyz", verify=ctx, timeout=1)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"sipis not ready: {self.log_path.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
