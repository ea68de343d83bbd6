"""A real softphone (pjsua2) for integration tests, one subprocess per phone.

`Phone` starts `python -m tests.peers.phone_worker` and talks to it in JSON lines: commands
on its stdin, events back on a private copy of its stdout (pjlib's own console noise goes
to the log file instead). The phone binds UDP and TCP on 127.0.0.1 (random ports), has no
sound device (null audio), no STUN/ICE and no NAT rewriting, and answers a caller's SDP
offer with its own.

Why a subprocess: pjsua2 aborts the process on a ninth account or when Call objects
outlive the library, and is only safe single-threaded; in a child process none of that
can take pytest down, and every phone is independent.

Events are kept in arrival order. Each `wait_*` returns the first matching event that no
earlier wait returned, so a test can wait for things in the order it cares about, not the
order they happened. A wait fails early with `PhoneError` when what it waits for can no
longer happen (the call ended, the registration failed, the process died).

`Phone` is synchronous. For trio tests, where the SIP server under test may run in the
same event loop and must not be blocked, wrap it in `AsyncPhone`: the same methods as
coroutines (commands run in a worker thread, waits poll the event list).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack

import attrs
import trio

REPO_ROOT = Path(__file__).resolve().parents[2]

CallStateName = Literal[
    "NULL", "CALLING", "INCOMING", "EARLY", "CONNECTING", "CONFIRMED", "DISCONNECTED"
]
Transport = Literal["udp", "tcp"]
Headers = tuple[tuple[str, str], ...]

COMMAND_TIMEOUT = 5.0
"""A command reply comes within one poll cycle (10 ms); 5 s means the worker is stuck."""


class PhoneError(RuntimeError):
    """The phone process failed, a command was refused, or a wait cannot succeed."""


def available() -> bool:
    """Whether the pjsua2 wheel is importable (tests skip otherwise)."""
    import importlib.util

    return importlib.util.find_spec("pjsua2") is not None


def _headers(raw: Sequence[Sequence[str]]) -> Headers:
    return tuple((str(name), str(value)) for name, value in raw)


def _values(headers: Headers, name: str) -> list[str]:
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


@attrs.frozen
class RegState:
    """Outcome of one REGISTER transaction (after any digest challenge)."""

    account: int
    code: int
    """SIP status of the final response; pjsip uses 408/503 for timeouts and transport errors."""
    reason: str
    expiration: int
    """Seconds granted (0 after an unregistration or a failure)."""
    active: bool | None
    time: float

    @property
    def registered(self) -> bool:
        return 200 <= self.code < 300 and self.expiration > 0


@attrs.frozen
class IncomingCall:
    """An INVITE as the phone received it."""

    account: int
    call_id: str
    request_line: str
    headers: Headers
    body: str
    source: str
    """"ip:port" it came from."""
    time: float

    @property
    def request_uri(self) -> str:
        return self.request_line.split(" ")[1]

    def header(self, name: str) -> str | None:
        values = _values(self.headers, name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return _values(self.headers, name)


@attrs.frozen
class CallState:
    """A call's INVITE session changed state."""

    call_id: str
    state: CallStateName
    last_status: int
    last_reason: str
    cause_method: str | None
    """The received request that caused the change (e.g. "BYE", "CANCEL"), if any."""
    cause_headers: Headers
    """Headers of that request (e.g. a CANCEL's RFC 3326 Reason)."""
    time: float

    def cause_header(self, name: str) -> str | None:
        values = _values(self.cause_headers, name)
        return values[0] if values else None


@attrs.frozen
class CallRequest:
    """A request the far end sent inside a call (BYE, CANCEL, re-INVITE, UPDATE, INFO…)."""

    call_id: str
    method: str
    request_line: str
    headers: Headers
    body: str
    time: float

    def header(self, name: str) -> str | None:
        values = _values(self.headers, name)
        return values[0] if values else None


@attrs.frozen
class InstantMessage:
    """A MESSAGE the phone received (and answered 200)."""

    account: int | None
    call_id: str | None
    """Call-ID of the call it arrived in, None outside a dialog."""
    from_uri: str
    to_uri: str
    content_type: str
    body: str
    headers: Headers
    time: float

    def header(self, name: str) -> str | None:
        values = _values(self.headers, name)
        return values[0] if values else None


