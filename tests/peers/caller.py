"""A sipp UAC playing the remote caller (or MESSAGE sender) in integration tests.

`Caller` fills one of the scenario templates in `tests/peers/sipp/` (the `@@NAME@@`
placeholders: extra header lines, pause lengths, expected final statuses), runs sipp
under `timeout` with `-nostdin` on its own loopback ports (`-p`, control `-cp` and media
`-mp`, so parallel callers never meet) and parses sipp's `-trace_msg` file into a
`CallTrace`: every message sent and received, in order, with its timestamp. Tests assert
on that: the responses and their headers in order (`X-Sipis-Push-Status`, `X-Sipis-Reason`),
the delay between the INVITE and the first 180, whether the callee's BYE arrived.

sipp 3.6 notes that shaped the scenarios (see also /work/shared/PEERS.md):
- Responses are matched to the call by Call-ID, so the scenarios send `Call-ID: [call_id]`.
- CANCEL and the ACK for a non-2xx reuse the INVITE's branch, written out as a fixed string
  (`z9hG4bK-[pid]-[call_number]-inv`) because `[branch]` changes with every message.
- The INVITE opens sipp transaction "invite" (`start_txn`) and every response `<recv>`
  names it (`response_txn`): a 1xx arriving while the scenario is further on (a 180 during
  the pause before a CANCEL, or after it) is then ignored, not a reason to abort the call,
  and a retransmitted final response gets the ACK again (`ack_txn`).
- A `<recv>` right before a `<pause>` must be mandatory (sipp refuses the scenario).
- Over UDP sipp takes a byte-identical copy of the last message it received for a
  retransmission and resends what it sent after it: identical 180s around a CANCEL make
  it send the CANCEL again (harmless, but visible in the trace).
- sipp expands `[keyword]` everywhere in a message, bodies and extra headers included.

`raw_sip_send()` / `raw_sip_send_async()` push arbitrary bytes (garbage, truncated SIP)
over UDP or TCP and return whatever came back, for robustness tests.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Required, TypedDict, Unpack

import attrs
import trio

from tests.peers.ports import HOST, free_port, port_is_free

SIPP = shutil.which("sipp")
TIMEOUT = shutil.which("timeout")
SCENARIO_DIR = Path(__file__).with_name("sipp")

Transport = Literal["udp", "tcp"]


class CallerError(RuntimeError):
    """sipp could not be started, or a caller was used the wrong way."""


def available() -> bool:
    """Whether sipp (and coreutils `timeout`) are installed; tests skip otherwise."""
    return SIPP is not None and TIMEOUT is not None


class Scenario(enum.StrEnum):
    """The UAC flows; each value names its template in tests/peers/sipp/."""

    CALL = "uac_call"
    """INVITE → 100?/180*/183? → 200 → ACK → hold → BYE → 200."""
    CALL_MID_DIALOG = "uac_call_mid_dialog"
    """CALL, with a re-INVITE (→ 200 → ACK), an UPDATE and an INFO between ACK and BYE."""
    CALLEE_HANGS_UP = "uac_callee_hangs_up"
    """INVITE → 200 → ACK → wait for the callee's BYE → 200."""
    CANCEL = "uac_cancel"
    """INVITE → 180 → wait → CANCEL (optionally with Reason) → 200 (CANCEL) → 487 → ACK."""
    REJECTED = "uac_rejected"
    """INVITE → 1xx* → one of the expected final non-2xx (default 480) → ACK."""
    MESSAGE = "uac_message"
    """MESSAGE → one of the expected final statuses (default 200)."""


ANSWERED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
"""RFC 3326 Reason for a CANCEL whose call was answered by another branch."""


# -- trace ---------------------------------------------------------------------------------


