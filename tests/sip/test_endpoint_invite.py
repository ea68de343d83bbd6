"""INVITE on the trio endpoint: server and client transactions, CANCEL, ACK, flows, stateless sends.

Timing is checked on the in-memory transport pair with trio's MockClock (autojump), so Timer
G/H/L/B/D/M run instantly; behaviour over real sockets (UDP, and TCP through a flow the peer
opened) runs on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from sipis.sip.dns import Target
from sipis.sip.endpoint import (
    ClientInviteHandle,
    EndpointConfig,
    ListenSpec,
    ServerInviteHandle,
    SipEndpoint,
    Source,
)
from sipis.sip.errors import TransactionTimeout, TransportError
from sipis.sip.headers import URI
from sipis.sip.message import (
    Headers,
    SipRequest,
    SipResponse,
    StreamFramer,
    make_response,
    new_branch,
    parse_message,
)
from sipis.sip.proxy import ProxyIdentity, forward_request
from sipis.sip.transaction import InviteTxState, TxOutcome
from sipis.sip.transport import (
    Destination,
    MemoryTransport,
    MessageReceived,
    TransportEvent,
)
from tests.sip.cycles import cyclic_garbage

HOST = "127.0.0.1"
PEER_HOST, PEER_PORT = "127.0.0.2", 5062
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
NOWHERE = (ipaddress.ip_network("192.0.2.0/24"),)  # upstream_allow that excludes loopback
ANSWERED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'

Message = SipRequest | SipResponse
Script = Callable[[ServerInviteHandle], Awaitable[None]]


# --- helpers -------------------------------------------------------------------------------


def uac_request(
    method: str = "INVITE", *, branch: str = "z9hG4bKuac1", call_id: str = "call-1",
    to_tag: str | None = None, port: int = PEER_PORT, transport: str = "UDP",
    extra: tuple[str, ...] = (),
) -> SipRequest:
    """A request as the provider would send it to us (CSeq 1, ACK/CANCEL like the INVITE)."""
    to = f"<sip:tok@{HOST}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} sip:tok@{HOST} SIP/2.0",
        f"Via: SIP/2.0/{transport} {PEER_HOST}:{port};branch={branch};rport",
        "From: <sip:caller@provider.test>;tag=caller1",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
        "Max-Forwards: 70",
        *extra,
        "Content-Length: 0",
        "",
        "",
    ]
    request = parse_message("\r\n".join(lines).encode())
    assert isinstance(request, SipRequest)
    return request


def device_invite(uri: str = "sip:phone@10.0.0.5:5060", call_id: str = "fwd-1") -> SipRequest:
    """An INVITE for the endpoint to send (no Via: the endpoint adds its own)."""
    headers = Headers()
    headers.add("From", "<sip:caller@provider.test>;tag=caller1")
    headers.add("To", "<sip:tok@sipis.test>")
    headers.add("Call-ID", call_id)
    headers.add("CSeq", "1 INVITE")
    headers.add("Contact", "<sip:caller@192.0.2.10>")
    return SipRequest("INVITE", URI.parse(uri), headers)


class Peer:
    """The far end of a MemoryTransport pair: it sends raw messages, and logs what it gets with
    the (virtual) time of arrival."""

    def __init__(self, transport: MemoryTransport, ours: MemoryTransport) -> None:
        self.transport = transport
        self.ours = ours
        self.log: list[tuple[float, Message]] = []
        self._events_in, self._events = trio.open_memory_channel[TransportEvent](1000)
        self._inbox_in, self._inbox = trio.open_memory_channel[Message](1000)

    async def start(self, nursery: trio.Nursery) -> Peer:
        await nursery.start(self.transport.run, self._events_in)
        nursery.start_soon(self._collect)
        return self

    async def _collect(self) -> None:
        async for event in self._events:
            if isinstance(event, MessageReceived):
                self.log.append((trio.current_time(), event.message))
                self._inbox_in.send_nowait(event.message)

    async def send(self, message: Message) -> None:
        await self.transport.send(message.to_bytes(),
                                  Destination("udp", self.ours.host, self.ours.port))

    async def next(self, timeout: float = 100.0) -> Message:
        with trio.fail_after(timeout):
            return await self._inbox.receive()

    async def response(self, status: int | None = None, method: str = "INVITE") -> SipResponse:
        """The next response of ``method``, checking ``status`` (requests, and a 100 when
        another status is wanted, are skipped)."""
        while True:
            message = await self.next()
            if isinstance(message, SipResponse) and message.cseq.method == method:
                if message.status == 100 and status not in (None, 100):
                    continue
                if status is not None:
                    assert message.status == status, f"{message.status} != {status}"
                return message

    async def request(self, method: str) -> SipRequest:
        """The next request of ``method`` (others are skipped)."""
        while True:
            message = await self.next()
            if isinstance(message, SipRequest) and message.method == method:
                return message

    def pending(self) -> list[Message]:
        """Whatever has arrived and not been read yet."""
        out = []
        while True:
            try:
                out.append(self._inbox.receive_nowait())
            except trio.WouldBlock:
                return out

    def times(self, start: float, wanted: Callable[[Message], bool]) -> list[float]:
        """Arrival times (from ``start``) of the logged messages that ``wanted`` picks."""
        return [round(when - start, 3) for when, message in self.log if wanted(message)]


class CallHandler:
    """An ``InviteHandler``: runs ``script`` per INVITE; other requests get 200 (ACK: none)."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script
        self.handles: list[ServerInviteHandle] = []
        self.requests: list[tuple[SipRequest, Source]] = []
        self.script_done = trio.Event()

    async def handle_request(self, request: SipRequest, source: Source) -> SipResponse | None:
        self.requests.append((request, source))
        if request.method == "ACK":
            return None
        return make_response(request, 200, to_tag="uas")

    async def handle_invite(
        self, request: SipRequest, source: Source, tx: ServerInviteHandle
    ) -> None:
        self.handles.append(tx)
        try:
            if self.script is not None:
                await self.script(tx)
        finally:
            self.script_done.set()


