"""The trio transports: UDP, TCP and TLS on 127.0.0.1, keep-alives, flows, and the memory pair."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from sipis.sip.errors import TransportError
from sipis.sip.message import SipRequest, make_response, parse_message
from sipis.sip.transport import (
    PONG_TIMEOUT,
    Destination,
    FlowClosed,
    ListenSpec,
    MemoryTransport,
    MessageReceived,
    NetworkTransport,
    TransportEvent,
    Unreachable,
    stateless_error_response,
)

HOST = "127.0.0.1"


def options(call_id: str = "c1", branch: str = "z9hG4bKabc", port: int = 5099) -> bytes:
    return (
        f"OPTIONS sip:{HOST} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{port};branch={branch};rport\r\n"
        "From: <sip:alice@example.test>;tag=f1\r\n"
        f"To: <sip:{HOST}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


# A request whose Max-Forwards is broken: parse_message refuses it, yet it can be answered.
BROKEN_BUT_ANSWERABLE = options().replace(b"Max-Forwards: 70", b"Max-Forwards: many")


class Running:
    """A started NetworkTransport and the receiving end of its event channel."""

    def __init__(self, transport: NetworkTransport,
                 events: trio.MemoryReceiveChannel[TransportEvent]) -> None:
        self.transport = transport
        self.events = events

    def port(self, kind: str) -> int:
        address = self.transport.local_address(kind)
        assert address is not None
        return address[1]

    async def next_event(self, timeout: float = 5.0) -> TransportEvent:
        with trio.fail_after(timeout):
            return await self.events.receive()


async def start(
    nursery: trio.Nursery, *kinds: str, cert_files: tuple[Path, Path] | None = None,
    **kwargs: Any,
) -> Running:
    listen = []
    for kind in kinds:
        if kind == "tls":
            assert cert_files is not None
            cert, key = cert_files
            listen.append(ListenSpec("tls", HOST, 0, cert_file=cert, key_file=key))
        else:
            listen.append(ListenSpec(kind, HOST, 0))
    transport = NetworkTransport(listen, **kwargs)
    send, receive = trio.open_memory_channel[TransportEvent](100)
    await nursery.start(transport.run, send)
    return Running(transport, receive)


async def udp_peer() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((HOST, 0))
    return sock


async def recv_some(stream: trio.SocketStream, timeout: float = 5.0) -> bytes:
    with trio.fail_after(timeout):
        return await stream.receive_some(65536)


# --- stateless answers ---------------------------------------------------------------------


def test_a_broken_request_with_the_key_headers_gets_a_stateless_answer() -> None:
    """The answer copies Via, From, To, Call-ID and CSeq, and tags the To."""
    reply = stateless_error_response(BROKEN_BUT_ANSWERABLE, 400)
    assert reply is not None
    response = parse_message(reply)
    assert response.status == 400  # type: ignore[union-attr]
    assert response.call_id == "c1"
    assert response.top_via.branch == "z9hG4bKabc"
    assert response.to.tag is not None


def test_responses_acks_and_headless_garbage_get_no_stateless_answer() -> None:
    """Nothing is sent back for a broken response, an ACK, or bytes without the headers."""
    assert stateless_error_response(b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n", 400) is None
    ack = BROKEN_BUT_ANSWERABLE.replace(b"OPTIONS", b"ACK")
    assert stateless_error_response(ack, 400) is None
    assert stateless_error_response(b"\x00\xff garbage", 400) is None
    no_call_id = b"\r\n".join(
        line for line in BROKEN_BUT_ANSWERABLE.split(b"\r\n") if not line.startswith(b"Call-ID"))
    assert stateless_error_response(no_call_id, 400) is None


# --- UDP -----------------------------------------------------------------------------------


async def test_a_udp_datagram_becomes_a_message_with_its_source(nursery: trio.Nursery) -> None:
    """A valid datagram is reported with the sender's address and no flow."""
    running = await start(nursery, "udp")
    peer = await udp_peer()
    await peer.sendto(options(), (HOST, running.port("udp")))
    event = await running.next_event()
    assert isinstance(event, MessageReceived)
    assert isinstance(event.message, SipRequest)
    assert event.source.transport == "udp"
    assert event.source.port == peer.getsockname()[1]
    assert event.source.flow is None