@attrs.frozen
class SipMessage:
    """One message sipp sent or received, as sipp logged it."""

    direction: Literal["sent", "received"]
    transport: str
    """"UDP" or "TCP"."""
    time: float
    """POSIX timestamp (sipp logs local time with microseconds)."""
    text: str

    @property
    def start_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def is_response(self) -> bool:
        return self.start_line.startswith("SIP/2.0 ")

    @property
    def status(self) -> int | None:
        """Status code of a response, None for a request."""
        if not self.is_response:
            return None
        return int(self.start_line.split(" ", 2)[1])

    @property
    def reason(self) -> str:
        """Reason phrase of a response ("" for a request)."""
        parts = self.start_line.split(" ", 2)
        return parts[2] if self.is_response and len(parts) > 2 else ""

    @property
    def method(self) -> str:
        """The request method, or for a response the method in its CSeq."""
        if not self.is_response:
            return self.start_line.split(" ", 1)[0]
        cseq = self.header("CSeq") or ""
        return cseq.split()[-1] if cseq.split() else ""

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """(name, value) pairs in order; folded lines joined, compact names kept as sent."""
        return _parse_headers(self.text)

    @property
    def body(self) -> str:
        return self.text.replace("\r\n", "\n").partition("\n\n")[2]

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


def _parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    head = text.replace("\r\n", "\n").partition("\n\n")[0]
    headers: list[list[str]] = []
    for line in head.split("\n")[1:]:
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append([name.strip(), value.strip()])
    return tuple((name, value) for name, value in headers)


_SEPARATOR = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d[ \t]\d\d:\d\d:\d\d\.\d+)[^\n]*\n", re.MULTILINE)
_DIRECTION = re.compile(r"^(\w+) message (sent|received)\b[^\n]*\n\n?", re.IGNORECASE)


def parse_trace(text: str) -> list[SipMessage]:
    """Split a sipp `-message_file` into messages (oldest first).

    Each entry is a line of dashes with a local timestamp, a line "UDP message sent (N
    bytes):" or "UDP message received [N] bytes :", a blank line and the message.
    """
    messages: list[SipMessage] = []
    marks = list(_SEPARATOR.finditer(text))
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        chunk = text[mark.end() : end]
        head = _DIRECTION.match(chunk)
        if head is None:
            continue
        stamp = datetime.datetime.strptime(
            mark.group(1).replace("\t", " "), "%Y-%m-%d %H:%M:%S.%f"
        ).timestamp()
        body = chunk[head.end() :].replace("\r\n", "\n").strip("\n") + "\n"
        if not body.strip():
            continue  # a TCP keepalive or an empty datagram
        messages.append(
            SipMessage(
                direction="sent" if head.group(2).lower() == "sent" else "received",
                transport=head.group(1).upper(),
                time=stamp,
                text=body,
            )
        )
    return messages


