"""The sipp caller runs its scenarios and reports every message, in order, with headers.

Most tests answer the caller with `ScriptedUas`, a few lines of Python on a UDP socket that
reply exactly as scripted (the sipis behaviours the integration tests will look for: two
180s with `X-Sipis-Push-Status`, a 487 that overtakes the 200 for the CANCEL, a 480 with
`X-Sipis-Reason`). Kamailio covers the routed cases and the raw-bytes helper.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import trio

from tests.conftest import CallerFactory, KamailioFactory
from tests.peers.caller import (
    ANSWERED_ELSEWHERE,
    Caller,
    Scenario,
    Transport,
    parse_trace,
    raw_sip_send,
    raw_sip_send_async,
)
from tests.peers.ports import HOST

SDP_ANSWER = (
    "v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)

Reply = tuple[float, str]
"""(delay before sending in seconds, the whole SIP message)."""


def _header(request: str, name: str) -> str:
    for line in request.split("\r\n")[1:]:
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def response(
    request: str,
    status: int,
    reason: str,
    *,
    headers: tuple[str, ...] = (),
    body: str = "",
    to_tag: str | None = "uas1",
    cseq: str | None = None,
) -> str:
    """A response to `request` (Via, From, To + tag, Call-ID, CSeq copied)."""
    to = _header(request, "To")
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines = [
        f"SIP/2.0 {status} {reason}",
        f"Via: {_header(request, 'Via')}",
        f"From: {_header(request, 'From')}",
        f"To: {to}",
        f"Call-ID: {_header(request, 'Call-ID')}",
        f"CSeq: {cseq or _header(request, 'CSeq')}",
        *headers,
    ]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return "\r\n".join(lines) + "\r\n\r\n" + body


class ScriptedUas:
    """A UDP UAS on 127.0.0.1 answering each request with what `script(request)` returns."""

    def __init__(self, script: Callable[[str], list[Reply]]) -> None:
        self.script = script
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            text = data.decode(errors="replace")
            self.requests.append(text)
            for delay, message in self.script(text):
                time.sleep(delay)
                self.sock.sendto(message.encode(), peer)

    def methods(self) -> list[str]:
        return [r.split(" ", 1)[0] for r in self.requests]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def uas_factory() -> Iterator[Callable[[Callable[[str], list[Reply]]], ScriptedUas]]:
    made: list[ScriptedUas] = []

    def make(script: Callable[[str], list[Reply]]) -> ScriptedUas:
        uas = ScriptedUas(script)
        made.append(uas)
        return uas

    yield make
    for uas in made:
        uas.close()


def _caller(factory: CallerFactory, uas: ScriptedUas) -> Caller:
    return factory(uas.address, domain="sip.test", from_user="carol")


# -- trace parsing (no sipp) ---------------------------------------------------------------

TRACE = (
    "----------------------------------------------- 2026-01-02 10:00:00.000100\n"
    "UDP message sent (10 bytes):\n\n"
    "INVITE sip:alice@sip.test SIP/2.0\nCSeq: 1 INVITE\nContent-Length: 0\n\n"
    "----------------------------------------------- 2026-01-02 10:00:00.250100\n"
    "UDP message received [10] bytes :\n\n"
    "SIP/2.0 180 Ringing\nCSeq: 1 INVITE\nX-Sipis-Push-Status: Alerting-Device\n"
    "Subject: folded\n  line\nContent-Length: 0\n\n\n"
    "----------------------------------------------- 2026-01-02 10:00:01.000100\n"
    "TCP message received [10] bytes :\n\n"
    "BYE sip:carol@127.0.0.1 SIP/2.0\nCSeq: 7 BYE\nContent-Length: 0\n\n"
)


def test_parse_trace_reads_direction_time_start_line_and_headers() -> None:
    """sipp's -message_file becomes messages with timestamps, statuses and headers."""
    messages = parse_trace(TRACE)
    assert [(m.direction, m.transport, m.start_line) for m in messages] == [
        ("sent", "UDP", "INVITE sip:alice@sip.test SIP/2.0"),
        ("received", "UDP", "SIP/2.0 180 Ringing"),
        ("received", "TCP", "BYE sip:carol@127.0.0.1 SIP/2.0"),
    ]
    ringing = messages[1]
    assert ringing.status == 180 and ringing.method == "INVITE"
    assert ringing.header("x-sipis-push-status") == "Alerting-Device"
    assert ringing.header("Subject") == "folded line"
    assert messages[1].time - messages[0].time == pytest.approx(0.25, abs=1e-6)
    assert messages[2].method == "BYE" and messages[2].status is None


# -- scenarios against a scripted UAS ------------------------------------------------------


