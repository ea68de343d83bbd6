"""One pjsua2 softphone in its own process, driven by JSON lines (see tests/peers/phone.py).

Why a subprocess: pjsua2 allows at most eight accounts per process (the ninth aborts it),
must run single-threaded to be safe from Python, and aborts at exit when Call objects
outlive the library. Keeping it out of the pytest process turns any of that into a dead
child, not a dead test run.

Protocol:
- Commands arrive on stdin, one JSON object per line: `{"id": N, "cmd": NAME, ...args}`.
  Each gets exactly one `{"event": "reply", "id": N, "ok": bool, ...}`.
- Events leave on the process's *original* stdout, one JSON object per line. pjlib prints
  to stdout during libCreate() before any log config applies, so the first thing `main`
  does is move the real stdout to a private fd and point fd 1 at stderr: library noise
  then lands in the log with everything else and never corrupts the protocol.
- stdin at EOF (the controller died or closed it) ends the process like `quit`.

Strategy: one loop polls `libHandleEvents(10 ms)` and then reads whatever is on stdin
without blocking, so every pjsua2 call and callback happens on the main thread
(`threadCnt = 0`, `mainThreadOnly = True`).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import select
import sys
import time
from collections.abc import Callable
from typing import IO, Any

UNREGISTER_WAIT = 2.0
"""Seconds `quit` with unregister waits for the registrars' answers."""

STATE_NAMES = {
    0: "NULL",
    1: "CALLING",
    2: "INCOMING",
    3: "EARLY",
    4: "CONNECTING",
    5: "CONFIRMED",
    6: "DISCONNECTED",
}