@attrs.frozen
class CallTrace:
    """What one sipp run did: its exit code and every SIP message, in order."""

    scenario: str
    exit_code: int
    """0 = the scenario passed; non-zero = it failed (see `errors`; sipp's own -timeout
    gives 255 here; 137 = killed by `timeout(1)`)."""
    messages: tuple[SipMessage, ...]
    stdout: str = attrs.field(repr=False)
    errors: str = attrs.field(repr=False)
    """sipp's -error_file: why a scenario failed (unexpected message, timeout)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def responses(self) -> list[SipMessage]:
        """Every response received, retransmissions included, in arrival order."""
        return [m for m in self.messages if m.direction == "received" and m.is_response]

    @property
    def requests_received(self) -> list[SipMessage]:
        """Requests the far end sent to the caller (e.g. the callee's BYE)."""
        return [m for m in self.messages if m.direction == "received" and not m.is_response]

    @property
    def requests_sent(self) -> list[SipMessage]:
        return [m for m in self.messages if m.direction == "sent" and not m.is_response]

    def statuses(self, method: str = "INVITE") -> list[int]:
        """Status codes received for `method` (by CSeq), in order."""
        return [r.status for r in self.responses if r.method == method and r.status is not None]

    def header_values(self, name: str, *, status: int | None = None) -> list[str]:
        """Header `name` of each response (optionally only those with `status`), in order."""
        return [
            value
            for r in self.responses
            if status is None or r.status == status
            for value in r.header_values(name)
        ]

    def first(self, status: int, method: str = "INVITE") -> SipMessage | None:
        """The first response with `status` to `method`."""
        return next((r for r in self.responses if r.status == status and r.method == method), None)

    def delay(self, status: int, method: str = "INVITE") -> float | None:
        """Seconds from the first `method` request sent to the first `status` response to it."""
        request = next((m for m in self.requests_sent if m.method == method), None)
        response = self.first(status, method)
        if request is None or response is None:
            return None
        return response.time - request.time

    def describe(self) -> str:
        """A short, readable list of the messages for assertion messages."""
        lines = [f"{self.scenario}: exit {self.exit_code}"]
        start = self.messages[0].time if self.messages else 0.0
        for m in self.messages:
            arrow = "->" if m.direction == "sent" else "<-"
            lines.append(f"  {m.time - start:7.3f} {arrow} {m.start_line}")
        if self.errors.strip():
            lines.append("  errors: " + self.errors.strip().replace("\n", "\n          ")[-1500:])
        return "\n".join(lines)


# -- running sipp --------------------------------------------------------------------------


def _media_port() -> int:
    """A UDP port p with p+2 free too: sipp binds both (audio and video echo)."""
    for _ in range(50):
        port = free_port("udp")
        if port_is_free(port + 2, "udp"):
            return port
    raise CallerError("no free media port pair")


def _header_lines(lines: Sequence[str]) -> str:
    for line in lines:
        if "\n" in line or "\r" in line or "]]>" in line or ":" not in line:
            raise ValueError(f"not a single header line: {line!r}")
    return "\n".join(lines)


def _final_recv(statuses: Sequence[int], label: str, txn: str | None) -> str:
    """One <recv> per acceptable final status; all but the last optional, all go to `label`."""
    if not statuses:
        raise ValueError("at least one final status is needed")
    extra = f' response_txn="{txn}"' if txn else ""
    parts = [
        f'<recv response="{int(s)}" optional="true" next="{label}"{extra}/>' for s in statuses[:-1]
    ]
    parts.append(f'<recv response="{int(statuses[-1])}"{extra}/>')
    return "\n  ".join(parts)


class CallOptions(TypedDict, total=False):
    """Keyword arguments of `Caller.prepare` (and so of start/run/run_async)."""

    to_user: Required[str]
    transport: Transport | None
    invite_headers: Sequence[str]
    cancel_headers: Sequence[str]
    request_headers: Sequence[str]
    hold_ms: int
    cancel_after_ms: int
    final_statuses: Sequence[int] | None
    body: str
    content_type: str
    timeout: float
    port: int | None


@attrs.frozen
class _Prepared:
    scenario: Scenario
    argv: list[str]
    trace_path: Path
    error_path: Path


class CallerRun:
    """A sipp process started by `Caller.start()`; `wait()` returns its `CallTrace`."""

    def __init__(self, prepared: _Prepared, proc: subprocess.Popen[str]) -> None:
        self._prepared = prepared
        self._proc = proc
        self.trace: CallTrace | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> CallTrace:
        """Block until sipp exits (it is already bounded by `timeout`), then parse its trace."""
        try:
            stdout, _ = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            stdout, _ = self._proc.communicate()
        self.trace = _collect(self._prepared, self._proc.returncode, stdout or "")
        return self.trace

    async def wait_async(self) -> CallTrace:
        """`wait()` for trio code: polls the process instead of blocking the event loop."""
        while self._proc.poll() is None:
            await trio.sleep(0.01)
        return self.wait()

    def kill(self) -> None:
        """Kill `timeout` and sipp (same process group)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)


def _collect(prepared: _Prepared, exit_code: int, stdout: str) -> CallTrace:
    def read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    return CallTrace(
        scenario=prepared.scenario.value,
        exit_code=exit_code,
        messages=tuple(parse_trace(read(prepared.trace_path))),
        stdout=stdout,
        errors=read(prepared.error_path),
    )


async def _kill_group(proc: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class Caller:
    """Runs sipp UAC scenarios against `target` (e.g. Kamailio), from `from_user`@`domain`.

    Every run gets fresh ports and its own files under `workdir` (a temp dir by default,
    removed by `close()`); `runs` keeps every finished `CallTrace` for failure reports.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        domain: str,
        from_user: str = "caller",
        transport: Transport = "udp",
        workdir: Path | None = None,
    ) -> None:
        if not available():
            raise CallerError("sipp/timeout not installed")
        self.target = target
        self.domain = domain
        self.from_user = from_user
        self.transport = transport
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="sipis-caller-"))
        self.runs: list[CallTrace] = []
        self._started: list[CallerRun] = []

    def prepare(
        self,
        scenario: Scenario,
        *,
        to_user: str,
        transport: Transport | None = None,
        invite_headers: Sequence[str] = (),
        cancel_headers: Sequence[str] = (),
        request_headers: Sequence[str] = (),
        hold_ms: int = 200,
        cancel_after_ms: int = 0,
        final_statuses: Sequence[int] | None = None,
        body: str = "Hello from sipp",
        content_type: str = "text/plain",
        timeout: float = 10.0,
        port: int | None = None,
    ) -> _Prepared:
        """Write the filled-in scenario and build the sipp command line.

        Args:
            to_user: the callee's user part; the Request-URI is `sip:to_user@domain`.
            transport: overrides the Caller's ("udp" → sipp `-t u1`, "tcp" → `-t t1`).
            invite_headers / cancel_headers / request_headers: extra header lines for the
                INVITE, the CANCEL, or the MESSAGE (sipp expands `[keywords]` in them).
            hold_ms: CALL: time between ACK and BYE.
            cancel_after_ms: CANCEL: time between the first 180 and the CANCEL.
            final_statuses: REJECTED (default 480) / MESSAGE (default 200): acceptable finals.
            body, content_type: MESSAGE body (one or more lines; no `]]>`).
            timeout: sipp's own `-timeout` (the scenario fails); `timeout(1)` kills at +3 s.
            port: local SIP port (default: a fresh free one).
        Raises:
            ValueError: a header line or body that cannot go into the template.
        """
        if "]]>" in body or "\r" in body:
            raise ValueError("body must not contain ']]>' or CR")
        name = f"{scenario.value}-{secrets.token_hex(4)}"
        defaults = {Scenario.REJECTED: (480,), Scenario.MESSAGE: (200,)}
        statuses = tuple(final_statuses or defaults.get(scenario, (200,)))
        label = "done" if scenario is Scenario.MESSAGE else "ack"
        values = {
            "INVITE_HEADERS": _header_lines(invite_headers),
            "CANCEL_HEADERS": _header_lines(cancel_headers),
            "REQUEST_HEADERS": _header_lines(request_headers),
            "HOLD_MS": str(int(hold_ms)),
            "CANCEL_AFTER_MS": str(int(cancel_after_ms)),
            "FINAL_RECV": _final_recv(
                statuses, label, None if scenario is Scenario.MESSAGE else "invite"
            ),
            "BODY": body,
            "CONTENT_TYPE": content_type,
        }
        template = (SCENARIO_DIR / f"{scenario.value}.xml").read_text()
        # A placeholder alone on its line vanishes with the line when it is empty, so no
        # blank line ends the header block early.
        text = re.sub(
            r"^[ \t]*@@([A-Z_]+)@@[ \t]*\n",
            lambda m: (values[m.group(1)] + "\n") if values.get(m.group(1)) else "",
            template,
            flags=re.MULTILINE,
        )
        text = re.sub(r"@@([A-Z_]+)@@", lambda m: values.get(m.group(1), m.group(0)), text)
        scenario_path = self.workdir / f"{name}.xml"
        scenario_path.write_text(text)
        trace_path = self.workdir / f"{name}_messages.log"
        error_path = self.workdir / f"{name}_errors.log"
        transport = transport or self.transport
        assert SIPP is not None and TIMEOUT is not None
        argv = [
            TIMEOUT, "-s", "KILL", str(timeout + 3), SIPP,
            "-sf", str(scenario_path),
            "-s", to_user,
            "-key", "domain", self.domain,
            "-key", "from_user", self.from_user,
            "-t", "u1" if transport == "udp" else "t1",
            "-i", HOST, "-p", str(port or free_port("both")),
            "-ci", HOST, "-cp", str(free_port("udp")),
            "-mi", HOST, "-mp", str(_media_port()),
            "-m", "1", "-nostdin",
            "-timeout", f"{math.ceil(timeout)}s", "-timeout_error",
            "-recv_timeout", f"{math.ceil(timeout * 1000)}",
            "-trace_msg", "-message_file", str(trace_path),
            "-trace_err", "-error_file", str(error_path),
            f"{self.target[0]}:{self.target[1]}",
        ]  # fmt: skip
        return _Prepared(scenario, argv, trace_path, error_path)

    def start(self, scenario: Scenario, **options: Unpack[CallOptions]) -> CallerRun:
        """Start sipp in the background (for calls a test answers meanwhile); see `prepare`."""
        prepared = self.prepare(scenario, **options)
        proc = subprocess.Popen(
            prepared.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.workdir,
            start_new_session=True,
        )
        run = _TrackedRun(self, prepared, proc)
        self._started.append(run)
        return run

    def run(self, scenario: Scenario, **options: Unpack[CallOptions]) -> CallTrace:
        """Run one scenario to its end and return what happened; see `prepare`."""
        return self.start(scenario, **options).wait()

    async def run_async(self, scenario: Scenario, **options: Unpack[CallOptions]) -> CallTrace:
        """`run()` for trio tests (trio.run_process; cancelling the task kills sipp)."""
        prepared = self.prepare(scenario, **options)
        done = await trio.run_process(
            prepared.argv,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=self.workdir,
            start_new_session=True,
            deliver_cancel=_kill_group,
        )
        trace = _collect(prepared, done.returncode, done.stdout.decode(errors="replace"))
        self.runs.append(trace)
        return trace

    def close(self) -> None:
        """Kill what still runs; remove the work dir when this object made it."""
        for run in self._started:
            run.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run._proc.wait(5)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def iter_logs(self) -> Iterator[tuple[str, str]]:
        """(title, text) for a failed test's report: every finished run's message list."""
        for trace in self.runs:
            yield (f"sipp caller {trace.scenario}", trace.describe())