async def test_garbage_over_udp_is_dropped_or_answered_and_the_loop_goes_on(
    nursery: trio.Nursery,
) -> None:
    """Garbage is dropped, a broken request is answered 400, and a good one still passes."""
    running = await start(nursery, "udp")
    peer = await udp_peer()
    where = (HOST, running.port("udp"))
    for junk in (b"\x00\x01\x02", b"INVITE sip:x SIP/2.0\r\nVia: trunc", b"\r\n\r\n", b""):
        await peer.sendto(junk, where)
    await peer.sendto(BROKEN_BUT_ANSWERABLE, where)
    with trio.fail_after(5):
        data, _ = await peer.recvfrom(65536)
    assert data.startswith(b"SIP/2.0 400 ")
    await peer.sendto(options(call_id="after"), where)
    event = await running.next_event()
    assert isinstance(event, MessageReceived)
    assert event.message.call_id == "after"
    assert running.transport.statistics().parse_errors >= 3


async def test_sending_to_a_udp_port_nobody_listens_on_reports_unreachable(
    nursery: trio.Nursery,
) -> None:
    """ICMP port unreachable for a datagram we sent becomes an Unreachable event."""
    running = await start(nursery, "udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind((HOST, 0))
        dead_port = dead.getsockname()[1]
    await running.transport.send(options(), Destination("udp", HOST, dead_port))
    event = await running.next_event()
    assert event == Unreachable("udp", HOST, dead_port, event.reason)  # type: ignore[union-attr]
    # A pending ICMP error never makes the next, unrelated send fail.
    peer = await udp_peer()
    await running.transport.send(options(), Destination("udp", HOST, dead_port))
    await trio.sleep(0.05)
    await running.transport.send(options(call_id="ok"), Destination("udp", *peer.getsockname()))
    with trio.fail_after(5):
        data, _ = await peer.recvfrom(65536)
    assert b"Call-ID: ok" in data


async def test_udp_to_an_ipv6_address_without_an_ipv6_listener_fails(
    nursery: trio.Nursery,
) -> None:
    """No socket of the right family: TransportError, not a crash."""
    running = await start(nursery, "udp")
    with pytest.raises(TransportError, match="IPv6"):
        await running.transport.send(options(), Destination("udp", "::1", 5060))


# --- TCP -----------------------------------------------------------------------------------


async def test_an_outbound_tcp_connection_is_reused_per_remote(nursery: trio.Nursery) -> None:
    """Two sends to one (transport, host, port) share one connection and one flow."""
    running = await start(nursery, "udp")
    accepted: list[trio.SocketStream] = []
    received = bytearray()
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]

    async def serve(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        async for chunk in stream:
            received.extend(chunk)

    nursery.start_soon(trio.serve_listeners, serve, listeners)
    first = await running.transport.send(options(call_id="1"), Destination("tcp", HOST, port))
    second = await running.transport.send(options(call_id="2"), Destination("tcp", HOST, port))
    assert first is not None and first == second
    with trio.fail_after(5):
        while b"Call-ID: 2" not in received:
            await trio.sleep(0.01)
    assert len(accepted) == 1
    assert running.transport.statistics().flows_open == 1


async def test_a_refused_tcp_connection_is_a_transport_error(nursery: trio.Nursery) -> None:
    """Nothing listening: TransportError naming the destination."""
    running = await start(nursery, "udp")
    with socket.socket() as dead:
        dead.bind((HOST, 0))
        dead_port = dead.getsockname()[1]
    with pytest.raises(TransportError, match="connect to tcp"):
        await running.transport.send(options(), Destination("tcp", HOST, dead_port))


async def test_an_accepted_connection_is_a_flow_and_answers_go_back_over_it(
    nursery: trio.Nursery,
) -> None:
    """A request on an inbound connection carries its flow; sending on that flow reaches
    the same socket even though the Via port is somewhere else."""
    running = await start(nursery, "tcp")
    client = await trio.open_tcp_stream(HOST, running.port("tcp"))
    await client.send_all(options())
    event = await running.next_event()
    assert isinstance(event, MessageReceived)
    flow = event.source.flow
    assert flow is not None and flow.port == client.socket.getsockname()[1]
    await running.transport.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                                 Destination("tcp", HOST, 5099, flow=flow))
    assert (await recv_some(client)).startswith(b"SIP/2.0 200 OK")