def split_message(text: str) -> tuple[str, list[list[str]], str]:
    """(start line, [[name, value], ...], body) of a SIP message; folded lines are joined."""
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers: list[list[str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append([name.strip(), value.strip()])
    return lines[0].strip(), headers, body


class Worker:
    """Owns the pjsua2 Endpoint, its transports, accounts and calls."""

    def __init__(self, out: IO[str], log_level: int) -> None:
        # Imported here, after main() moved fd 1; import_module keeps mypy off the
        # untyped SWIG module (everything from it is Any).
        pj: Any = importlib.import_module("pjsua2")
        self.pj = pj
        self.out = out
        self.running = True
        self.accounts: list[Any] = []
        self.calls: dict[int, Any] = {}
        """pjsua call index → Call object; kept until DISCONNECTED has been handled."""
        self.call_ids: dict[int, str] = {}
        """pjsua call index → SIP Call-ID."""
        self.dead_calls: list[Any] = []
        self.last_request: dict[str, tuple[str, list[list[str]]]] = {}
        """SIP Call-ID → (method, headers) of the last request received in that call."""
        self.auto_answer: dict[int, list[int]] = {}
        self.unregister_on_quit = False
        self.ep = pj.Endpoint()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = 8
        cfg.uaConfig.userAgent = "sipis-test-phone (pjsua2)"
        cfg.uaConfig.stunServer = pj.StringVector()
        cfg.logConfig.level = log_level
        cfg.logConfig.consoleLevel = log_level
        cfg.logConfig.msgLogging = log_level >= 4
        cfg.medConfig.noVad = True
        cfg.medConfig.hasIoqueue = True
        self.ep.libInit(cfg)
        self.transports: dict[str, int] = {}
        ports: dict[str, int] = {}
        for name, kind in (("udp", pj.PJSIP_TRANSPORT_UDP), ("tcp", pj.PJSIP_TRANSPORT_TCP)):
            tcfg = pj.TransportConfig()
            tcfg.port = 0
            tcfg.boundAddress = "127.0.0.1"
            tcfg.publicAddress = "127.0.0.1"
            tid = self.ep.transportCreate(kind, tcfg)
            self.transports[name] = tid
            local = self.ep.transportGetInfo(tid).localName
            ports[name] = int(local.rsplit(":", 1)[1])
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()
        self.emit("ready", pid=os.getpid(), udp_port=ports["udp"], tcp_port=ports["tcp"])

    # -- output --------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self.out.flush()

    # -- commands ------------------------------------------------------------------------

    def handle_line(self, line: str) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            self.emit("reply", id=None, ok=False, error=f"not JSON: {line[:80]!r}")
            return
        command_id = request.pop("id", None)
        name = request.pop("cmd", "")
        handler: Callable[..., Any] | None = getattr(self, f"cmd_{name}", None)
        if handler is None:
            self.emit("reply", id=command_id, ok=False, error=f"unknown command {name!r}")
            return
        try:
            result = handler(**request)
        except Exception as exc:
            self.emit("reply", id=command_id, ok=False, error=f"{type(exc).__name__}: {exc}")
            return
        self.emit("reply", id=command_id, ok=True, result=result)

    def cmd_register(
        self,
        registrar_uri: str,
        username: str,
        password: str,
        realm: str = "*",
        transport: str = "udp",
        expires: int = 300,
        domain: str | None = None,
        contact_params: str = "",
        contact_uri_params: str = "",
        headers: list[list[str]] | None = None,
        auto_answer: list[int] | None = None,
        retry_interval: int = 0,
    ) -> dict[str, Any]:
        """Create an account; it REGISTERs at once."""
        pj = self.pj
        if len(self.accounts) >= 8:
            raise RuntimeError("pjsua2 aborts on a ninth account: use another Phone")
        if transport not in self.transports:
            raise ValueError(f"transport must be udp or tcp, not {transport!r}")
        if transport == "tcp" and "transport=" not in registrar_uri.lower():
            registrar_uri += ";transport=tcp"
        host = domain or registrar_uri.split(":", 1)[1].split(";", 1)[0].rsplit(":", 1)[0]
        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:{username}@{host}"
        acfg.regConfig.registrarUri = registrar_uri
        acfg.regConfig.registerOnAdd = True
        acfg.regConfig.timeoutSec = expires
        acfg.regConfig.retryIntervalSec = retry_interval
        acfg.regConfig.dropCallsOnFail = False
        for name, value in headers or []:
            header = pj.SipHeader()
            header.hName = name
            header.hValue = value
            acfg.regConfig.headers.append(header)
        acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", realm, username, 0, password))
        acfg.sipConfig.transportId = self.transports[transport]
        acfg.sipConfig.contactParams = contact_params
        acfg.sipConfig.contactUriParams = contact_uri_params
        nat = acfg.natConfig
        nat.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        nat.iceEnabled = False
        nat.turnEnabled = False
        nat.contactRewriteUse = 0
        nat.viaRewriteUse = 0
        nat.sdpNatRewriteUse = 0
        nat.sipOutboundUse = 0
        nat.udpKaIntervalSec = 0
        acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
        acfg.mediaConfig.transportConfig.port = 0
        number = len(self.accounts)
        account = _make_account(self, number)
        self.auto_answer[number] = list(auto_answer or [])
        account.create(acfg, True)
        self.accounts.append(account)
        return {"account": number, "id_uri": acfg.idUri}

    def cmd_unregister(self, account: int = 0) -> None:
        self.accounts[account].setRegistration(False)

    def cmd_reregister(self, account: int = 0) -> None:
        self.accounts[account].setRegistration(True)

    def _call(self, call_id: str) -> Any:
        for index, sip_call_id in self.call_ids.items():
            if sip_call_id == call_id and index in self.calls:
                return self.calls[index]
        raise KeyError(f"no live call with Call-ID {call_id!r}")

    def cmd_answer(self, call_id: str, code: int = 200, reason: str = "") -> None:
        """Send a provisional or final (2xx) answer to an incoming call."""
        prm = self.pj.CallOpParam(True)
        prm.statusCode = code
        if reason:
            prm.reason = reason
        self._call(call_id).answer(prm)

    def cmd_hangup(self, call_id: str, code: int = 0, reason: str = "") -> None:
        """BYE a confirmed call, CANCEL an outgoing one, or reject an incoming one with `code`."""
        prm = self.pj.CallOpParam(True)
        prm.statusCode = code
        if reason:
            prm.reason = reason
        self._call(call_id).hangup(prm)

    def cmd_calls(self) -> list[dict[str, Any]]:
        return [
            {"call_id": self.call_ids.get(i, ""), "state": STATE_NAMES.get(c.getInfo().state)}
            for i, c in self.calls.items()
        ]

    def cmd_quit(self, unregister: bool = False) -> None:
        self.running = False
        self.unregister_on_quit = unregister

    # -- callbacks (called from Account/Call subclasses) -----------------------------------

    def on_reg_state(self, number: int, prm: Any) -> None:
        info = self.accounts[number].getInfo() if number < len(self.accounts) else None
        self.emit(
            "reg_state",
            account=number,
            code=prm.code,
            reason=prm.reason,
            expiration=prm.expiration,
            active=bool(info.regIsActive) if info is not None else None,
        )

    def on_incoming_call(self, account: Any, number: int, prm: Any) -> None:
        call = _make_call(self, account, prm.callId)
        self.calls[prm.callId] = call
        info = call.getInfo()
        self.call_ids[prm.callId] = info.callIdString
        start, headers, body = split_message(prm.rdata.wholeMsg)
        self.emit(
            "incoming_call",
            account=number,
            call_id=info.callIdString,
            request_line=start,
            headers=headers,
            body=body,
            source=prm.rdata.srcAddress,
        )
        for code in self.auto_answer.get(number, []):
            prm_answer = self.pj.CallOpParam(True)
            prm_answer.statusCode = code
            if code >= 300:
                call.hangup(prm_answer)
            else:
                call.answer(prm_answer)

    def on_call_state(self, call: Any, prm: Any) -> None:
        pj = self.pj
        info = call.getInfo()
        cause_method = None
        cause_headers: list[list[str]] = []
        event = prm.e
        if event.type == pj.PJSIP_EVENT_TSX_STATE:
            tsx_event = event.body.tsxState
            if tsx_event.type == pj.PJSIP_EVENT_RX_MSG:
                start, cause_headers, _ = split_message(tsx_event.src.rdata.wholeMsg)
                if not start.startswith("SIP/2.0"):
                    cause_method = start.split(" ", 1)[0]
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED and cause_method is None:
            # A CANCEL ends the call through the INVITE's 487, not through its own event.
            last = self.last_request.get(info.callIdString)
            if last is not None and last[0] in ("BYE", "CANCEL"):
                cause_method, cause_headers = last
        state = STATE_NAMES.get(info.state, str(info.state))
        self.emit(
            "call_state",
            call_id=info.callIdString,
            state=state,
            last_status=info.lastStatusCode,
            last_reason=info.lastReason,
            cause_method=cause_method,
            cause_headers=cause_headers,
        )
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            # Dropping the last reference inside its own callback would free the C++ object
            # under pjsua's feet: park it and let the main loop release it.
            self.dead_calls.append(self.calls.pop(info.id, call))

    def on_call_tsx_state(self, call: Any, prm: Any) -> None:
        """Report each request the far end sends inside the call (BYE, CANCEL, re-INVITE…)."""
        pj = self.pj
        event = prm.e
        if event.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx_event = event.body.tsxState
        if tsx_event.type != pj.PJSIP_EVENT_RX_MSG or tsx_event.tsx.role != pj.PJSIP_ROLE_UAS:
            return
        start, headers, body = split_message(tsx_event.src.rdata.wholeMsg)
        if start.startswith("SIP/2.0"):
            return
        method = start.split(" ", 1)[0]
        call_id = self.call_ids.get(call.getId(), "")
        self.last_request[call_id] = (method, headers)
        self.emit(
            "call_request",
            call_id=call_id,
            method=method,
            request_line=start,
            headers=headers,
            body=body,
        )

    def on_instant_message(self, number: int | None, call_id: str | None, prm: Any) -> None:
        _, headers, _ = split_message(prm.rdata.wholeMsg)
        self.emit(
            "message",
            account=number,
            call_id=call_id,
            from_uri=prm.fromUri,
            to_uri=prm.toUri,
            content_type=prm.contentType,
            body=prm.msgBody,
            headers=headers,
        )

    # -- loop ------------------------------------------------------------------------------

    def run(self, commands: int) -> None:
        buffer = b""
        while self.running:
            self.ep.libHandleEvents(10)
            self.dead_calls.clear()
            ready, _, _ = select.select([commands], [], [], 0)
            if not ready:
                continue
            chunk = os.read(commands, 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer and self.running:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    self.handle_line(line.decode("utf-8", "replace"))
        self.shutdown()

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.ep.libHandleEvents(10)

    def shutdown(self) -> None:
        """Hang up, optionally unregister, then destroy in the order pjsua2 survives."""
        if self.calls:
            self.ep.hangupAllCalls()
            self.pump(0.2)
        if self.unregister_on_quit:
            self.unregister_all(UNREGISTER_WAIT)
        for account in self.accounts:
            account.shutdown()
        self.calls.clear()
        self.dead_calls.clear()
        gc.collect()
        # Registrations are settled above: no network during destroy keeps quitting fast.
        self.ep.libDestroy(self.pj.PJSUA_DESTROY_NO_NETWORK)
        self.accounts.clear()
        gc.collect()
        self.emit("closed")

    def unregister_all(self, timeout: float) -> None:
        """De-REGISTER every registered account and pump until each answered (or timeout)."""
        pending = set()
        for number, account in enumerate(self.accounts):
            info = account.getInfo()
            if info.regIsActive:
                try:
                    account.setRegistration(False)
                except Exception as exc:  # EBUSY while a REGISTER is in flight
                    self.emit("warning", message=f"unregister {number}: {exc}")
                    continue
                pending.add(number)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            self.ep.libHandleEvents(10)
            pending = {n for n in pending if self.accounts[n].getInfo().regIsActive}


def _make_account(worker: Worker, number: int) -> Any:
    """An Account subclass instance that forwards callbacks to `worker`."""
    base: Any = worker.pj.Account

    class PhoneAccount(base):  # type: ignore[misc]
        def onRegState(self, prm: Any) -> None:
            worker.on_reg_state(number, prm)

        def onIncomingCall(self, prm: Any) -> None:
            worker.on_incoming_call(self, number, prm)

        def onInstantMessage(self, prm: Any) -> None:
            worker.on_instant_message(number, None, prm)

    return PhoneAccount()


def _make_call(worker: Worker, account: Any, call_index: int) -> Any:
    base: Any = worker.pj.Call

    class PhoneCall(base):  # type: ignore[misc]
        def onCallState(self, prm: Any) -> None:
            worker.on_call_state(self, prm)

        def onInstantMessage(self, prm: Any) -> None:
            worker.on_instant_message(None, worker.call_ids.get(call_index), prm)

        def onCallTsxState(self, prm: Any) -> None:
            worker.on_call_tsx_state(self, prm)

    return PhoneCall(account, call_index)


def main(argv: list[str] | None = None) -> int:
    # Keep the real stdout for the protocol; everything printed to fd 1 goes to stderr.
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = os.fdopen(protocol_fd, "w", buffering=1, encoding="utf-8")
    parser = argparse.ArgumentParser(prog="phone_worker")
    parser.add_argument("--log-level", type=int, default=4)
    args = parser.parse_args(argv)
    worker = Worker(out, args.log_level)
    worker.run(sys.stdin.fileno())
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
