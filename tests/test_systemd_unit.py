"""systemd integration: the unit file, and the daemon's sd_notify conversation with systemd.

The daemon runs as ``python -m sipis run`` with ``NOTIFY_SOCKET`` pointing at a datagram socket
this test owns, the way systemd starts a ``Type=notify`` service. The watchdog test runs the
daemon in process instead, because blocking its event loop needs a hand inside the process.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from sipis.config import load_config
from sipis.daemon import Daemon
from sipis.notify import Notifier
from tests.integration.harness import (
    SUBPROCESS_LOGS,
    daemon_settings,
    write_config,
)
from tests.peers.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "sipis.service"
WATCHDOG_USEC = 200_000  # ping every 100 ms
_SUN_PATH_MAX = 107


# -- the unit file --------------------------------------------------------------------------------


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting; keys may repeat, as systemd allows."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_unit_declares_notify_watchdog_reload_and_the_sandbox() -> None:
    """sipis.service: Type=notify with a watchdog, SIGHUP reload, and the hardening SPEC asks."""
    settings = unit_settings(UNIT.read_text())
    service = {k: v for s, k, v in settings if s == "Service"}
    assert service["Type"] == "notify"
    assert service["ExecStart"] == "/usr/bin/sipis run -c /etc/sipis/sipis.yaml"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["WatchdogSec"]
    assert service["RestartPreventExitStatus"] == "78"  # EX_CONFIG
    for key, value in {
        "StateDirectory": "sipis", "ConfigurationDirectory": "sipis", "ProtectSystem": "strict",
        "ProtectHome": "yes", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes", "RestrictRealtime": "yes", "RestrictNamespaces": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
        "ProtectHostname": "yes", "UMask": "0077",
    }.items():
        assert service.get(key) == value, key
    filters = [v for s, k, v in settings if s == "Service" and k == "SystemCallFilter"]
    assert "@system-service" in filters


def test_sysusers_and_tmpfiles_match_the_unit() -> None:
    """The unit runs as sipis; sysusers creates that user, tmpfiles gives it /etc/sipis."""
    service = {k: v for s, k, v in unit_settings(UNIT.read_text()) if s == "Service"}
    assert service["User"] == service["Group"] == "sipis"
    sysusers = [line.split() for line in (ROOT / "systemd" / "sipis.sysusers").read_text()
                .splitlines() if line and not line.startswith("#")]
    assert sysusers[0][:2] == ["u", "sipis"]
    tmpfiles = [line.split() for line in (ROOT / "systemd" / "sipis.tmpfiles").read_text()
                .splitlines() if line and not line.startswith("#")]
    assert ["d", "/etc/sipis", "0750", "root", "sipis", "-"] in tmpfiles


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` passes; the ExecStart binary is swapped for the venv's, since
    verify checks that it exists, and the shipped file's only complaint is that binary."""
    sipis_bin = Path(sys.executable).with_name("sipis")
    assert sipis_bin.exists()
    unit = tmp_path / "sipis.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/sipis", str(sipis_bin)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "sipis.service" not in done.stderr, done.stderr
    shipped = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                             text=True, timeout=60, check=False)
    complaints = [line for line in shipped.stderr.splitlines() if "sipis.service" in line]
    assert all("/usr/bin/sipis is not executable" in line for line in complaints), complaints


# -- the daemon under a fake systemd --------------------------------------------------------------


class NotifySocket:
    """The service manager's end: a datagram socket; a thread stamps each message on arrival.

    A thread (not the test's trio loop) receives, so arrival times stay true even while the
    loop under test is blocked.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, key: str, timeout: float, *, after: int = 0) -> tuple[int, float]:
        """Index and arrival time of the first message from index ``after`` holding ``key``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.messages)):
                    if key in self.messages[i][1]:
                        return i, self.messages[i][0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key} within {timeout}s: {self.messages}")
                self._cond.wait(left)

    def times(self, key: str) -> list[float]:
        with self._cond:
            return [t for t, fields in self.messages if key in fields]

    def field_names(self) -> list[str]:
        with self._cond:
            return [k for _, fields in self.messages for k in fields]

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > _SUN_PATH_MAX:
        short = Path(tempfile.mkdtemp(dir="/tmp"))
        path = short / "notify.sock"
    ns = NotifySocket(str(path))
    yield ns
    ns.close()
    Path(ns.path).unlink(missing_ok=True)