async def start_endpoint(
    nursery: trio.Nursery, handler: Any, *, transport: MemoryTransport | None = None,
    transports: tuple[str, ...] = ("udp", "tcp"), **config: Any,
) -> SipEndpoint:
    config.setdefault("upstream_allow", LOOPBACK)
    endpoint = SipEndpoint(
        EndpointConfig(listen=tuple(ListenSpec(t, HOST, 0) for t in transports),
                       public_host=HOST, **config),
        handler=handler, transport=transport)
    await nursery.start(endpoint.run)
    return endpoint


async def memory_setup(
    nursery: trio.Nursery, handler: Any = None, **config: Any
) -> tuple[SipEndpoint, Peer]:
    ours, theirs = MemoryTransport.pair((HOST, 5060), (PEER_HOST, PEER_PORT))
    endpoint = await start_endpoint(nursery, handler or CallHandler(), transport=ours, **config)
    return endpoint, await Peer(theirs, ours).start(nursery)


def ack_for(invite: SipRequest, response: SipResponse, branch: str | None = None) -> SipRequest:
    """The UAC's ACK: the INVITE's branch for a non-2xx, a new one (``branch``) for a 2xx."""
    to_tag = response.to.tag
    return uac_request("ACK", branch=branch or invite.top_via.branch or "", to_tag=to_tag,
                       call_id=invite.call_id)


async def collect(handle: ClientInviteHandle) -> list[int]:
    return [response.status async for response in handle.responses()]


async def ringing(nursery: trio.Nursery, script: Script
                  ) -> tuple[CallHandler, SipEndpoint, Peer, SipRequest]:
    """An endpoint whose handler runs ``script``, and an INVITE sent to it, answered 180."""
    handler = CallHandler(script)
    endpoint, peer = await memory_setup(nursery, handler)
    invite = uac_request()
    await peer.send(invite)
    await peer.response(180)
    return handler, endpoint, peer, invite


# --- server INVITE transactions ---------------------------------------------------------------


async def test_an_invite_gets_100_then_the_handlers_180s_then_200_over_udp(
    nursery: trio.Nursery,
) -> None:
    """A real UDP UAC: 100 at once, the handler's 180s as it sends them, then its 200 with the
    handle's To tag; a retransmitted INVITE gets the last 180 again, the handler runs once."""
    gate = trio.Event()

    async def script(tx: ServerInviteHandle) -> None:
        assert await tx.send_provisional(tx.make_response(180))
        await gate.wait()
        later = tx.make_response(180)
        later.headers.add("X-Sipis-Push-Status", "Push-Notification-Sent")
        assert await tx.send_provisional(later)
        assert await tx.send_final(tx.make_response(200))

    handler = CallHandler(script)
    endpoint = await start_endpoint(nursery, handler)
    uac = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await uac.bind((HOST, 0))
    port = uac.getsockname()[1]
    address = (HOST, endpoint.bound_port("udp"))
    invite = uac_request(port=port, branch="z9hG4bKudp1")

    async def receive() -> SipResponse:
        with trio.fail_after(5):
            data, _ = await uac.recvfrom(65536)
        response = parse_message(data)
        assert isinstance(response, SipResponse)
        return response

    await uac.sendto(invite.to_bytes(), address)
    trying = await receive()
    assert trying.status == 100 and trying.to.tag is None
    ringing = await receive()
    assert ringing.status == 180
    await uac.sendto(invite.to_bytes(), address)  # retransmission: the last 180 again
    assert await receive() == ringing
    gate.set()
    assert (await receive()).headers.get("X-Sipis-Push-Status") == "Push-Notification-Sent"
    ok = await receive()
    assert ok.status == 200
    tx = handler.handles[0]
    assert ok.to.tag == tx.to_tag == ringing.to.tag
    assert ok.top_via.rport == port and ok.top_via.received == HOST
    await uac.sendto(invite.to_bytes(), address)  # absorbed in ACCEPTED
    with trio.move_on_after(0.2):
        await receive()
        pytest.fail("a retransmitted INVITE in ACCEPTED must be absorbed")
    assert len(handler.handles) == 1
    assert tx.state is InviteTxState.ACCEPTED
    assert tx.source.transport == "udp" and tx.source.port == port