class _TrackedRun(CallerRun):
    """A run that records its trace in the Caller's `runs` when waited for."""

    def __init__(self, caller: Caller, prepared: _Prepared, proc: subprocess.Popen[str]) -> None:
        super().__init__(prepared, proc)
        self._caller = caller

    def wait(self, timeout: float | None = None) -> CallTrace:
        first = self.trace is None
        trace = super().wait(timeout)
        if first:
            self._caller.runs.append(trace)
        return trace


# -- raw bytes -----------------------------------------------------------------------------


def raw_sip_send(
    data: bytes,
    transport: Transport,
    addr: tuple[str, int],
    *,
    wait: float = 0.5,
    half_close: bool = False,
) -> list[bytes]:
    """Send `data` as one UDP datagram or over a fresh TCP connection; return what came back.

    UDP: every datagram received within `wait` seconds. TCP: the bytes received before the
    peer closed or `wait` passed, as one chunk (empty list if none); `half_close` shuts
    the write side after sending, like a client that gives up mid-message.
    """
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, 0))
            sock.settimeout(wait)
            sock.sendto(data, addr)
            replies: list[bytes] = []
            with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                while True:
                    replies.append(sock.recv(65535))
            return replies
    with socket.create_connection(addr, timeout=wait, source_address=(HOST, 0)) as conn:
        conn.sendall(data)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := conn.recv(65535):
                received += chunk
        return [received] if received else []


async def raw_sip_send_async(
    data: bytes,
    transport: Transport,
    addr: tuple[str, int],
    *,
    wait: float = 0.5,
    half_close: bool = False,
) -> list[bytes]:
    """`raw_sip_send()` for trio tests (the SIP server under test may share the loop)."""
    if transport == "udp":
        udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with udp:
            await udp.bind((HOST, 0))
            await udp.sendto(data, addr)
            replies: list[bytes] = []
            with trio.move_on_after(wait), contextlib.suppress(ConnectionRefusedError):
                while True:
                    replies.append(await udp.recv(65535))
            return replies
    stream = await trio.open_tcp_stream(*addr, local_address=HOST)
    async with stream:
        await stream.send_all(data)
        if half_close:
            await stream.send_eof()
        received = b""
        with trio.move_on_after(wait), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65535):
                received += chunk
        return [received] if received else []