def test_call_reports_each_180_with_its_push_status_in_order(
    caller_factory: CallerFactory, uas_factory: Callable[..., ScriptedUas]
) -> None:
    """CALL: every 1xx is kept with its headers; ACK and BYE follow the 200's Contact."""

    def script(request: str) -> list[Reply]:
        method = request.split(" ", 1)[0]
        if method == "INVITE":
            contact = (f"Contact: <sip:alice@{HOST}:{uas.address[1]}>",)
            return [
                (0, response(request, 100, "Trying", to_tag=None)),
                (0, response(request, 180, "Ringing", headers=(
                    "X-Sipis-Push-Status: Alerting-Device",))),
                (0.05, response(request, 180, "Ringing", headers=(
                    "X-Sipis-Push-Status: Push-Notification-Sent",))),
                (0.05, response(request, 200, "OK", headers=contact, body=SDP_ANSWER)),
            ]  # fmt: skip
        if method == "BYE":
            return [(0, response(request, 200, "OK"))]
        return []

    uas = uas_factory(script)
    trace = _caller(caller_factory, uas).run(
        Scenario.CALL, to_user="alice", hold_ms=50, invite_headers=["X-Test: one"]
    )

    assert trace.ok, trace.describe()
    assert trace.statuses() == [100, 180, 180, 200]
    assert trace.statuses("BYE") == [200]
    assert trace.header_values("X-Sipis-Push-Status", status=180) == [
        "Alerting-Device",
        "Push-Notification-Sent",
    ]
    delay = trace.delay(180)
    assert delay is not None and 0 <= delay < 0.5
    assert uas.methods() == ["INVITE", "ACK", "BYE"]
    invite, ack, bye = uas.requests
    assert _header(invite, "X-Test") == "one"
    assert "m=audio" in invite and "RTP/AVP 0" in invite
    assert ack.startswith(f"ACK sip:alice@{HOST}:{uas.address[1]} SIP/2.0")
    assert _header(bye, "To").endswith(";tag=uas1")
    # An empty [routes] (no Record-Route) must not end the header block early.
    assert _header(ack, "Call-ID") == _header(invite, "Call-ID")
    assert _header(ack, "Content-Length") == "0"


@pytest.mark.parametrize("cancel_answered_first", [True, False])
def test_cancel_accepts_200_and_487_in_either_order_and_late_180s(
    caller_factory: CallerFactory,
    uas_factory: Callable[..., ScriptedUas],
    cancel_answered_first: bool,
) -> None:
    """CANCEL: the Reason header goes out; 180s during the pause or after the CANCEL and a
    487 that overtakes the 200 for the CANCEL are all fine; both finals are waited for."""

    def script(request: str) -> list[Reply]:
        method = request.split(" ", 1)[0]
        # Each 180 differs: sipp takes an identical copy of the last message it received
        # for a retransmission and answers it by resending what it sent next.
        if method == "INVITE":
            return [
                (0, response(request, 180, "Ringing", headers=("X-N: 1",))),
                (0.05, response(request, 180, "Ringing", headers=("X-N: 2",))),  # in the pause
            ]
        if method == "CANCEL":
            late = response(request, 180, "Ringing", cseq="1 INVITE", headers=("X-N: 3",))
            terminated = response(request, 487, "Request Terminated", cseq="1 INVITE")
            cancel_ok = response(request, 200, "OK")
            if cancel_answered_first:
                return [(0, cancel_ok), (0, late), (0.05, terminated)]
            return [(0, late), (0, terminated), (0.05, cancel_ok)]
        return []

    uas = uas_factory(script)
    trace = _caller(caller_factory, uas).run(
        Scenario.CANCEL,
        to_user="alice",
        cancel_after_ms=200,
        cancel_headers=[f"Reason: {ANSWERED_ELSEWHERE}"],
    )

    assert trace.ok, trace.describe()
    assert trace.statuses() == [180, 180, 180, 487]
    assert trace.statuses("CANCEL") == [200]
    assert uas.methods() == ["INVITE", "CANCEL", "ACK"]
    invite, cancel, ack = uas.requests
    assert _header(cancel, "Reason") == ANSWERED_ELSEWHERE
    # RFC 3261 §9.1 / §17.1.1.3: CANCEL and the non-2xx ACK share the INVITE's branch.
    assert _header(cancel, "Via") == _header(invite, "Via") == _header(ack, "Via")
    assert _header(ack, "To").endswith(";tag=uas1")


def test_rejected_accepts_any_listed_final_and_acks_it(
    caller_factory: CallerFactory, uas_factory: Callable[..., ScriptedUas]
) -> None:
    """REJECTED: a 480 with X-Sipis-Reason passes when 480 is one of the expected finals."""

    def script(request: str) -> list[Reply]:
        if request.startswith("INVITE"):
            return [
                (0, response(request, 180, "Ringing")),
                (0.02, response(request, 480, "Temporarily Unavailable",
                                headers=("X-Sipis-Reason: No-Response-From-Device",))),
            ]  # fmt: skip
        return []

    uas = uas_factory(script)
    caller = _caller(caller_factory, uas)
    trace = caller.run(Scenario.REJECTED, to_user="alice", final_statuses=(603, 480))

    assert trace.ok, trace.describe()
    assert trace.statuses() == [180, 480]
    assert trace.header_values("X-Sipis-Reason", status=480) == ["No-Response-From-Device"]
    assert uas.methods() == ["INVITE", "ACK"]