async def test_messages_split_across_segments_are_framed_by_content_length(
    nursery: trio.Nursery,
) -> None:
    """Two messages in three writes come out as two events."""
    running = await start(nursery, "tcp")
    client = await trio.open_tcp_stream(HOST, running.port("tcp"))
    data = options(call_id="a") + options(call_id="b")
    for part in (data[:30], data[30:200], data[200:]):
        await client.send_all(part)
        await trio.sleep(0.01)
    ids = []
    for _ in range(2):
        event = await running.next_event()
        assert isinstance(event, MessageReceived)
        ids.append(event.message.call_id)
    assert ids == ["a", "b"]


async def test_a_framing_error_closes_only_that_connection(nursery: trio.Nursery) -> None:
    """A stream message without Content-Length closes its flow; other flows carry on."""
    running = await start(nursery, "tcp")
    good = await trio.open_tcp_stream(HOST, running.port("tcp"))
    bad = await trio.open_tcp_stream(HOST, running.port("tcp"))
    await bad.send_all(options().replace(b"Content-Length: 0\r\n", b""))
    event = await running.next_event()
    assert isinstance(event, FlowClosed)
    assert "framing" in event.reason
    assert await recv_some(bad) == b""
    await good.send_all(options(call_id="still"))
    event = await running.next_event()
    assert isinstance(event, MessageReceived) and event.message.call_id == "still"


async def test_a_broken_request_on_a_stream_is_answered_and_the_flow_stays(
    nursery: trio.Nursery,
) -> None:
    """A well-framed but unparseable request gets a stateless 400 on its connection."""
    running = await start(nursery, "tcp")
    client = await trio.open_tcp_stream(HOST, running.port("tcp"))
    await client.send_all(BROKEN_BUT_ANSWERABLE)
    assert (await recv_some(client)).startswith(b"SIP/2.0 400 ")
    await client.send_all(options(call_id="next"))
    event = await running.next_event()
    assert isinstance(event, MessageReceived) and event.message.call_id == "next"


async def test_a_flow_closed_by_the_peer_is_reported(nursery: trio.Nursery) -> None:
    """The peer hanging up gives one FlowClosed for that flow."""
    running = await start(nursery, "tcp")
    client = await trio.open_tcp_stream(HOST, running.port("tcp"))
    await client.send_all(options())
    event = await running.next_event()
    assert isinstance(event, MessageReceived)
    await client.aclose()
    closed = await running.next_event()
    assert closed == FlowClosed(event.source.flow, "closed by peer")  # type: ignore[arg-type]
    assert running.transport.statistics().flows_open == 0


async def test_a_crlfcrlf_ping_is_answered_with_a_crlf_pong(nursery: trio.Nursery) -> None:
    """RFC 5626 §3.5.1: the server side of a flow answers a ping with CRLF."""
    running = await start(nursery, "tcp")
    client = await trio.open_tcp_stream(HOST, running.port("tcp"))
    await client.send_all(b"\r\n\r\n")
    assert await recv_some(client) == b"\r\n"