class RegisterOptions(TypedDict, total=False):
    """Keyword options of `Phone.register` (for `AsyncPhone.register`)."""

    realm: str
    transport: Transport
    expires: int
    domain: str | None
    contact_params: str
    contact_uri_params: str
    headers: Sequence[tuple[str, str]]
    auto_answer: Sequence[int]
    retry_interval: int


@attrs.frozen
class _Query:
    """What a wait looks for, and what proves it will never come."""

    kind: str
    what: str
    match: Callable[[dict[str, Any]], bool]
    doomed: Callable[[dict[str, Any]], str | None] = lambda _event: None


class Phone:
    """One pjsua2 phone process; see the module docstring."""

    _names = itertools.count(1)

    def __init__(
        self, *, name: str | None = None, log_dir: Path | None = None, log_level: int = 4
    ) -> None:
        """Args:
        name: shown in logs and errors.
        log_dir: where the phone's log goes (default: a temp dir removed by cleanup()).
        log_level: pjlib log level; 4 and up includes every SIP message.
        """
        self.name = name or f"phone{next(self._names)}"
        self._own_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="sipis-phone-"))
        self.log_path = self.log_dir / f"{self.name}.log"
        self.log_level = log_level
        self.udp_port = 0
        self.tcp_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._events: list[dict[str, Any]] = []
        self._taken: set[int] = set()
        self._eof = False
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._last_call_id: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Phone:
        """Spawn the worker and wait until its transports are bound."""
        if self._proc is not None:
            return self
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.peers.phone_worker",
                    "--log-level",
                    str(self.log_level),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self._reader = threading.Thread(
            target=self._read_events, name=f"{self.name}-events", daemon=True
        )
        self._reader.start()
        try:
            ready = self._wait(_Query("ready", "the worker to start", lambda e: True), timeout)
        except BaseException:
            self.close()
            raise
        self.udp_port = int(ready["udp_port"])
        self.tcp_port = int(ready["tcp_port"])
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self, timeout: float = 5.0, *, unregister: bool = False) -> int | None:
        """Quit the worker (optionally de-REGISTERing first) and always reap it.

        Returns the exit code (None if it was never started). A worker that does not exit
        within `timeout` is killed.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._send({"id": next(self._ids), "cmd": "quit", "unregister": unregister})
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._reader is not None:
            self._reader.join(2)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def cleanup(self) -> None:
        """close() and remove the log dir when this object made it."""
        self.close()
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Phone:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- commands --------------------------------------------------------------------------

    def register(
        self,
        registrar_uri: str,
        username: str,
        password: str,
        *,
        realm: str = "*",
        transport: Transport = "udp",
        expires: int = 300,
        domain: str | None = None,
        contact_params: str = "",
        contact_uri_params: str = "",
        headers: Sequence[tuple[str, str]] = (),
        auto_answer: Sequence[int] = (),
        retry_interval: int = 0,
    ) -> int:
        """Add an account that REGISTERs to `registrar_uri` at once; returns its number.

        Args:
            registrar_uri: e.g. "sip:127.0.0.1:5060"; ";transport=tcp" is added for TCP.
            username, password: digest credentials (the password never leaves the worker
                except hashed); `realm` "*" answers any realm.
            domain: host part of the AoR (default: the registrar's host).
            contact_params / contact_uri_params: appended to the Contact header / its URI,
                each starting with ";" (e.g. ';+sip.instance="<urn:uuid:…>"').
            headers: extra header lines for the REGISTER.
            auto_answer: status codes sent at once to every incoming call, in order
                (e.g. (180,) rings, (180, 200) answers, (486,) rejects).
            retry_interval: seconds before pjsua retries a failed registration (0 = never).
        Raises:
            PhoneError: the worker refused (bad transport, a ninth account, …).
        """
        result = self._command(
            "register",
            registrar_uri=registrar_uri,
            username=username,
            password=password,
            realm=realm,
            transport=transport,
            expires=expires,
            domain=domain,
            contact_params=contact_params,
            contact_uri_params=contact_uri_params,
            headers=[list(h) for h in headers],
            auto_answer=list(auto_answer),
            retry_interval=retry_interval,
        )
        return int(result["account"])

    def unregister(self, account: int = 0) -> None:
        """Send REGISTER with Expires: 0 (pjsua `setRegistration(False)`)."""
        self._command("unregister", account=account)

    def reregister(self, account: int = 0) -> None:
        """REGISTER again now (refresh)."""
        self._command("reregister", account=account)

    def answer(self, call_id: str | None = None, code: int = 200) -> None:
        """Answer an incoming call with `code` (1xx or 2xx; the 200 carries an SDP answer)."""
        self._command("answer", call_id=self._resolve(call_id), code=code)

    def ring(self, call_id: str | None = None) -> None:
        """Send 180 Ringing."""
        self.answer(call_id, 180)

    def hangup(self, call_id: str | None = None, code: int = 0) -> None:
        """End a call: BYE when confirmed; for an unanswered incoming call, reply `code`."""
        self._command("hangup", call_id=self._resolve(call_id), code=code)

    def decline(self, call_id: str | None = None, code: int = 603) -> None:
        """Reject an incoming call with a final non-2xx `code` (603 Decline, 486 Busy…)."""
        if code < 300:
            raise ValueError("decline needs a final non-2xx status")
        self.hangup(call_id, code)

    def live_calls(self) -> list[dict[str, str]]:
        """[{"call_id", "state"}] of the calls the worker still holds."""
        result: list[dict[str, str]] = self._command("calls")
        return result

    # -- waits -----------------------------------------------------------------------------

    def wait_reg_state(self, account: int = 0, timeout: float = 5.0) -> RegState:
        """The next registration outcome of `account` (success or failure)."""
        return _reg_state(self._wait(_reg_query(account), timeout))

    def wait_registered(self, account: int = 0, timeout: float = 5.0) -> RegState:
        """Wait for the next outcome and require it to be a successful registration."""
        state = self.wait_reg_state(account, timeout)
        if not state.registered:
            raise PhoneError(f"{self.name}: registration failed: {state.code} {state.reason}")
        return state

    def wait_unregistered(self, account: int = 0, timeout: float = 5.0) -> RegState:
        """Wait for the next outcome and require it to be an unregistration (expiration 0)."""
        state = self.wait_reg_state(account, timeout)
        if state.expiration != 0:
            raise PhoneError(f"{self.name}: still registered: {state}")
        return state

    def wait_incoming_call(
        self, timeout: float = 5.0, *, account: int | None = None
    ) -> IncomingCall:
        """The next INVITE that reached the phone (the default call for answer/hangup after)."""
        call = _incoming(self._wait(_incoming_query(account), timeout))
        self._last_call_id = call.call_id
        return call

    def wait_call_state(
        self, state: CallStateName, call_id: str | None = None, timeout: float = 5.0
    ) -> CallState:
        """The call (default: the last incoming one) reaching `state`.

        Raises PhoneError at once if the call ends while waiting for another state.
        """
        return _call_state(self._wait(_call_state_query(state, self._resolve(call_id)), timeout))

    def wait_call_request(
        self, method: str, call_id: str | None = None, timeout: float = 5.0
    ) -> CallRequest:
        """The next in-call request `method` (e.g. "BYE") for the call (default: the last one)."""
        query = _call_request_query(method, self._resolve(call_id))
        return _call_request(self._wait(query, timeout))

    def wait_message(self, timeout: float = 5.0) -> InstantMessage:
        """The next MESSAGE the phone received."""
        return _message(self._wait(_Query("message", "a MESSAGE", lambda e: True), timeout))

    def events(self) -> list[dict[str, Any]]:
        """Every event so far (raw dicts), for debugging and ad-hoc assertions."""
        with self._cond:
            return list(self._events)

    def iter_logs(self) -> Iterator[tuple[str, str]]:
        """(title, text) for a failed test's report: the pjsua log, SIP messages included."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        yield (f"pjsua2 {self.name} (udp {self.udp_port}, tcp {self.tcp_port}) log", text)

    # -- internals -------------------------------------------------------------------------

    def _resolve(self, call_id: str | None) -> str:
        if call_id is not None:
            return call_id
        if self._last_call_id is None:
            raise PhoneError(f"{self.name}: no incoming call yet; pass call_id")
        return self._last_call_id

    def _read_events(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "noise", "line": raw.decode(errors="replace")}
            if not isinstance(event, dict):
                continue
            with self._cond:
                self._events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _send(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise PhoneError(f"{self.name}: not started")
        with self._write_lock:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()

    def _command(self, cmd: str, **args: Any) -> Any:
        command_id = next(self._ids)
        try:
            self._send({"id": command_id, "cmd": cmd, **args})
        except (BrokenPipeError, ValueError) as exc:
            raise PhoneError(f"{self.name}: worker gone ({exc}); log:\n{self._log_tail()}") from exc
        reply = self._wait(
            _Query("reply", f"the reply to {cmd}", lambda e: e.get("id") == command_id),
            COMMAND_TIMEOUT,
        )
        if not reply.get("ok"):
            raise PhoneError(f"{self.name}: {cmd} failed: {reply.get('error')}")
        return reply.get("result")

    def _take_nowait(self, query: _Query) -> dict[str, Any] | None:
        """The first untaken matching event (marked taken); raise if it cannot come."""
        with self._cond:
            for index, event in enumerate(self._events):
                if event.get("event") != query.kind:
                    continue
                if index not in self._taken and query.match(event):
                    self._taken.add(index)
                    return event
                reason = query.doomed(event)
                if reason:
                    raise PhoneError(f"{self.name}: waiting for {query.what}: {reason}")
            if self._eof or (self._proc is not None and self._proc.poll() is not None):
                raise PhoneError(
                    f"{self.name}: process exited while waiting for {query.what}; log:\n"
                    + self._log_tail()
                )
            return None

    def _wait(self, query: _Query, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._take_nowait(query)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PhoneError(
                        f"{self.name}: timed out after {timeout} s waiting for {query.what}"
                    )
                # Wake up now and then: a dead process does not always close stdout at once.
                self._cond.wait(min(left, 0.1))

    async def _wait_async(self, query: _Query, timeout: float) -> dict[str, Any]:
        with trio.move_on_after(timeout):
            while True:
                found = self._take_nowait(query)
                if found is not None:
                    return found
                await trio.sleep(0.005)
        raise PhoneError(f"{self.name}: timed out after {timeout} s waiting for {query.what}")

    def _log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


# -- queries and event decoding ------------------------------------------------------------


def _reg_query(account: int) -> _Query:
    return _Query(
        "reg_state",
        f"a registration outcome of account {account}",
        lambda e: e.get("account") == account,
    )


def _incoming_query(account: int | None) -> _Query:
    return _Query(
        "incoming_call",
        "an incoming call",
        lambda e: account is None or e.get("account") == account,
    )


def _call_state_query(state: str, call_id: str) -> _Query:
    def doomed(event: dict[str, Any]) -> str | None:
        if (
            state != "DISCONNECTED"
            and event.get("call_id") == call_id
            and event.get("state") == "DISCONNECTED"
        ):
            return f"call ended ({event.get('last_status')} {event.get('last_reason')})"
        return None

    return _Query(
        "call_state",
        f"call {call_id} to be {state}",
        lambda e: e.get("call_id") == call_id and e.get("state") == state,
        doomed,
    )


def _call_request_query(method: str, call_id: str) -> _Query:
    return _Query(
        "call_request",
        f"a {method} in call {call_id}",
        lambda e: e.get("call_id") == call_id and e.get("method") == method,
    )


def _call_request(e: dict[str, Any]) -> CallRequest:
    return CallRequest(
        call_id=str(e["call_id"]),
        method=str(e["method"]),
        request_line=str(e.get("request_line", "")),
        headers=_headers(e.get("headers", [])),
        body=str(e.get("body", "")),
        time=float(e["time"]),
    )


def _reg_state(e: dict[str, Any]) -> RegState:
    return RegState(
        account=int(e["account"]),
        code=int(e["code"]),
        reason=str(e.get("reason", "")),
        expiration=int(e.get("expiration", 0)),
        active=e.get("active"),
        time=float(e["time"]),
    )


def _incoming(e: dict[str, Any]) -> IncomingCall:
    return IncomingCall(
        account=int(e["account"]),
        call_id=str(e["call_id"]),
        request_line=str(e["request_line"]),
        headers=_headers(e.get("headers", [])),
        body=str(e.get("body", "")),
        source=str(e.get("source", "")),
        time=float(e["time"]),
    )


def _call_state(e: dict[str, Any]) -> CallState:
    return CallState(
        call_id=str(e["call_id"]),
        state=e["state"],
        last_status=int(e["last_status"]),
        last_reason=str(e.get("last_reason", "")),
        cause_method=e.get("cause_method"),
        cause_headers=_headers(e.get("cause_headers", [])),
        time=float(e["time"]),
    )


def _message(e: dict[str, Any]) -> InstantMessage:
    return InstantMessage(
        account=e.get("account"),
        call_id=e.get("call_id"),
        from_uri=str(e.get("from_uri", "")),
        to_uri=str(e.get("to_uri", "")),
        content_type=str(e.get("content_type", "")),
        body=str(e.get("body", "")),
        headers=_headers(e.get("headers", [])),
        time=float(e["time"]),
    )


# -- trio ----------------------------------------------------------------------------------


class AsyncPhone:
    """The `Phone` API as coroutines, safe to use next to a SIP server in the same trio loop.

    Commands (a few ms each) run in a worker thread; waits poll the phone's event list
    every 5 ms, so cancelling one loses no event.
    """

    def __init__(self, phone: Phone) -> None:
        self.phone = phone

    @property
    def name(self) -> str:
        return self.phone.name

    @property
    def udp_port(self) -> int:
        return self.phone.udp_port

    @property
    def tcp_port(self) -> int:
        return self.phone.tcp_port

    async def start(self, timeout: float = 10.0) -> AsyncPhone:
        await trio.to_thread.run_sync(self.phone.start, timeout)
        return self

    async def close(self, timeout: float = 5.0, *, unregister: bool = False) -> int | None:
        return await trio.to_thread.run_sync(
            lambda: self.phone.close(timeout, unregister=unregister)
        )

    async def register(
        self, registrar_uri: str, username: str, password: str, **options: Unpack[RegisterOptions]
    ) -> int:
        """See `Phone.register` for the options."""
        return await trio.to_thread.run_sync(
            lambda: self.phone.register(registrar_uri, username, password, **options)
        )

    async def unregister(self, account: int = 0) -> None:
        await trio.to_thread.run_sync(self.phone.unregister, account)

    async def reregister(self, account: int = 0) -> None:
        await trio.to_thread.run_sync(self.phone.reregister, account)

    async def answer(self, call_id: str | None = None, code: int = 200) -> None:
        await trio.to_thread.run_sync(self.phone.answer, call_id, code)

    async def ring(self, call_id: str | None = None) -> None:
        await trio.to_thread.run_sync(self.phone.ring, call_id)

    async def hangup(self, call_id: str | None = None, code: int = 0) -> None:
        await trio.to_thread.run_sync(self.phone.hangup, call_id, code)

    async def decline(self, call_id: str | None = None, code: int = 603) -> None:
        await trio.to_thread.run_sync(self.phone.decline, call_id, code)

    async def wait_reg_state(self, account: int = 0, timeout: float = 5.0) -> RegState:
        return _reg_state(await self.phone._wait_async(_reg_query(account), timeout))

    async def wait_registered(self, account: int = 0, timeout: float = 5.0) -> RegState:
        state = await self.wait_reg_state(account, timeout)
        if not state.registered:
            raise PhoneError(f"{self.name}: registration failed: {state.code} {state.reason}")
        return state

    async def wait_unregistered(self, account: int = 0, timeout: float = 5.0) -> RegState:
        state = await self.wait_reg_state(account, timeout)
        if state.expiration != 0:
            raise PhoneError(f"{self.name}: still registered: {state}")
        return state

    async def wait_incoming_call(
        self, timeout: float = 5.0, *, account: int | None = None
    ) -> IncomingCall:
        call = _incoming(await self.phone._wait_async(_incoming_query(account), timeout))
        self.phone._last_call_id = call.call_id
        return call

    async def wait_call_state(
        self, state: CallStateName, call_id: str | None = None, timeout: float = 5.0
    ) -> CallState:
        query = _call_state_query(state, self.phone._resolve(call_id))
        return _call_state(await self.phone._wait_async(query, timeout))

    async def wait_call_request(
        self, method: str, call_id: str | None = None, timeout: float = 5.0
    ) -> CallRequest:
        query = _call_request_query(method, self.phone._resolve(call_id))
        return _call_request(await self.phone._wait_async(query, timeout))

    async def wait_message(self, timeout: float = 5.0) -> InstantMessage:
        query = _Query("message", "a MESSAGE", lambda e: True)
        return _message(await self.phone._wait_async(query, timeout))