def start_daemon(directory: Path, settings: dict[str, Any],
                 notify: NotifySocket) -> subprocess.Popen[bytes]:
    """``python -m sipis run -c FILE`` in the environment systemd gives a notify service."""
    config = write_config(directory, settings)
    log_path = directory / "daemon.log"
    SUBPROCESS_LOGS.append(log_path)
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)  # systemd would set our child's pid; unset means "anyone"
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "sipis", "run", "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def accepts(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:port succeeds right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_ready_only_once_listening_then_watchdog_then_stopping_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket,
) -> None:
    """READY=1 comes only when the API, SIP TCP and metrics ports already accept connections,
    with a STATUS= count; WATCHDOG=1 follows every WATCHDOG_USEC/2; SIGTERM gives STOPPING=1
    and exit 0."""
    sip_port, api_port, metrics_port = free_port("both"), free_port("tcp"), free_port("tcp")
    settings = daemon_settings(tmp_path / "d", sip_port=sip_port, api_port=api_port,
                               metrics={"enabled": True,
                                        "listen": {"host": "127.0.0.1", "port": metrics_port}})
    proc = start_daemon(tmp_path / "d", settings, notify_socket)
    try:
        ready_index, _ = notify_socket.wait_for("READY", timeout=15)
        # The very moment READY=1 is in, every listener must take connections.
        assert accepts(api_port), "READY=1 before the HTTPS API listens"
        assert accepts(sip_port), "READY=1 before the SIP TCP listener"
        assert accepts(metrics_port), "READY=1 before the metrics listener"
        assert not any("READY" in f for _, f in notify_socket.messages[:ready_index])
        ready_fields = notify_socket.messages[ready_index][1]
        assert ready_fields["STATUS"] == "0 instances, 0 registered"

        time.sleep(1.0)
        pings = [t for t in notify_socket.times("WATCHDOG") if t > time.monotonic() - 1.0]
        assert len(pings) >= 5, pings  # 10 expected at 100 ms; slack for a loaded machine
        assert max(b - a for a, b in itertools.pairwise(pings)) < 0.2

        count = len(notify_socket.messages)
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", timeout=10, after=count)
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
    assert notify_socket.field_names().count("READY") == 1


def test_no_ready_when_the_store_cannot_open(tmp_path: Path,
                                             notify_socket: NotifySocket) -> None:
    """A store that is not a database: the daemon exits non-zero without ever saying READY."""
    directory = tmp_path / "d"
    settings = daemon_settings(directory, api_port=free_port("tcp"))
    Path(settings["store"]["path"]).write_bytes(b"this is not an SQLite database\n" * 200)
    proc = start_daemon(directory, settings, notify_socket)
    try:
        assert proc.wait(timeout=15) != 0
    finally:
        stop(proc)
    time.sleep(0.1)  # let the receiver thread take in anything still queued
    assert "READY" not in notify_socket.field_names()
    assert "not a database" in (directory / "daemon.log").read_text()  # failed for that reason


async def test_a_blocked_event_loop_stops_the_watchdog_pings(
    tmp_path: Path, notify_socket: NotifySocket,
) -> None:
    """The ping is a trio task: while the loop is stuck no WATCHDOG=1 goes out (systemd would
    restart us), and the pings resume as soon as the loop runs again."""
    directory = tmp_path / "d"
    config_path = write_config(directory, daemon_settings(directory))
    daemon = Daemon(config=load_config(config_path), config_path=config_path,
                    notifier=Notifier(notify_socket.path, watchdog_usec=WATCHDOG_USEC))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await trio.to_thread.run_sync(notify_socket.wait_for, "READY", 5.0)
        await trio.sleep(0.5)
        blocked_at = time.monotonic()
        time.sleep(1.0)  # blocking the whole loop is the point
        resumed_at = time.monotonic()
        await trio.sleep(0.5)
        daemon.request_stop()
    await trio.to_thread.run_sync(notify_socket.wait_for, "STOPPING", 5.0)
    pings = notify_socket.times("WATCHDOG")
    before = [t for t in pings if blocked_at - 0.5 <= t < blocked_at]
    during = [t for t in pings if blocked_at + 0.05 < t < resumed_at]
    after = [t for t in pings if resumed_at <= t < resumed_at + 0.5]
    assert len(before) >= 3, pings
    assert during == [], "a ping went out while the event loop was blocked"
    assert len(after) >= 3, pings
    assert after[0] - resumed_at < 0.1  # the overdue ping goes out at once
