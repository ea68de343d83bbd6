"""A real DNS server on 127.0.0.1 for RFC 3263 tests: dnsmasq serving a fixed zone.

dnsmasq answers A/AAAA (`--host-record`), SRV (`--srv-host`), NAPTR (`--naptr-record`) and
CNAME (`--cname`) from its command line. It runs with no upstream servers, no resolv.conf
and no /etc/hosts, and `--local=/#/` makes every other name an authoritative-looking
NXDOMAIN, so nothing ever leaves the machine. All records share one TTL (`--local-ttl`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import attrs

from tests.peers.ports import HOST, free_port

DNSMASQ = shutil.which("dnsmasq", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class DnsServerError(RuntimeError):
    """dnsmasq failed to start or died."""


def available() -> bool:
    return DNSMASQ is not None


def _name(value: str) -> str:
    name = value.rstrip(".")
    if not name or "," in name or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"bad DNS name: {value!r}")
    return name


def _text(value: str) -> str:
    if "," in value or "\n" in value:
        raise ValueError(f"dnsmasq cannot express {value!r} (comma or newline)")
    return value


@attrs.frozen
class A:
    name: str = attrs.field(converter=_name)
    address: str

    def args(self) -> list[str]:
        return [f"--host-record={self.name},{self.address}"]


@attrs.frozen
class AAAA:
    name: str = attrs.field(converter=_name)
    address: str

    def args(self) -> list[str]:
        return [f"--host-record={self.name},{self.address}"]


@attrs.frozen
class SRV:
    """`name` is the full owner, e.g. "_sip._udp.example.test"."""

    name: str = attrs.field(converter=_name)
    target: str = attrs.field(converter=_name)
    port: int
    priority: int = 10
    weight: int = 0

    def args(self) -> list[str]:
        return [f"--srv-host={self.name},{self.target},{self.port},{self.priority},{self.weight}"]


@attrs.frozen
class NAPTR:
    """RFC 3403 record; for SIP: flags "S", service "SIP+D2U"/"SIP+D2T"/"SIPS+D2T",
    empty regexp and an SRV owner as replacement."""

    name: str = attrs.field(converter=_name)
    order: int
    preference: int
    service: str = attrs.field(converter=_text)
    replacement: str = attrs.field(converter=_name)
    flags: str = attrs.field(default="S", converter=_text)
    regexp: str = attrs.field(default="", converter=_text)

    def args(self) -> list[str]:
        return [
            f"--naptr-record={self.name},{self.order},{self.preference},{self.flags},"
            f"{self.service},{self.regexp},{self.replacement}"
        ]


@attrs.frozen
class CNAME:
    name: str = attrs.field(converter=_name)
    target: str = attrs.field(converter=_name)

    def args(self) -> list[str]:
        return [f"--cname={self.name},{self.target}"]


Record = A | AAAA | SRV | NAPTR | CNAME

_READY_NAME = "sipis-ready.invalid"
_READY_QNAME = b"".join(bytes([len(x)]) + x.encode() for x in _READY_NAME.split(".")) + b"\0"
_QUERY_LINE = re.compile(r"query\[(?P<qtype>[A-Z0-9]+)\] (?P<name>\S+) from")


class DnsServer:
    """dnsmasq on 127.0.0.1:`port` (UDP and TCP) serving exactly `records`."""

    def __init__(
        self, records: Iterable[Record] = (), *, port: int | None = None, ttl: int = 30
    ) -> None:
        if not available():
            raise DnsServerError("dnsmasq not installed")
        self.records: tuple[Record, ...] = tuple(records)
        self.ttl = ttl
        self.port = port or free_port("both")
        self.state_dir = Path(tempfile.mkdtemp(prefix="sipis-dns-"))
        self.log_path = self.state_dir / "dnsmasq.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        assert DNSMASQ is not None
        args = [
            DNSMASQ,
            "--keep-in-foreground",
            "--no-daemon",
            "--conf-file=/dev/null",
            f"--port={self.port}",
            f"--listen-address={HOST}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-poll",
            "--no-hosts",
            "--local=/#/",  # every name not declared here: NXDOMAIN, never forwarded
            f"--local-ttl={self.ttl}",
            "--log-queries",
            "--log-facility=-",
            f"--pid-file={self.state_dir / 'dnsmasq.pid'}",
        ]
        if os.geteuid() == 0:
            # Keep root rather than switching to "nobody", so the log and pid file stay ours.
            args.append("--user=root")
        for record in self.records:
            args.extend(record.args())
        return args

    def start(self, timeout: float = 5.0) -> None:
        """Start dnsmasq and wait until it answers a query over UDP."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None:
                raise DnsServerError(
                    f"dnsmasq exited with {self._proc.returncode}; log:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DnsServerError("dnsmasq did not answer; log:\n" + self.log_text())
            time.sleep(0.02)

    def _answers(self) -> bool:
        # An A query (id 0x5151) for a reserved name: any reply means the server is up.
        query = bytes.fromhex("515101000001000000000000") + _READY_QNAME + b"\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.connect(self.address)  # connected: a closed port fails at once (ICMP)
                sock.send(query)
                return sock.recv(512)[:2] == b"\x51\x51"
            except OSError:
                return False

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def replace_records(self, records: Iterable[Record]) -> None:
        """Serve a different zone on the same port (dnsmasq restarts; takes ~50 ms)."""
        self.records = tuple(records)
        if self.running:
            self.stop()
            self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    def queries(self) -> list[tuple[str, str]]:
        """(type, name) of every query received so far, e.g. ("NAPTR", "example.test")."""
        return [
            (m["qtype"], m["name"])
            for m in _QUERY_LINE.finditer(self.log_text())
            if m["name"] != _READY_NAME
        ]

    def iter_logs(self) -> Iterator[tuple[str, str]]:
        yield (f"dnsmasq :{self.port} log", self.log_text())