async def test_a_non_2xx_final_is_retransmitted_over_udp_until_the_ack(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Timer G: the 486 goes at 0, T1, 3·T1, 7·T1 ...; the ACK stops it, is absorbed (never
    reaches handle_request), and Timer I (T4) then ends the transaction."""
    acked: list[bool] = []

    async def script(tx: ServerInviteHandle) -> None:
        await tx.send_final(tx.make_response(486))
        acked.append(await tx.wait_ack())

    handler = CallHandler(script)
    endpoint, peer = await memory_setup(nursery, handler)
    invite = uac_request()
    start = trio.current_time()
    await peer.send(invite)
    await peer.response(100)
    finals = [await peer.response(486) for _ in range(4)]
    assert peer.times(start, lambda m: m in finals) == [0, 0.5, 1.5, 3.5]
    await peer.send(ack_for(invite, finals[0]))
    await trio.sleep(20)
    assert peer.pending() == []
    assert acked == [True]
    tx = handler.handles[0]
    assert tx.state is InviteTxState.TERMINATED and tx.outcome is TxOutcome.COMPLETED
    assert handler.requests == []
    assert endpoint.statistics().server_transactions == 0


async def test_without_an_ack_timer_h_ends_the_retransmissions(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """No ACK: the 486 is resent with G doubling up to T2, until Timer H (64·T1) ends the
    transaction with TIMEOUT and wait_ack() says False."""
    acked: list[bool] = []

    async def script(tx: ServerInviteHandle) -> None:
        await tx.send_final(tx.make_response(486))
        acked.append(await tx.wait_ack())

    handler = CallHandler(script)
    _, peer = await memory_setup(nursery, handler)
    start = trio.current_time()
    await peer.send(uac_request())
    await trio.sleep(40)
    sent = peer.times(start, lambda m: isinstance(m, SipResponse) and m.status == 486)
    assert sent[:5] == [0, 0.5, 1.5, 3.5, 7.5]
    assert len(sent) == 11  # ... 11.5, 15.5, 19.5, 23.5, 27.5, 31.5; H at 32
    assert acked == [False]
    assert await handler.handles[0].wait_terminated() is TxOutcome.TIMEOUT


async def test_a_cancel_is_answered_200_the_handler_sends_487_and_its_ack_is_absorbed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """CANCEL for a ringing INVITE: 200 (same To tag) at once, the handle learns the Reason,
    the handler's 487 goes out, a retransmitted CANCEL gets the 200 again, the ACK is eaten."""
    seen: list[object] = []

    async def script(tx: ServerInviteHandle) -> None:
        await tx.send_provisional(tx.make_response(180))
        seen.append(await tx.wait_cancelled())
        await tx.send_final(tx.make_response(487))
        seen.append(await tx.wait_ack())

    handler = CallHandler(script)
    _, peer = await memory_setup(nursery, handler)
    invite = uac_request()
    await peer.send(invite)
    await peer.response(100)
    ringing = await peer.response(180)
    cancel = uac_request("CANCEL", extra=(f"Reason: {ANSWERED_ELSEWHERE}",))
    await peer.send(cancel)
    ok = await peer.response(200, method="CANCEL")
    assert ok.to.tag == ringing.to.tag
    terminated = await peer.response(487)
    assert terminated.to.tag == ringing.to.tag
    await peer.send(cancel)
    assert await peer.response(200, method="CANCEL") == ok
    await peer.send(ack_for(invite, terminated))
    await handler.script_done.wait()
    assert seen == [ANSWERED_ELSEWHERE, True]
    assert handler.requests == []  # neither the CANCEL nor the ACK reached the handler


async def test_finished_invite_transactions_leave_no_reference_cycles(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An INVITE server transaction, its handle and its request are freed by reference
    counting once it is over, cancelled or not, with a CANCEL callback that refers back to
    the handle (as the call driver's does). A cycle per call made the daemon's collector run
    every few seconds under load, for 50–120 ms each time (bench: INVITE → push p99)."""

    class Handler:
        async def handle_request(self, request: SipRequest, source: Source) -> None:
            return None

        async def handle_invite(self, request: SipRequest, source: Source,
                                tx: ServerInviteHandle) -> None:
            cancelled: list[tuple[str, str | None]] = []

            def on_cancel(reason: str | None) -> None:
                cancelled.append((tx.branch, reason))

            tx.when_cancelled(on_cancel)
            await tx.send_provisional(tx.make_response(180))
            if request.call_id.startswith("busy"):
                await tx.send_final(tx.make_response(486))
                return
            await tx.wait_cancelled()
            await tx.send_final(tx.make_response(487))

    _, peer = await memory_setup(nursery, Handler())
    with cyclic_garbage("sipis.sip.endpoint") as left:
        for n in range(6):
            call_id = f"{'busy' if n % 2 else 'cancel'}-{n}"
            invite = uac_request(branch=f"z9hG4bK-cycle-{n}", call_id=call_id)
            await peer.send(invite)
            await peer.response(180)
            if n % 2 == 0:
                await peer.send(uac_request("CANCEL", branch=f"z9hG4bK-cycle-{n}",
                                            call_id=call_id))
            final = await peer.response(486 if n % 2 else 487)
            await peer.send(ack_for(invite, final))
        await trio.sleep(64)  # Timers I and J are over: every transaction has ended
        del invite, final
    assert left == []


async def test_when_cancelled_calls_back_on_the_cancel_or_at_once_if_it_came(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The task-less ``wait_cancelled``: a callback given before the CANCEL hears its Reason
    when the CANCEL arrives, once; one given after it is called at once."""
    early: list[str | None] = []
    late: list[str | None] = []

    async def script(tx: ServerInviteHandle) -> None:
        await tx.send_provisional(tx.make_response(180))
        tx.when_cancelled(early.append)
        await tx.wait_cancelled()
        tx.when_cancelled(late.append)
        await tx.send_final(tx.make_response(487))

    handler, _, peer, invite = await ringing(nursery, script)
    assert early == []
    cancel = uac_request("CANCEL", extra=(f"Reason: {ANSWERED_ELSEWHERE}",))
    await peer.send(cancel)
    await peer.response(487)
    await peer.send(cancel)  # a retransmitted CANCEL calls nobody again
    await peer.response(200, method="CANCEL")
    await handler.script_done.wait()
    assert early == [ANSWERED_ELSEWHERE]
    assert late == [ANSWERED_ELSEWHERE]


async def test_a_handle_makes_an_event_only_for_its_waiters(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A handle keeps flags, and an event only while someone waits: most handles are never
    waited on and linger for Timer I (5 s over UDP). Two waiters on one handle both wake."""
    woke: list[tuple[str, object]] = []
    idle: list[bool] = []

    async def script(tx: ServerInviteHandle) -> None:
        await tx.send_provisional(tx.make_response(180))
        tx.when_cancelled(lambda reason: None)
        idle.append(any(isinstance(v, trio.Event) for v in vars(tx).values()))

        async def ack() -> None:
            woke.append(("ack", await tx.wait_ack()))

        async def end() -> None:
            woke.append(("end", await tx.wait_terminated()))

        async with trio.open_nursery() as waiters:
            waiters.start_soon(ack)
            waiters.start_soon(end)
            await trio.testing.wait_all_tasks_blocked()
            await tx.send_final(tx.make_response(486))

    handler, _, peer, invite = await ringing(nursery, script)
    busy = await peer.response(486)
    await peer.send(ack_for(invite, busy))
    await handler.script_done.wait()
    assert idle == [False]
    assert woke == [("ack", True), ("end", TxOutcome.COMPLETED)]
    assert handler.handles[0].terminated and handler.handles[0]._changed is None


async def test_a_cancel_over_udp_is_answered_and_reported_from_the_receive_path(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """No task per CANCEL: by the time the endpoint has taken the CANCEL in, its 200 is on
    the wire and the handle has heard of it (a task each cost a spawn and a scheduler pass
    per cancelled call)."""
    async def script(tx: ServerInviteHandle) -> None:
        await tx.send_provisional(tx.make_response(180))
        await tx.wait_cancelled()
        await tx.send_final(tx.make_response(487))

    handler, endpoint, peer, _ = await ringing(nursery, script)
    sent: list[bytes] = []
    ours = peer.ours
    ours.on_send = lambda dest, data: sent.append(data)
    cancel = uac_request("CANCEL", extra=(f"Reason: {ANSWERED_ELSEWHERE}",))
    endpoint._request_received(cancel, Source("udp", PEER_HOST, PEER_PORT))
    # No checkpoint since: nothing else has run.
    assert [data.split(b"\r\n", 1)[0] for data in sent] == [b"SIP/2.0 200 OK"]
    assert b"CSeq: 1 CANCEL" in sent[0]
    assert handler.handles[0].cancelled
    assert handler.handles[0].cancel_reason == ANSWERED_ELSEWHERE
    assert (await peer.response(487)).status == 487


async def test_a_cancel_matching_no_invite_gets_481(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A CANCEL whose branch names no INVITE transaction: 481, and no handler sees it."""
    handler = CallHandler()
    _, peer = await memory_setup(nursery, handler)
    await peer.send(uac_request("CANCEL", branch="z9hG4bKnothing"))
    assert (await peer.response(481, method="CANCEL")).to.tag
    assert handler.requests == [] and handler.handles == []


async def test_a_cancel_after_the_final_gets_200_but_changes_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """§9.2: the INVITE already has its final: 200 to the CANCEL, the handle is not told."""
    async def script(tx: ServerInviteHandle) -> None:
        await tx.send_final(tx.make_response(486))

    handler = CallHandler(script)
    _, peer = await memory_setup(nursery, handler)
    await peer.send(uac_request())
    await peer.response(486)
    await peer.send(uac_request("CANCEL"))
    await peer.response(200, method="CANCEL")
    assert not handler.handles[0].cancelled


async def test_a_2xx_is_sent_again_by_send_2xx_and_its_ack_goes_to_the_handler(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """2xx: ACCEPTED absorbs INVITE retransmissions, send_2xx() relays further 2xx (also
    after Timer L, statelessly), and the 2xx's ACK (own branch) is an ordinary request."""
    async def hold(tx: ServerInviteHandle) -> None:
        await tx.wait_terminated()

    handler = CallHandler(hold)
    _, peer = await memory_setup(nursery, handler)
    invite = uac_request()
    await peer.send(invite)
    await peer.response(100)
    await trio.sleep(0.1)
    tx = handler.handles[0]
    ok = tx.make_response(200)
    assert await tx.send_final(ok)
    assert await peer.response(200) == ok
    await peer.send(invite)
    await trio.sleep(1)
    assert peer.pending() == []
    assert await tx.send_2xx(ok)
    assert await peer.response(200) == ok
    await peer.send(ack_for(invite, ok, branch="z9hG4bKack2xx"))
    await trio.sleep(1)
    assert [request.method for request, _ in handler.requests] == ["ACK"]
    assert peer.pending() == []  # the ACK is never answered
    assert await tx.wait_terminated() is TxOutcome.COMPLETED  # Timer L
    assert not await tx.wait_ack()
    assert await tx.send_2xx(ok)
    assert await peer.response(200) == ok
    assert not await tx.send_final(tx.make_response(486))  # the final is long out
    with pytest.raises(ValueError):
        await tx.send_2xx(tx.make_response(486))


async def test_a_handler_that_fails_or_forgets_the_final_leaves_a_500(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """handle_invite raising, or returning without a final: the endpoint answers 500."""
    async def script(tx: ServerInviteHandle) -> None:
        if tx.request.call_id == "boom":
            raise RuntimeError("handler bug")

    endpoint, peer = await memory_setup(nursery, CallHandler(script))
    await peer.send(uac_request(call_id="boom", branch="z9hG4bKboom"))
    await peer.response(500)
    await peer.send(uac_request(call_id="quiet", branch="z9hG4bKquiet"))
    await peer.response(500)
    assert endpoint.statistics().handler_errors == 1


async def test_a_legacy_handler_has_the_487_sent_for_it_on_cancel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A handler without handle_invite: its INVITE still gets 100, a CANCEL gets 200 and 487
    at once, and the handler's late answer is discarded."""
    release = trio.Event()

    class Legacy:
        async def handle_request(self, request: SipRequest, source: Source) -> SipResponse | None:
            await release.wait()
            return make_response(request, 480, to_tag="late")

    _, peer = await memory_setup(nursery, Legacy())
    await peer.send(uac_request())
    await peer.response(100)
    await peer.send(uac_request("CANCEL"))
    await peer.response(200, method="CANCEL")
    await peer.response(487)
    release.set()
    await trio.sleep(0.2)  # before Timer G resends the 487
    assert peer.pending() == []  # the handler's 480 came too late


# --- client INVITE transactions -------------------------------------------------------------


async def test_invite_delivers_180_then_200_and_every_2xx_retransmission_until_timer_m(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """invite(): our Via with the handle's branch; 180 and 200 delivered, a retransmitted 200
    delivered again (a proxy relays it), no ACK from the transaction; iteration ends at M."""
    endpoint, peer = await memory_setup(nursery)
    handle = await endpoint.invite(device_invite(), Destination("udp", PEER_HOST, PEER_PORT))
    sent = await peer.request("INVITE")
    assert sent.top_via.branch == handle.branch and sent.top_via.has_rport
    assert len(sent.vias) == 1 and sent == handle.request
    assert sent.headers.get("Max-Forwards") == "70"
    ok = make_response(sent, 200, to_tag="dev")
    await peer.send(make_response(sent, 180, to_tag="dev"))
    await peer.send(ok)
    await trio.sleep(1)
    await peer.send(ok)
    start = trio.current_time()
    assert await collect(handle) == [180, 200, 200]
    assert trio.current_time() - start == pytest.approx(31.0)  # Timer M = 64·T1 after the 200
    assert handle.final == ok and handle.error is None
    assert handle.terminated.is_set()
    assert not [m for m in peer.pending() if isinstance(m, SipRequest)]  # no ACK, no resend
    assert endpoint.statistics().client_transactions == 0


async def test_a_non_2xx_final_is_acked_by_the_transaction(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A 486: ACK at once (INVITE's branch, the 486's To tag), iteration ends with it; its
    retransmission is ACKed again without being delivered; Timer D then ends it."""
    endpoint, peer = await memory_setup(nursery)
    handle = await endpoint.invite(device_invite(), Destination("udp", PEER_HOST, PEER_PORT))
    sent = await peer.request("INVITE")
    busy = make_response(sent, 486, to_tag="dev")
    await peer.send(busy)
    start = trio.current_time()
    assert await collect(handle) == [486]
    assert trio.current_time() - start < 1
    ack = await peer.request("ACK")
    assert ack.top_via.branch == handle.branch and ack.to.tag == "dev"
    assert ack.cseq.seq == 1 and ack.uri == sent.uri
    await peer.send(busy)
    assert (await peer.request("ACK")) == ack
    await handle.wait_terminated()
    assert trio.current_time() - start == pytest.approx(32.0)
    assert handle.final == busy and handle.error is None


async def test_cancel_before_any_provisional_waits_then_goes_after_the_180(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """cancel() in CALLING sends nothing (§9.1); the 180 releases the CANCEL (same branch,
    the Reason given); the UAS answers it 200, its 487 arrives and is ACKed."""
    endpoint, peer = await memory_setup(nursery)
    handle = await endpoint.invite(device_invite(), Destination("udp", PEER_HOST, PEER_PORT))
    sent = await peer.request("INVITE")
    handle.cancel(reason=ANSWERED_ELSEWHERE)
    assert not handle.cancel_allowed
    await trio.sleep(0.2)
    assert [m for m in peer.pending() if isinstance(m, SipRequest) and m.method == "CANCEL"] == []
    assert not handle.cancel_sent
    await peer.send(make_response(sent, 180, to_tag="dev"))
    cancel = await peer.request("CANCEL")
    assert handle.cancel_sent
    assert cancel.top_via.branch == handle.branch and cancel.cseq.method == "CANCEL"
    assert cancel.headers.get("Reason") == ANSWERED_ELSEWHERE
    await peer.send(make_response(cancel, 200, to_tag="dev"))
    await peer.send(make_response(sent, 487, to_tag="dev"))
    assert await collect(handle) == [180, 487]
    assert (await peer.request("ACK")).top_via.branch == handle.branch
    await trio.sleep(0.1)
    assert isinstance(handle.cancel_result, SipResponse) and handle.cancel_result.status == 200


async def test_a_cancel_asked_for_after_the_final_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A final beat the CANCEL: none is sent, ever."""
    endpoint, peer = await memory_setup(nursery)
    handle = await endpoint.invite(device_invite(), Destination("udp", PEER_HOST, PEER_PORT))
    sent = await peer.request("INVITE")
    handle.cancel()  # pending: no provisional yet
    await peer.send(make_response(sent, 603, to_tag="dev"))
    assert await collect(handle) == [603]
    handle.cancel()
    await handle.wait_terminated()
    methods = [m.method for _, m in peer.log if isinstance(m, SipRequest)]
    assert "CANCEL" not in methods and not handle.cancel_sent


async def test_a_cancelled_invite_without_a_final_is_given_up_after_64_t1(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """§9.1: the CANCEL was answered but no 487 ever comes: after 64·T1 the transaction is
    given up with TransactionTimeout, not kept forever."""
    endpoint, peer = await memory_setup(nursery)
    handle = await endpoint.invite(device_invite(), Destination("udp", PEER_HOST, PEER_PORT))
    sent = await peer.request("INVITE")
    await peer.send(make_response(sent, 180, to_tag="dev"))
    handle.cancel()
    cancel = await peer.request("CANCEL")
    await peer.send(make_response(cancel, 200, to_tag="dev"))
    start = trio.current_time()
    statuses: list[int] = []
    with pytest.raises(TransactionTimeout, match="CANCEL"):
        async for response in handle.responses():
            statuses.append(response.status)
    assert statuses == [180]
    assert trio.current_time() - start == pytest.approx(32.0)
    assert endpoint.statistics().client_transactions == 0


async def test_timer_b_without_any_response_raises_transaction_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A silent UAS: INVITE at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 (Timer A doubles, no cap),
    then Timer B (32 s) ends the iteration with TransactionTimeout, not a final response."""
    endpoint, peer = await memory_setup(nursery)
    start = trio.current_time()
    handle = await endpoint.invite(device_invite(), Destination("udp", PEER_HOST, PEER_PORT))
    with pytest.raises(TransactionTimeout, match="Timer B"):
        await collect(handle)
    assert trio.current_time() - start == pytest.approx(32.0)
    assert peer.times(start, lambda m: True) == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert handle.final is None and isinstance(handle.error, TransactionTimeout)


async def test_replace_top_via_swaps_the_proxy_via_for_the_endpoints_own(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An INVITE built by proxy.forward_request: our Via is replaced (not stacked), the
    provider's stays below it; a foreign top Via is refused."""
    endpoint, peer = await memory_setup(nursery)
    received = uac_request()
    forwarded = forward_request(received, via=ProxyIdentity(HOST, 5060, "udp"),
                                branch=new_branch(), target_uri=URI.parse("sip:phone@10.0.0.5"))
    handle = await endpoint.invite(forwarded, Destination("udp", PEER_HOST, PEER_PORT),
                                   replace_top_via=True)
    sent = await peer.request("INVITE")
    assert [via.branch for via in sent.vias] == [handle.branch, "z9hG4bKuac1"]
    assert sent.headers.get("Max-Forwards") == "69"
    with pytest.raises(ValueError, match="not ours"):
        await endpoint.invite(received, Destination("udp", PEER_HOST, PEER_PORT),
                              replace_top_via=True)


async def test_targets_outside_upstream_allow_are_refused_before_sending(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """invite() and send_request_stateless() keep the SSRF guard for Targets; a Destination
    we heard from is sent to."""
    endpoint, peer = await memory_setup(nursery, upstream_allow=NOWHERE)
    target = Target("udp", PEER_HOST, PEER_PORT)
    with pytest.raises(TransportError, match="not allowed"):
        await endpoint.invite(device_invite(), target)
    ack = uac_request("ACK", branch="z9hG4bKack")
    with pytest.raises(TransportError, match="not allowed"):
        await endpoint.send_request_stateless(ack, target)
    await trio.sleep(1)
    assert peer.pending() == []
    assert await endpoint.send_request_stateless(
        ack, Destination("udp", PEER_HOST, PEER_PORT)) is None
    assert await peer.request("ACK") == ack  # sent as it is


async def test_stateless_sends_carry_requests_and_responses_as_they_are(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """send_request_stateless(add_via=True) puts our Via on a UAC's own ACK;
    send_response_stateless answers a Source per §18.2.2 with no transaction involved."""
    endpoint, peer = await memory_setup(nursery)
    ack = device_invite()
    ack.method = "ACK"
    ack.headers.set("CSeq", "1 ACK")
    await endpoint.send_request_stateless(ack, Destination("udp", PEER_HOST, PEER_PORT),
                                          add_via=True)
    got = await peer.request("ACK")
    assert got.top_via.host == HOST and got.top_via.branch and got.max_forwards == 70
    request = uac_request("OPTIONS", branch="z9hG4bKstateless")
    request.headers.set("Via", str(request.top_via.with_params(rport=str(PEER_PORT))))
    response = make_response(request, 200, to_tag="x")
    await endpoint.send_response_stateless(response, Source("udp", PEER_HOST, PEER_PORT))
    assert await peer.response(200, method="OPTIONS") == response


# --- TCP: a device that connected to us ------------------------------------------------------


class Phone:
    """A softphone on TCP that connected to sipis and registered, like one woken by a push."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.framer = StreamFramer()

    @classmethod
    async def connect(cls, endpoint: SipEndpoint) -> Phone:
        return cls(await trio.open_tcp_stream(HOST, endpoint.bound_port("tcp")))

    async def send(self, message: Message) -> None:
        await self.stream.send_all(message.to_bytes())

    async def receive(self) -> Message:
        with trio.fail_after(5):
            while True:
                event = self.framer.next_event()
                if isinstance(event, bytes):
                    return parse_message(event)
                if event is None:
                    data = await self.stream.receive_some(65536)
                    assert data, "sipis closed the connection"
                    self.framer.feed(bytes(data))

    async def register(self) -> None:
        headers = Headers()
        headers.add("Via", "SIP/2.0/TCP 10.0.0.5:5060;branch=z9hG4bKreg1;rport")
        headers.add("From", "<sip:inst@sipis.test>;tag=ph")
        headers.add("To", "<sip:inst@sipis.test>")
        headers.add("Call-ID", "reg-phone")
        headers.add("CSeq", "1 REGISTER")
        headers.add("Contact", "<sip:phone@10.0.0.5:5060;transport=tcp>")
        await self.send(SipRequest("REGISTER", URI.parse("sip:sipis.test"), headers))
        response = await self.receive()
        assert isinstance(response, SipResponse) and response.status == 200


async def registered_phone(
    nursery: trio.Nursery,
) -> tuple[SipEndpoint, CallHandler, Phone, Destination]:
    """An endpoint that may send to no Target on loopback, and a phone registered over TCP."""
    handler = CallHandler()
    endpoint = await start_endpoint(nursery, handler, upstream_allow=NOWHERE)
    phone = await Phone.connect(endpoint)
    await phone.register()
    source = handler.requests[0][1]
    assert source.flow is not None
    return endpoint, handler, phone, Destination("tcp", source.host, source.port,
                                                 flow=source.flow)


async def test_invite_and_requests_reach_a_phone_over_the_flow_it_opened(
    nursery: trio.Nursery,
) -> None:
    """Over the phone's own TCP connection (its host is not in upstream_allow): the INVITE
    and its 180/200, an in-dialog MESSAGE via request(), and a stateless ACK. Once the phone
    hangs up, nothing reconnects to its ephemeral port: TransportError."""
    endpoint, _, phone, dest = await registered_phone(nursery)
    closed = endpoint.flow_closed_channel()
    with pytest.raises(TransportError, match="not allowed"):
        await endpoint.invite(device_invite(), Target("tcp", dest.host, dest.port))
    handle = await endpoint.invite(device_invite(), dest)
    invite = await phone.receive()
    assert isinstance(invite, SipRequest) and invite.method == "INVITE"
    assert invite.top_via.transport == "TCP" and invite.top_via.branch == handle.branch
    assert invite.top_via.port == endpoint.bound_port("tcp")
    await phone.send(make_response(invite, 180, to_tag="ph"))
    await phone.send(make_response(invite, 200, to_tag="ph"))
    with trio.fail_after(5):
        responses = handle.responses()
        assert (await responses.__anext__()).status == 180
        assert (await responses.__anext__()).status == 200
    assert handle.flow == dest.flow

    message = device_invite()
    message.method = "MESSAGE"
    message.headers.set("CSeq", "2 MESSAGE")
    message.headers.set("To", "<sip:tok@sipis.test>;tag=ph")

    async def answer_message() -> None:
        request = await phone.receive()
        assert isinstance(request, SipRequest) and request.method == "MESSAGE"
        await phone.send(make_response(request, 200))

    nursery.start_soon(answer_message)
    with trio.fail_after(5):
        result = await endpoint.request(message, [dest])
    assert result.response.status == 200 and result.flow == dest.flow and result.target == dest

    ack = device_invite()
    ack.method = "ACK"
    ack.headers.set("CSeq", "1 ACK")
    ack.headers.set("To", "<sip:tok@sipis.test>;tag=ph")
    await endpoint.send_request_stateless(ack, dest, add_via=True)
    got = await phone.receive()
    assert isinstance(got, SipRequest) and got.method == "ACK"

    await phone.stream.aclose()
    with trio.fail_after(5):
        assert await closed.receive() == dest.flow
        later = await endpoint.invite(device_invite(call_id="fwd-2"), dest)
        with pytest.raises(TransportError, match="closed"):
            await collect(later)
        with pytest.raises(TransportError, match="closed"):
            await endpoint.request(message, [dest])


async def test_a_flow_closing_while_the_invite_rings_is_a_transport_error(
    nursery: trio.Nursery,
) -> None:
    """The phone sends 180 and drops the connection: the 180 is delivered, then the
    iteration raises TransportError (the call layer's DeviceUnreachable)."""
    endpoint, _, phone, dest = await registered_phone(nursery)
    handle = await endpoint.invite(device_invite(), dest)
    invite = await phone.receive()
    assert isinstance(invite, SipRequest)
    await phone.send(make_response(invite, 180, to_tag="ph"))
    statuses: list[int] = []
    with trio.fail_after(5):
        await trio.sleep(0.05)
        await phone.stream.aclose()
        with pytest.raises(TransportError):
            async for response in handle.responses():
                statuses.append(response.status)
    assert statuses == [180]
    assert handle.final is None


async def test_the_memory_transport_keeps_to_a_closed_flow_too(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The in-memory pair honours flow_only like the network one, for call-layer tests: a
    request over the peer's TCP flow works until that flow closes, then TransportError."""
    handler = CallHandler()
    ours, theirs = MemoryTransport.pair((HOST, 5060), (PEER_HOST, PEER_PORT))
    endpoint = await start_endpoint(nursery, handler, transport=ours, upstream_allow=NOWHERE)
    peer = await Peer(theirs, ours).start(nursery)
    register = uac_request("REGISTER", transport="TCP")
    await theirs.send(register.to_bytes(), Destination("tcp", HOST, 5060))
    await peer.response(200, method="REGISTER")
    source = handler.requests[0][1]
    dest = Destination("tcp", source.host, source.port, flow=source.flow)
    options = device_invite()
    options.method = "OPTIONS"
    options.headers.set("CSeq", "2 OPTIONS")

    async def answer() -> None:
        request = await peer.request("OPTIONS")
        await theirs.send(make_response(request, 200).to_bytes(), Destination("tcp", HOST, 5060))

    nursery.start_soon(answer)
    assert (await endpoint.request(options, [dest])).response.status == 200
    assert source.flow is not None
    ours.close_flow(source.flow)
    with pytest.raises(TransportError, match="closed"):
        await endpoint.request(options, [dest])