def test_call_fails_with_nonzero_exit_when_the_callee_rejects(
    caller_factory: CallerFactory, uas_factory: Callable[..., ScriptedUas]
) -> None:
    """CALL expects a 200: a 486 makes the run fail, and the trace still shows the 486."""
    uas = uas_factory(
        lambda r: [(0, response(r, 486, "Busy Here"))] if r.startswith("INVITE") else []
    )
    trace = _caller(caller_factory, uas).run(Scenario.CALL, to_user="alice", timeout=3)

    assert not trace.ok
    assert trace.statuses() == [486]
    assert "486" in trace.errors


def test_message_sends_its_body_and_expects_the_final_status(
    caller_factory: CallerFactory, uas_factory: Callable[..., ScriptedUas]
) -> None:
    """MESSAGE: the body and content type arrive as given; 202 passes when expected."""
    uas = uas_factory(lambda r: [(0, response(r, 202, "Accepted"))])
    caller = _caller(caller_factory, uas)
    trace = caller.run(
        Scenario.MESSAGE, to_user="alice", body="hi there", final_statuses=(200, 202)
    )

    assert trace.ok, trace.describe()
    assert trace.statuses("MESSAGE") == [202]
    (message,) = uas.requests
    assert message.startswith("MESSAGE sip:alice@sip.test SIP/2.0")
    assert _header(message, "Content-Type") == "text/plain"
    assert message.split("\r\n\r\n", 1)[1].strip() == "hi there"
    assert _header(message, "From").startswith("<sip:carol@sip.test>")


async def test_run_async_runs_two_callers_at_once_in_trio(
    caller_factory: CallerFactory, uas_factory: Callable[..., ScriptedUas]
) -> None:
    """run_async does not block the trio loop; parallel callers use distinct ports."""
    uas = uas_factory(lambda r: [(0.2, response(r, 200, "OK"))])
    caller = _caller(caller_factory, uas)
    traces = []

    async def one() -> None:
        traces.append(await caller.run_async(Scenario.MESSAGE, to_user="alice"))

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    assert [t.ok for t in traces] == [True, True], [t.describe() for t in traces]
    assert trio.current_time() - started < 2.0
    sources = {m.split("\r\n", 2)[1] for m in uas.requests}  # the Via lines
    assert len(sources) == 2


# -- through Kamailio ----------------------------------------------------------------------


def test_call_to_an_unregistered_user_gets_404_from_kamailio(
    kamailio_factory: KamailioFactory, caller_factory: CallerFactory
) -> None:
    """Routed through the provider: nobody registered → 404, which REJECTED can expect."""
    kamailio = kamailio_factory()
    caller = caller_factory(kamailio.address, domain=kamailio.domain)

    trace = caller.run(Scenario.REJECTED, to_user="alice", final_statuses=(404,))

    assert trace.ok, trace.describe()
    assert trace.statuses()[-1] == 404


OPTIONS = (
    "OPTIONS sip:{host}:{port} SIP/2.0\r\n"
    "Via: SIP/2.0/{transport} 127.0.0.1:9;rport;branch=z9hG4bKraw{transport}\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:raw@127.0.0.1>;tag=raw\r\n"
    "To: <sip:{host}:{port}>\r\n"
    "Call-ID: raw-{transport}@127.0.0.1\r\n"
    "CSeq: 1 OPTIONS\r\n"
    "Content-Length: 0\r\n\r\n"
)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_raw_sip_send_returns_replies_and_survives_garbage(
    kamailio_factory: KamailioFactory, transport: Transport
) -> None:
    """raw_sip_send: a valid OPTIONS gets 200; garbage and a truncated message get nothing."""
    kamailio = kamailio_factory()
    options = OPTIONS.format(host=HOST, port=kamailio.port, transport=transport.upper())
    kind = transport

    replies = raw_sip_send(options.encode(), kind, kamailio.address)
    assert replies and replies[0].startswith(b"SIP/2.0 200 ")

    assert raw_sip_send(b"\x00\xffgarbage\r\n\r\n", kind, kamailio.address, wait=0.3) == []
    truncated = options.encode()[: len(options) // 2]
    assert raw_sip_send(truncated, kind, kamailio.address, wait=0.3, half_close=True) == []
    # Kamailio is still fine afterwards.
    assert raw_sip_send(options.encode(), kind, kamailio.address)[0].startswith(b"SIP/2.0 200")


async def test_raw_sip_send_async_gets_the_reply_in_trio(
    kamailio_factory: KamailioFactory,
) -> None:
    """The trio twin returns the same replies over UDP and TCP."""
    kamailio = kamailio_factory()
    transports: tuple[Transport, ...] = ("udp", "tcp")
    for transport in transports:
        options = OPTIONS.format(host=HOST, port=kamailio.port, transport=transport.upper())
        replies = await raw_sip_send_async(options.encode(), transport, kamailio.address, wait=0.3)
        assert replies and replies[0].startswith(b"SIP/2.0 200 "), transport
