"""The trio SIP endpoint against tiny UDP/TCP peers written here, on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
import trio
import trio.testing

from sipis.sip.dns import Target
from sipis.sip.endpoint import ClientResult, EndpointConfig, ListenSpec, SipEndpoint, Source
from sipis.sip.errors import TransactionTimeout, TransportError
from sipis.sip.headers import URI, Via
from sipis.sip.message import (
    Headers,
    SipRequest,
    SipResponse,
    StreamFramer,
    make_response,
    parse_message,
)
from sipis.sip.transport import (
    Destination,
    MemoryTransport,
    MessageReceived,
    TransportEvent,
)
from tests.sip.cycles import cyclic_garbage

HOST = "127.0.0.1"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def register(call_id: str = "reg-1", seq: int = 1) -> SipRequest:
    headers = Headers()
    headers.add("From", "<sip:alice@example.test>;tag=from1")
    headers.add("To", "<sip:alice@example.test>")
    headers.add("Call-ID", call_id)
    headers.add("CSeq", f"{seq} REGISTER")
    headers.add("Contact", f"<sip:tok@{HOST}>")
    headers.add("Expires", "600")
    return SipRequest("REGISTER", URI.parse("sip:example.test"), headers)


def raw_request(
    method: str = "OPTIONS", *, call_id: str = "in-1", via_port: int = 5099,
    rport: bool = True, branch: str = "z9hG4bKin1", transport: str = "UDP",
) -> bytes:
    return (
        f"{method} sip:{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {HOST}:{via_port};branch={branch}{';rport' if rport else ''}\r\n"
        "From: <sip:bob@example.test>;tag=b1\r\n"
        f"To: <sip:{HOST}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Handler:
    """Answers 200 (none for ACK); raises for Call-IDs containing "boom"."""

    def __init__(self) -> None:
        self.calls: list[tuple[SipRequest, Source]] = []

    async def handle_request(self, request: SipRequest, source: Source) -> SipResponse | None:
        self.calls.append((request, source))
        if "boom" in request.call_id:
            raise RuntimeError("handler bug")
        if request.method == "ACK":
            return None
        if request.method == "INVITE":
            return make_response(request, 486, to_tag="uas")
        return make_response(request, 200, to_tag="uas")


async def start_endpoint(
    nursery: trio.Nursery, handler: Handler | None = None, *,
    transports: tuple[str, ...] = ("udp", "tcp"), **config: Any,
) -> SipEndpoint:
    config.setdefault("upstream_allow", LOOPBACK)
    transport = config.pop("transport", None)
    endpoint = SipEndpoint(
        EndpointConfig(listen=tuple(ListenSpec(t, HOST, 0) for t in transports),
                       public_host=HOST, **config),
        handler=handler or Handler(), transport=transport)
    await nursery.start(endpoint.run)
    return endpoint


class UdpUas:
    """A tiny UDP UAS: answers each request with 100 then ``status`` unless silent."""

    def __init__(self, sock: trio.socket.SocketType, status: int = 200,
                 silent: bool = False) -> None:
        self.sock = sock
        self.status = status
        self.silent = silent
        self.seen: list[tuple[float, SipRequest]] = []

    @classmethod
    async def start(cls, nursery: trio.Nursery, **kwargs: Any) -> UdpUas:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((HOST, 0))
        uas = cls(sock, **kwargs)
        nursery.start_soon(uas.serve)
        return uas

    @property
    def target(self) -> Target:
        return Target("udp", HOST, self.sock.getsockname()[1])

    async def serve(self) -> None:
        while True:
            data, address = await self.sock.recvfrom(65536)
            request = parse_message(data)
            assert isinstance(request, SipRequest)
            self.seen.append((trio.current_time(), request))
            if self.silent:
                continue
            await self.sock.sendto(make_response(request, 100).to_bytes(), address)
            final = make_response(request, self.status, to_tag="uas")
            await self.sock.sendto(final.to_bytes(), address)


class TcpUas:
    """A tiny TCP UAS: frames requests, answers ``status``; can hang up after answering."""

    def __init__(self, close_after_answer: bool = False) -> None:
        self.close_after_answer = close_after_answer
        self.accepted = 0
        self.seen: list[SipRequest] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> TcpUas:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self.serve, listeners)
        return self

    @property
    def target(self) -> Target:
        return Target("tcp", HOST, self.port)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        framer = StreamFramer()
        async with stream:
            async for chunk in stream:
                framer.feed(bytes(chunk))
                while (event := framer.next_event()) is not None:
                    if not isinstance(event, bytes):
                        continue
                    request = parse_message(event)
                    assert isinstance(request, SipRequest)
                    self.seen.append(request)
                    await stream.send_all(make_response(request, 200, to_tag="t").to_bytes())
                    if self.close_after_answer:
                        return


async def udp_client() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((HOST, 0))
    return sock


async def receive_response(sock: trio.socket.SocketType, timeout: float = 5.0) -> SipResponse:
    with trio.fail_after(timeout):
        data, _ = await sock.recvfrom(65536)
    response = parse_message(data)
    assert isinstance(response, SipResponse)
    return response


def dead_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- client transactions -------------------------------------------------------------------


async def test_a_register_over_udp_gets_its_final_response(nursery: trio.Nursery) -> None:
    """The 100 is absorbed, the 200 returned; our Via names our UDP port, a branch and rport."""
    endpoint = await start_endpoint(nursery)
    uas = await UdpUas.start(nursery)
    request = register()
    with trio.fail_after(5):
        result = await endpoint.request(request, [uas.target])
    assert result.response.status == 200
    assert result.target == uas.target
    assert result.flow is None
    via = uas.seen[0][1].top_via
    assert (via.transport, via.host, via.port) == ("UDP", HOST, endpoint.bound_port("udp"))
    assert via.branch is not None and via.branch.startswith("z9hG4bK")
    assert via.has_rport
    assert uas.seen[0][1].headers.get("Max-Forwards") == "70"
    assert "Via" not in request.headers  # the caller's request is not changed
    assert endpoint.statistics().client_transactions == 0


async def test_tcp_requests_to_one_target_reuse_one_connection(nursery: trio.Nursery) -> None:
    """Three REGISTERs over TCP: one connection, one flow in every result."""
    endpoint = await start_endpoint(nursery)
    uas = await TcpUas().start(nursery)
    flows = set()
    with trio.fail_after(5):
        for seq in (1, 2, 3):
            result = await endpoint.request(register(seq=seq), [uas.target])
            assert result.response.status == 200
            flows.add(result.flow)
    assert uas.accepted == 1
    assert len(flows) == 1 and None not in flows
    assert uas.seen[0].top_via.transport == "TCP"
    assert endpoint.statistics().flows_open == 1


async def test_a_flow_closed_by_the_peer_is_reported_on_the_channel(
    nursery: trio.Nursery,
) -> None:
    """The registrar hanging up the flow we registered over is announced to subscribers."""
    endpoint = await start_endpoint(nursery)
    closed = endpoint.flow_closed_channel()
    uas = await TcpUas(close_after_answer=True).start(nursery)
    with trio.fail_after(5):
        result = await endpoint.request(register(), [uas.target])
        assert await closed.receive() == result.flow


async def test_udp_retransmissions_follow_timer_e_and_time_out_at_f(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Over UDP the request is resent at T1, 2T1, 4T1... capped at T2, until Timer F (64*T1)."""
    endpoint = await start_endpoint(nursery)
    uas = await UdpUas.start(nursery, silent=True)
    start = trio.current_time()
    with pytest.raises(TransactionTimeout):
        await endpoint.request(register(), [uas.target])
    assert trio.current_time() - start == pytest.approx(32.0)
    sent_at = [round(when - start, 3) for when, _ in uas.seen]
    assert sent_at == [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert len({request.top_via.branch for _, request in uas.seen}) == 1


async def test_a_disallowed_destination_raises_before_anything_is_sent(
    nursery: trio.Nursery,
) -> None:
    """Outside upstream_allow (also as an IPv4-mapped IPv6 address): refused, nothing sent."""
    endpoint = await start_endpoint(
        nursery, upstream_allow=(ipaddress.ip_network("192.0.2.0/24"),))
    uas = await UdpUas.start(nursery)
    mapped = Target("udp", f"::ffff:{HOST}", uas.target.port)
    with pytest.raises(TransportError, match="destination not allowed"):
        await endpoint.request(register(), [uas.target, mapped])
    await trio.sleep(0.05)
    assert uas.seen == []
    assert endpoint.statistics().datagrams_sent == 0


async def test_an_icmp_refusal_fails_over_to_the_next_target_at_once(
    nursery: trio.Nursery,
) -> None:
    """First target: a UDP port nobody listens on; the second answers, long before Timer F."""
    endpoint = await start_endpoint(nursery)
    uas = await UdpUas.start(nursery)
    dead = Target("udp", HOST, dead_udp_port())
    with trio.fail_after(3):
        result = await endpoint.request(register(), [dead, uas.target])
    assert result.target == uas.target
    with trio.fail_after(3), pytest.raises(TransportError, match="unreachable"):
        await endpoint.request(register(), [dead])


async def test_a_silent_target_fails_over_to_the_next_after_timer_f(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A first target that never answers costs Timer F; the second one's answer is returned."""
    endpoint = await start_endpoint(nursery)
    silent = await UdpUas.start(nursery, silent=True)
    live = await UdpUas.start(nursery, status=403)
    start = trio.current_time()
    result = await endpoint.request(register(), [silent.target, live.target])
    assert result.response.status == 403
    assert result.target == live.target
    assert trio.current_time() - start == pytest.approx(32.0)
    assert silent.seen[0][1].top_via.branch != live.seen[0][1].top_via.branch


async def test_a_refused_tcp_target_fails_over_to_udp(nursery: trio.Nursery) -> None:
    """Connection refused is a transport error: the next target is tried."""
    endpoint = await start_endpoint(nursery)
    uas = await UdpUas.start(nursery)
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        refused = Target("tcp", HOST, sock.getsockname()[1])
    with trio.fail_after(5):
        result = await endpoint.request(register(), [refused, uas.target])
    assert result.target == uas.target


async def test_a_response_matching_no_transaction_is_dropped(nursery: trio.Nursery) -> None:
    """A stray 200 is counted and dropped; the endpoint keeps working."""
    endpoint = await start_endpoint(nursery)
    client = await udp_client()
    stray = parse_message(raw_request())
    assert isinstance(stray, SipRequest)
    await client.sendto(make_response(stray, 200).to_bytes(), (HOST, endpoint.bound_port("udp")))
    with trio.fail_after(5):
        while endpoint.statistics().responses_unmatched == 0:
            await trio.sleep(0.01)
    await client.sendto(raw_request(call_id="after"), (HOST, endpoint.bound_port("udp")))
    assert (await receive_response(client)).status == 200


async def test_requests_work_over_the_memory_transport(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The same driver runs on the in-memory pair: the peer's final is returned."""
    ours, theirs = MemoryTransport.pair()
    endpoint = await start_endpoint(nursery, transport=ours)
    send, receive = trio.open_memory_channel[TransportEvent](10)
    await nursery.start(theirs.run, send)

    async def answer() -> None:
        async for event in receive:
            assert isinstance(event, MessageReceived)
            assert isinstance(event.message, SipRequest)
            reply = make_response(event.message, 202).to_bytes()
            await theirs.send(reply, Destination("udp", event.source.host, event.source.port))

    nursery.start_soon(answer)
    result = await endpoint.request(register(), [Target("udp", theirs.host, theirs.port)])
    assert result.response.status == 202
    assert endpoint.contact_host_port("udp") == (HOST, ours.port)


async def test_a_cancelled_request_leaves_no_transaction_behind(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The caller gives up before the answer: its transaction is forgotten at once (no
    retransmissions, nothing in the table), and a late answer is dropped."""
    endpoint = await start_endpoint(nursery)
    uas = await UdpUas.start(nursery, silent=True)
    with trio.move_on_after(1.0):
        await endpoint.request(register(), [uas.target])
    assert endpoint.statistics().client_transactions == 0
    sent = len(uas.seen)
    await trio.sleep(10)
    assert len(uas.seen) == sent  # Timer E no longer retransmits it


async def test_start_request_reports_through_done_and_fails_over_without_a_task(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The task-less ``request``: ``done`` hears the final (after a silent first target's
    Timer F, from the second target) once; an abandoned request reports nothing, sends
    nothing more, and leaves no transaction."""
    endpoint = await start_endpoint(nursery)
    silent = await UdpUas.start(nursery, silent=True)
    live = await UdpUas.start(nursery, status=403)
    outcomes: list[object] = []
    endpoint.start_request(register(), [silent.target, live.target], outcomes.append)
    assert outcomes == []  # nothing waits: the caller goes on
    await trio.sleep(40)
    [result] = outcomes
    assert isinstance(result, ClientResult)
    assert result.response.status == 403 and result.target == live.target

    abandoned: list[object] = []
    abandon = endpoint.start_request(register(), [silent.target], abandoned.append)
    await trio.sleep(1)
    abandon()
    sent = len(silent.seen)
    await trio.sleep(40)
    assert abandoned == []
    assert len(silent.seen) == sent
    assert endpoint.statistics().client_transactions == 0


async def test_a_stream_answer_that_overtakes_the_send_still_names_its_flow(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Over TCP the request is written by a task of its own: when the answer is dispatched
    before that write returns, the result still names the flow (the keeper watches it)."""
    ours, theirs = MemoryTransport.pair()
    endpoint = await start_endpoint(nursery, transport=ours)
    flow = ours._flow("tcp", theirs)

    def answer_at_once(dest: Destination, data: bytes) -> None:
        request = parse_message(data)
        assert isinstance(request, SipRequest)
        ours._receive(make_response(request, 200).to_bytes(),
                      Source("tcp", theirs.host, theirs.port, flow))

    ours.on_send = answer_at_once
    result = await endpoint.request(register(), [Target("tcp", theirs.host, theirs.port)])
    assert result.response.status == 200
    assert result.flow == flow


async def test_finished_client_transactions_leave_no_reference_cycles(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A non-INVITE client transaction is freed by reference counting once it is over: the
    daemon runs the cyclic collector rarely, and a cycle per REGISTER made it costly."""
    ours, theirs = MemoryTransport.pair()
    endpoint = await start_endpoint(nursery, transport=ours)
    await start_endpoint(nursery, transport=theirs)
    with cyclic_garbage("sipis.sip.endpoint") as left:
        for n in range(20):
            result = await endpoint.request(register(f"cycle-{n}"),
                                            [Target("udp", theirs.host, theirs.port)])
            assert result.response.status == 200
        await trio.sleep(64)  # every timer of theirs and ours is over
    assert left == []


# --- server transactions -------------------------------------------------------------------


async def test_garbage_over_udp_and_tcp_does_not_stop_options_being_answered(
    nursery: trio.Nursery,
) -> None:
    """Garbage, truncated and broken messages on both transports; OPTIONS still gets 200."""
    endpoint = await start_endpoint(nursery)
    client = await udp_client()
    udp = (HOST, endpoint.bound_port("udp"))
    good = raw_request()
    broken = good.replace(b"Max-Forwards: 70", b"Max-Forwards: x")
    for junk in (b"\xff\xfe\x00garbage", good[:40], broken, b"SIP/2.0 200 OK\r\n\r\n",
                 b"\r\n" * 3000):
        await client.sendto(junk, udp)
    response = await receive_response(client)  # the broken Max-Forwards one: 400
    assert response.status == 400
    await client.sendto(good, udp)
    assert (await receive_response(client)).status == 200

    bad_stream = await trio.open_tcp_stream(HOST, endpoint.bound_port("tcp"))
    await bad_stream.send_all(b"GARBAGE\r\n\r\n" + good[:50])
    with trio.fail_after(5):
        assert await bad_stream.receive_some(1000) == b""  # framing error: closed
    stream = await trio.open_tcp_stream(HOST, endpoint.bound_port("tcp"))
    good = raw_request(transport="TCP", branch="z9hG4bKtcp")
    await stream.send_all(good[: len(good) // 2])
    await trio.sleep(0.01)
    await stream.send_all(good[len(good) // 2:])
    with trio.fail_after(5):
        data = await stream.receive_some(65536)
    assert data.startswith(b"SIP/2.0 200 ")
    assert endpoint.statistics().parse_errors >= 3


async def test_a_burst_of_queued_datagrams_is_answered_in_full(nursery: trio.Nursery) -> None:
    """100 OPTIONS queued at once (read from the socket in batches of 32 per scheduler pass)
    get 100 answers, and the endpoint still answers the next one."""
    endpoint = await start_endpoint(nursery)
    client = await udp_client()
    udp = (HOST, endpoint.bound_port("udp"))
    for n in range(100):
        await client.sendto(raw_request(call_id=f"burst-{n}", branch=f"z9hG4bKburst{n}"), udp)
    answered = {(await receive_response(client)).call_id for _ in range(100)}
    assert answered == {f"burst-{n}" for n in range(100)}
    await client.sendto(raw_request(call_id="after", branch="z9hG4bKafter"), udp)
    assert (await receive_response(client)).call_id == "after"


async def test_responses_go_back_to_the_source_port_with_rport(nursery: trio.Nursery) -> None:
    """With ;rport the answer goes to the packet's source port and names it (RFC 3581)."""
    endpoint = await start_endpoint(nursery)
    client = await udp_client()
    elsewhere = await udp_client()
    elsewhere_port = elsewhere.getsockname()[1]
    await client.sendto(raw_request(via_port=elsewhere_port),
                        (HOST, endpoint.bound_port("udp")))
    response = await receive_response(client)
    via = response.top_via
    assert via.rport == client.getsockname()[1]
    assert via.received == HOST


async def test_without_rport_responses_go_to_the_via_port(nursery: trio.Nursery) -> None:
    """Without rport the answer goes to the source address and the Via sent-by port."""
    endpoint = await start_endpoint(nursery)
    client = await udp_client()
    elsewhere = await udp_client()
    await client.sendto(raw_request(via_port=elsewhere.getsockname()[1], rport=False),
                        (HOST, endpoint.bound_port("udp")))
    response = await receive_response(elsewhere)
    assert response.status == 200
    assert not response.top_via.has_rport


async def test_a_retransmitted_request_is_answered_again_without_the_handler(
    nursery: trio.Nursery,
) -> None:
    """The server transaction absorbs the retransmission and resends its last response."""
    handler = Handler()
    endpoint = await start_endpoint(nursery, handler)
    client = await udp_client()
    udp = (HOST, endpoint.bound_port("udp"))
    await client.sendto(raw_request(), udp)
    first = await receive_response(client)
    await client.sendto(raw_request(), udp)
    second = await receive_response(client)
    assert first == second
    assert len(handler.calls) == 1
    assert endpoint.statistics().server_transactions == 1
    # Answered, it keeps the response's bytes for Timer J but no parsed request: 32 s of
    # them per request rate were most of what the cyclic collector walked under load.
    [record] = endpoint._server.values()
    assert record.request is None


async def test_a_handler_exception_becomes_a_500(nursery: trio.Nursery) -> None:
    """A failing handler is logged and answered 500; the next request is served."""
    handler = Handler()
    endpoint = await start_endpoint(nursery, handler)
    client = await udp_client()
    udp = (HOST, endpoint.bound_port("udp"))
    await client.sendto(raw_request(call_id="boom-1", branch="z9hG4bKb1"), udp)
    assert (await receive_response(client)).status == 500
    await client.sendto(raw_request(call_id="fine", branch="z9hG4bKb2"), udp)
    assert (await receive_response(client)).status == 200
    assert endpoint.statistics().handler_errors == 1


async def test_an_invite_gets_100_then_its_final_which_a_retransmission_repeats(
    nursery: trio.Nursery,
) -> None:
    """INVITE: 100 Trying, the handler's final once, the same final for a retransmission,
    and the ACK for that final is absorbed."""
    handler = Handler()
    endpoint = await start_endpoint(nursery, handler)
    client = await udp_client()
    udp = (HOST, endpoint.bound_port("udp"))
    await client.sendto(raw_request("INVITE"), udp)
    assert (await receive_response(client)).status == 100
    final = await receive_response(client)
    assert final.status == 486
    await client.sendto(raw_request("INVITE"), udp)
    assert await receive_response(client) == final
    await client.sendto(raw_request("ACK"), udp)
    await trio.sleep(0.05)
    assert [request.method for request, _ in handler.calls] == ["INVITE"]


async def test_a_request_over_tcp_is_answered_over_the_same_connection(
    nursery: trio.Nursery,
) -> None:
    """RFC 3261 §18.2.2: the response uses the connection the request came on."""
    handler = Handler()
    endpoint = await start_endpoint(nursery, handler)
    stream = await trio.open_tcp_stream(HOST, endpoint.bound_port("tcp"))
    await stream.send_all(raw_request(transport="TCP", via_port=1))
    with trio.fail_after(5):
        data = await stream.receive_some(65536)
    assert data.startswith(b"SIP/2.0 200 ")
    source = handler.calls[0][1]
    assert source.transport == "tcp" and source.flow is not None
    assert source.port == stream.socket.getsockname()[1]


async def test_contact_host_port_prefers_the_public_port(nursery: trio.Nursery) -> None:
    """A listener's public_port is advertised instead of its bound port."""
    config = EndpointConfig(
        listen=(ListenSpec("udp", HOST, 0, public_port=15060), ListenSpec("tcp", HOST, 0)),
        public_host="sip.example.test", upstream_allow=LOOPBACK)
    endpoint = SipEndpoint(config, handler=Handler())
    await nursery.start(endpoint.run)
    assert endpoint.contact_host_port("udp") == ("sip.example.test", 15060)
    assert endpoint.contact_host_port("tcp") == ("sip.example.test", endpoint.bound_port("tcp"))
    with pytest.raises(LookupError):
        endpoint.bound_port("tls")
    uas = await UdpUas.start(nursery)
    with trio.fail_after(5):
        await endpoint.request(register(), [uas.target])
    assert str(uas.seen[0][1].top_via).startswith("SIP/2.0/UDP sip.example.test:15060;")


async def test_a_port_in_use_makes_run_raise_a_transport_error(nursery: trio.Nursery) -> None:
    """A listener that cannot be bound fails run() with TransportError, before started()."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        config = EndpointConfig(listen=(ListenSpec("udp", HOST, taken.getsockname()[1]),),
                                public_host=HOST)
        endpoint = SipEndpoint(config, handler=Handler())
        with pytest.raises(TransportError, match="cannot bind"):
            await nursery.start(endpoint.run)


async def test_invite_and_ack_are_refused_by_request(nursery: trio.Nursery) -> None:
    """request() runs non-INVITE transactions only."""
    endpoint = await start_endpoint(nursery)
    invite = register()
    invite.method = "INVITE"
    with pytest.raises(ValueError, match="INVITE"):
        await endpoint.request(invite, [Target("udp", HOST, 5060)])


def test_via_helpers_agree_with_the_wire_form() -> None:
    """Sanity of the test's own raw requests: they parse and carry the Via we meant."""
    request = parse_message(raw_request(via_port=7000))
    assert request.top_via == Via.parse(f"SIP/2.0/UDP {HOST}:7000;branch=z9hG4bKin1;rport")