async def test_we_ping_flows_we_opened_and_close_them_without_a_pong(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A pong keeps the flow; a missing pong closes it PONG_TIMEOUT after the ping."""
    running = await start(nursery, "udp", keepalive_interval=30.0, tcp_idle_timeout=0)
    pings: list[float] = []
    answer = [True]
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]

    async def serve(stream: trio.SocketStream) -> None:
        async for chunk in stream:
            if chunk == b"\r\n\r\n":
                pings.append(trio.current_time())
                if answer[0]:
                    await stream.send_all(b"\r\n")

    nursery.start_soon(trio.serve_listeners, serve, listeners)
    start_time = trio.current_time()
    flow = await running.transport.send(options(), Destination("tcp", HOST, port))
    await trio.sleep(65)
    assert len(pings) >= 2
    assert 24 <= pings[0] - start_time <= 30  # 80-100 % of the interval
    answer[0] = False
    closed = await running.next_event(timeout=100)
    assert isinstance(closed, FlowClosed) and closed.flow == flow
    assert "pong" in closed.reason
    assert trio.current_time() - pings[-1] == pytest.approx(PONG_TIMEOUT, abs=0.5)


async def test_a_peer_that_never_answers_pings_keeps_its_flow(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A registrar without RFC 5626 support never pongs: we keep pinging, and keep the flow."""
    running = await start(nursery, "udp", keepalive_interval=30.0, tcp_idle_timeout=0)
    pings: list[float] = []
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]

    async def serve(stream: trio.SocketStream) -> None:
        async for chunk in stream:
            if chunk == b"\r\n\r\n":
                pings.append(trio.current_time())

    nursery.start_soon(trio.serve_listeners, serve, listeners)
    await running.transport.send(options(), Destination("tcp", HOST, port))
    await trio.sleep(200)
    assert len(pings) >= 6
    assert running.transport.statistics().flows_open == 1
    assert running.transport.statistics().keepalive_pings_sent == len(pings)


async def test_an_idle_flow_is_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """No SIP message either way for tcp_idle_timeout: the flow is closed and reported."""
    running = await start(nursery, "tcp", tcp_idle_timeout=120.0)
    client = await trio.open_tcp_stream(HOST, running.port("tcp"))
    await client.send_all(options())
    await running.next_event()
    opened = trio.current_time()
    closed = await running.next_event(timeout=500)
    assert isinstance(closed, FlowClosed) and closed.reason == "idle"
    assert trio.current_time() - opened == pytest.approx(120.0, abs=1)


# --- TLS -----------------------------------------------------------------------------------


async def test_tls_flows_carry_messages_both_ways(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Our TLS client verifies our TLS listener's certificate against the test CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("sip.example.test", HOST)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = await start(nursery, "tls", cert_files=(cert_file, key_file))
    client = await start(nursery, "udp", tls_ca_file=ca_file)
    flow = await client.transport.send(
        options(), Destination("tls", HOST, server.port("tls"), server_name="sip.example.test"))
    event = await server.next_event()
    assert isinstance(event, MessageReceived) and event.source.transport == "tls"
    assert event.source.flow is not None
    assert isinstance(event.message, SipRequest)
    await server.transport.send(make_response(event.message, 200).to_bytes(),
                                Destination("tls", HOST, 1, flow=event.source.flow))
    reply = await client.next_event()
    assert isinstance(reply, MessageReceived) and reply.source.flow == flow


async def test_a_tls_server_with_an_unknown_certificate_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Verification on, certificate from another CA: TransportError, nothing delivered."""
    cert = trustme.CA().issue_cert("sip.example.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server = await start(nursery, "tls", cert_files=(cert_file, key_file))
    client = await start(nursery, "udp", tls_ca_file=None)
    with pytest.raises(TransportError, match="connect to tls"):
        await client.transport.send(
            options(), Destination("tls", HOST, server.port("tls"), server_name="sip.example.test"))


# --- memory pair ---------------------------------------------------------------------------


async def test_the_memory_pair_delivers_to_the_peer_with_the_senders_address(
    nursery: trio.Nursery,
) -> None:
    """What one side sends the other receives, from the sender's address; streams get flows."""
    left, right = MemoryTransport.pair()
    send, receive = trio.open_memory_channel[TransportEvent](10)
    await nursery.start(right.run, send)
    await left.send(options(), Destination("udp", right.host, right.port))
    event = receive.receive_nowait()
    assert isinstance(event, MessageReceived)
    assert (event.source.host, event.source.flow) == (left.host, None)
    flow = await left.send(options(), Destination("tcp", right.host, right.port))
    event = receive.receive_nowait()
    assert isinstance(event, MessageReceived) and event.source.flow is not None
    assert flow is not None
    left.close_flow(flow)
    assert isinstance(receive.receive_nowait(), FlowClosed)
    right.unreachable = True
    with pytest.raises(TransportError):
        await left.send(options(), Destination("tcp", right.host, right.port))
