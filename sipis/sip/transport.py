"""trio transports for SIP: UDP datagrams, TCP and TLS connections ("flows"), and an in-memory pair.

Strategy (hypercorn's ``TCPServer``/``UDPServer``): a transport only moves bytes. Whatever it
receives becomes an event on the channel given to ``run``: ``MessageReceived`` (a parsed
request or response and its ``Source``), ``FlowClosed`` (a connection ended, and why) or
``Unreachable`` (ICMP said nothing listens at a UDP destination). ``send(data, Destination)``
is the only way out. Transactions, timers and routing live in ``sipis.sip.endpoint``; the
``Transport`` protocol is the seam, and ``MemoryTransport`` implements it for unit tests.

Rules:

- UDP: each datagram is one message (RFC 3261 §18.3). A datagram that does not parse is
  answered statelessly with the error's ``status_hint`` when it was a request with enough
  headers to build a response (Via, From, To, Call-ID, CSeq), else dropped; the loop never
  dies on bad input. Requests leave from the listening socket, so responses and ``rport``
  (RFC 3581) come back to it. On Linux ``IP_RECVERR`` turns ICMP port-unreachable into an
  ``Unreachable`` event for the destination, so a dead UDP target fails at once instead of at
  Timer F.
- TCP/TLS: one connection per remote (transport, host, port) is kept and reused, whoever
  opened it; an accepted connection is a flow too, and responses to requests received on it
  go back over it (RFC 3261 §18.2.2). Each connection has its own ``StreamFramer``; a framing
  error closes that connection only. A ``Destination`` with ``flow_only`` is sent over its
  flow or not at all: no new connection replaces a closed one.
- Keep-alive (RFC 5626 §3.5.1, §4.4.1): on flows we opened we send CRLFCRLF every
  ``keepalive_interval`` (drawn between 80 % and 100 % of it) and close the flow if no CRLF
  pong comes within ``PONG_TIMEOUT``; a CRLFCRLF ping from the peer is answered with CRLF.
  Only an RFC 5626 edge promises pongs, so a peer that has never answered one of our pings
  is not held to it: the pings still refresh NAT bindings, and its silence is not taken for
  a dead flow (else a registrar without outbound support would lose the flow, and we would
  re-register, every interval).
- A connection with no SIP message either way (or keep-alive ping from the peer) for
  ``tcp_idle_timeout`` is closed. Our own pings do not count: a flow nobody uses goes away.
- Every closure (peer close, error, pong timeout, idle, local close) is reported once, as
  ``FlowClosed``. A ``FlowKey`` names one connection: a reconnection is a new flow.

Socket, ssl and trio errors become ``TransportError`` here; nothing else leaves the module.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import logging
import os
import random
import re
import secrets
import socket
import ssl
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import attrs
import trio

from sipis.sip.errors import SipParseError, TransportError, excerpt
from sipis.sip.message import (
    COMPACT_FORMS,
    KEEPALIVE_PING,
    KEEPALIVE_PONG,
    MAX_MESSAGE_SIZE,
    REASON_PHRASES,
    SipRequest,
    SipResponse,
    StreamFramer,
    parse_message,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "PONG_TIMEOUT",
    "TRANSPORTS",
    "Destination",
    "EventSink",
    "FlowClosed",
    "FlowKey",
    "ListenSpec",
    "MemoryTransport",
    "MessageReceived",
    "NetworkTransport",
    "Source",
    "Transport",
    "TransportEvent",
    "TransportStatistics",
    "Unreachable",
    "stateless_error_response",
]

log = logging.getLogger(__name__)

#: The transports we speak, by their RFC 3263 / URI parameter names.
TRANSPORTS = ("udp", "tcp", "tls")

#: RFC 5626 §4.4.1: a pong must arrive within 10 s of our ping, else the flow has failed.
PONG_TIMEOUT = 10.0

#: Longest wait (s) for a TCP connect plus TLS handshake before the target counts as down.
CONNECT_TIMEOUT = 10.0

#: Longest wait (s) for one write on a connection; a peer that stops reading loses the flow.
SEND_TIMEOUT = 10.0

#: RFC 5626 §4.4.1: each keep-alive interval is drawn between 80 % and 100 % of the nominal.
KEEPALIVE_JITTER = 0.8

#: Accepted connections kept at once; beyond that new ones are closed at once (DoS guard).
MAX_INBOUND_CONNECTIONS = 4096

#: Largest UDP datagram we read (bigger ones are truncated by the kernel and fail to parse).
_DATAGRAM_BUFFER = 65535

#: Datagrams read from one UDP socket per scheduler pass while more are queued.
_UDP_BATCH = 32
_RECEIVE_SIZE = 65536

# Linux IP_RECVERR / IPV6_RECVERR (not exported by the socket module).
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_USE_RECVERR = sys.platform.startswith("linux")
# errno values that a UDP socket reports for an ICMP error about some earlier datagram.
_ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                          errno.EHOSTDOWN, errno.ENONET, errno.EPROTO})


# ---------------------------------------------------------------------------------------------
# values and events


@attrs.frozen
class ListenSpec:
    """One socket to listen on. ``port`` 0 binds an ephemeral port.

    ``public_port`` is what we advertise in Via/Contact when a NAT or port map sits in front;
    ``cert_file``/``key_file`` are required for ``tls``.
    """

    transport: str  # "udp" | "tcp" | "tls"
    host: str
    port: int
    public_port: int | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None


@attrs.frozen
class FlowKey:
    """One connection (RFC 5626 "flow"): transport, remote address, and a serial number."""

    transport: str
    host: str
    port: int
    serial: int


@attrs.frozen
class Source:
    """Where a message came from: the remote address, and the flow for TCP/TLS."""

    transport: str
    host: str
    port: int
    flow: FlowKey | None = None


@attrs.frozen
class Destination:
    """Where to send: a transport and remote address, optionally a preferred flow.

    ``flow``: use that connection if it is still open (responses, RFC 3261 §18.2.2).
    ``server_name``: the name a TLS server certificate must match (RFC 5922).
    ``flow_only``: with ``flow``, that connection or nothing: ``send`` raises
    ``TransportError`` once it has closed instead of connecting anew. A device that
    connected to us is reached over its flow only (RFC 5626 §5.3); its source port is
    ephemeral, and a new connection there would reach nothing, or something else.
    """

    transport: str
    host: str
    port: int
    flow: FlowKey | None = None
    server_name: str | None = None
    flow_only: bool = False


@attrs.frozen
class MessageReceived:
    """A message arrived and parsed."""

    message: SipRequest | SipResponse
    source: Source


@attrs.frozen
class FlowClosed:
    """A TCP/TLS flow ended; ``reason`` is for logs."""

    flow: FlowKey
    reason: str


@attrs.frozen
class Unreachable:
    """ICMP says nothing listens at this UDP destination (RFC 3261 §18.4 transport error)."""

    transport: str
    host: str
    port: int
    reason: str


TransportEvent = MessageReceived | FlowClosed | Unreachable


@dataclasses.dataclass(frozen=True)
class TransportStatistics:
    """Counters of one transport (``statistics()``)."""

    flows_open: int
    datagrams_received: int
    datagrams_sent: int
    stream_messages_received: int
    stream_messages_sent: int
    parse_errors: int
    keepalive_pings_sent: int


class EventSink(Protocol):
    """Where a transport reports its events: a memory channel, or the endpoint's dispatcher
    called in the transport's own task (no queue and no task switch per message)."""

    async def send(self, value: TransportEvent) -> None:
        """Report an event; may wait while the receiver is behind."""

    def send_nowait(self, value: TransportEvent) -> None:
        """Report an event now.

        Raises:
            trio.WouldBlock: the receiver is behind (the event is dropped).
            trio.BrokenResourceError / trio.ClosedResourceError: nobody listens any more.
        """


class Transport(Protocol):
    """What the endpoint needs from a transport (network or in-memory)."""

    async def run(
        self,
        events: EventSink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, call ``task_status.started()``, then move bytes until cancelled."""

    def local_address(self, transport: str) -> tuple[str, int] | None:
        """The bound (host, port) of the first listener of ``transport``, None if none."""

    async def send(self, data: bytes, dest: Destination) -> FlowKey | None:
        """Send one message (or keep-alive); return the flow used (None for UDP).

        Raises:
            TransportError: no socket for it, the connection failed, or the write failed.
        """

    def send_nowait(self, data: bytes, dest: Destination) -> bool:
        """Send a UDP datagram now if the socket takes it at once; False means "use
        ``send``" (a stream destination, or a full socket buffer). Lets a transaction
        driven without a task send its request and retransmissions.

        Raises:
            TransportError: as for ``send``.
        """

    def close_flow(self, flow: FlowKey) -> None:
        """Close a flow now (``FlowClosed`` follows); unknown flows are ignored."""

    def statistics(self) -> TransportStatistics:
        """Current counters."""


class _Counters:
    __slots__ = ("datagrams_received", "datagrams_sent", "keepalive_pings_sent",
                 "parse_errors", "stream_messages_received", "stream_messages_sent")

    def __init__(self) -> None:
        self.datagrams_received = 0
        self.datagrams_sent = 0
        self.stream_messages_received = 0
        self.stream_messages_sent = 0
        self.parse_errors = 0
        self.keepalive_pings_sent = 0

    def snapshot(self, flows_open: int) -> TransportStatistics:
        return TransportStatistics(
            flows_open=flows_open,
            datagrams_received=self.datagrams_received,
            datagrams_sent=self.datagrams_sent,
            stream_messages_received=self.stream_messages_received,
            stream_messages_sent=self.stream_messages_sent,
            parse_errors=self.parse_errors,
            keepalive_pings_sent=self.keepalive_pings_sent,
        )


# ---------------------------------------------------------------------------------------------
# stateless answers to unparseable requests

_TOKEN_BYTES = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")
_SAFE_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_ECHOED = ("via", "from", "to", "call-id", "cseq")
_CANONICAL_ECHOED = {"via": "Via", "from": "From", "to": "To", "call-id": "Call-ID",
                     "cseq": "CSeq"}


def stateless_error_response(data: bytes, status: int) -> bytes | None:
    """Build a ``status`` response to a request that ``parse_message`` refused, if we can.

    RFC 3261 §8.2.6 needs Via, From, To, Call-ID and CSeq copied from the request; when the
    broken message is a response, an ACK, or lacks any of those (or one is not printable),
    there is no answer: None. The To gets a tag if it has none.
    """
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    head = data[start:] if end < 0 else data[start:end]
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) < 2 or not _TOKEN_BYTES.fullmatch(request_line[0]):
        return None
    if request_line[0].upper().startswith(b"SIP/") or request_line[0] == b"ACK":
        return None
    found: dict[str, list[bytes]] = {name: [] for name in _ECHOED}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        key = name.strip(b" \t").decode("latin-1").lower()
        if len(key) == 1:
            key = COMPACT_FORMS.get(key, key).lower()
        if key in found:
            value = value.strip(b" \t")
            if not value or not _SAFE_VALUE.fullmatch(value):
                return None
            found[key].append(value)
    if not found["via"] or any(len(found[name]) != 1 for name in _ECHOED[1:]):
        return None
    reason = REASON_PHRASES.get(status, "Error").encode("ascii")
    out = [b"SIP/2.0 %d %s" % (status, reason)]
    out.extend(b"Via: " + via for via in found["via"])
    to = found["to"][0]
    if b";tag=" not in to.lower().replace(b" ", b""):
        to += b";tag=" + secrets.token_hex(8).encode("ascii")
    out.append(b"From: " + found["from"][0])
    out.append(b"To: " + to)
    out.append(b"Call-ID: " + found["call-id"][0])
    out.append(b"CSeq: " + found["cseq"][0])
    out.append(b"Content-Length: 0")
    return b"\r\n".join(out) + b"\r\n\r\n"


def _is_blank(data: bytes) -> bool:
    return not data.strip(b"\r\n")


@functools.lru_cache(maxsize=1024)
def _normal_host(host: str) -> str:
    """IP text in its compressed form (``::ffff:1.2.3.4`` → ``1.2.3.4`` too).

    Cached: called for every datagram, and ``ipaddress`` parsing costs ~10 µs each time.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@functools.lru_cache(maxsize=1024)
def _family(host: str) -> int:
    """Address family of an IP literal (cached: asked for every datagram sent)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise TransportError(f"destination {excerpt(host)} is not an IP address") from None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


# ---------------------------------------------------------------------------------------------
# the network transport


class _UdpSocket:
    __slots__ = ("family", "local", "raw", "sock")

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.family = raw.family
        name = raw.getsockname()
        self.local: tuple[str, int] = (_normal_host(name[0]), name[1])


class _Connection:
    """One TCP/TLS flow and its state."""

    def __init__(
        self, key: FlowKey, stream: trio.abc.Stream, *, outbound: bool, now: float,
        max_message_size: int,
    ) -> None:
        self.key = key
        self.stream = stream
        self.outbound = outbound
        self.framer = StreamFramer(max_message_size)
        self.send_lock = trio.StrictFIFOLock()
        self.last_activity = now
        self.next_ping: float | None = None
        self.pong_deadline: float | None = None
        self.pong_seen = False  # the peer has answered a ping: it speaks RFC 5626
        self.scope = trio.CancelScope()
        self.close_reason: str | None = None
        self.closed = False

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.scope.cancel()


class NetworkTransport:
    """UDP, TCP and TLS over real sockets (see the module rules).

    Args:
        listen: the sockets to bind in ``run``.
        keepalive_interval: seconds between our CRLFCRLF pings on flows we opened; 0 = off.
        tcp_idle_timeout: close a flow with no SIP traffic for this long; 0 = never.
        max_message_size: larger messages are refused (413 when it was a request).
        tls_ca_file: CA bundle for verifying TLS servers (None: the system store).
        tls_verify: verify TLS server certificates and names.
    """

    def __init__(
        self,
        listen: Iterable[ListenSpec],
        *,
        keepalive_interval: float = 90.0,
        tcp_idle_timeout: float = 3600.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
        tls_ca_file: str | Path | None = None,
        tls_verify: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.listen = tuple(listen)
        for spec in self.listen:
            if spec.transport not in TRANSPORTS:
                raise ValueError(f"unknown transport {spec.transport!r}")
        self.keepalive_interval = keepalive_interval
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_message_size = max_message_size
        self.tls_ca_file = tls_ca_file
        self.tls_verify = tls_verify
        # Jitter of keep-alive intervals: spreading load, not security.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311
        self._events: EventSink | None = None
        self._nursery: trio.Nursery | None = None
        self._udp: list[_UdpSocket] = []
        self._listening: dict[str, tuple[str, int]] = {}
        self._connections: dict[FlowKey, _Connection] = {}
        self._by_remote: dict[tuple[str, str, int], _Connection] = {}
        self._connect_locks: dict[tuple[str, str, int], trio.Lock] = {}
        self._serial = 0
        self._inbound = 0
        self._client_tls: ssl.SSLContext | None = None
        self._counters = _Counters()

    # -- the Transport protocol --

    def local_address(self, transport: str) -> tuple[str, int] | None:
        """The bound (host, port) of the first ``transport`` listener; None before ``run``."""
        return self._listening.get(transport)

    def statistics(self) -> TransportStatistics:
        """Current counters."""
        return self._counters.snapshot(len(self._connections))

    async def run(
        self,
        events: EventSink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind every listener, report started, and serve until cancelled.

        Raises:
            TransportError: a listener cannot be bound or its TLS files cannot be loaded.
        """
        self._events = events
        udp_sockets: list[_UdpSocket] = []
        stream_listeners: list[tuple[str, list[trio.SocketListener], ssl.SSLContext | None]] = []
        try:
            # Bind everything before the nursery opens, so a bind error surfaces as itself.
            for spec in self.listen:
                if spec.transport == "udp":
                    udp_sockets.append(await self._bind_udp(spec))
                else:
                    context = self._server_tls(spec) if spec.transport == "tls" else None
                    listeners = await self._bind_stream(spec)
                    stream_listeners.append((spec.transport, listeners, context))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for udp in udp_sockets:
                    nursery.start_soon(self._udp_loop, udp)
                for transport, listeners, context in stream_listeners:
                    nursery.start_soon(self._accept_loop, transport, listeners, context)
                task_status.started()
        finally:
            self._nursery = None
            for udp in self._udp:
                udp.sock.close()
            self._udp.clear()
            for _, listeners, _ in stream_listeners:
                for listener in listeners:
                    listener.socket.close()
            self._listening.clear()

    async def send(self, data: bytes, dest: Destination) -> FlowKey | None:
        """Send ``data``; see ``Transport.send``."""
        if dest.transport == "udp":
            await self._send_udp(data, dest.host, dest.port)
            return None
        if dest.transport not in ("tcp", "tls"):
            raise TransportError(f"unsupported transport {excerpt(dest.transport)}")
        conn = self._connections.get(dest.flow) if dest.flow is not None else None
        if conn is None or conn.closed:
            if dest.flow_only and dest.flow is not None:
                raise TransportError(f"flow to {dest.host}:{dest.port} is closed",
                                     flow=dest.flow)
            conn = await self._connection_to(dest)
        await self._send_stream(conn, data)
        return conn.key

    def close_flow(self, flow: FlowKey) -> None:
        """Close the flow; ``FlowClosed`` follows."""
        conn = self._connections.get(flow)
        if conn is not None:
            conn.close("closed locally")

    # -- UDP --

    async def _bind_udp(self, spec: ListenSpec) -> _UdpSocket:
        family, address = await self._bind_address(spec, socket.SOCK_DGRAM)
        raw = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if _USE_RECVERR:
                if family == socket.AF_INET6:
                    raw.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
                else:
                    raw.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            raw.bind(address)
        except OSError as exc:
            raw.close()
            raise TransportError(
                f"cannot bind udp {spec.host}:{spec.port}: {exc.strerror}") from exc
        udp = _UdpSocket(raw)
        self._udp.append(udp)
        self._listening.setdefault("udp", udp.local)
        return udp

    @staticmethod
    async def _bind_address(spec: ListenSpec, kind: int) -> tuple[int, tuple[str, int]]:
        try:
            infos = await trio.socket.getaddrinfo(
                spec.host, spec.port, type=kind, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise TransportError(f"cannot use listen address {excerpt(spec.host)}") from exc
        family, _, _, _, sockaddr = infos[0]
        return family, (str(sockaddr[0]), int(sockaddr[1]))

    async def _udp_loop(self, udp: _UdpSocket) -> None:
        # Datagrams already queued are read straight from the raw socket, up to
        # _UDP_BATCH of them per scheduler pass: trio's ``recvfrom`` costs a pass per
        # datagram, a large share of a registration's CPU under load.
        batch = 0
        while True:
            try:
                data, address = udp.raw.recvfrom(_DATAGRAM_BUFFER)
            except BlockingIOError:
                batch = 0
                await trio.lowlevel.wait_readable(udp.raw)
                continue
            except OSError as exc:
                if exc.errno in _ICMP_ERRNOS:
                    self._drain_icmp(udp)
                    continue
                log.warning("udp %s:%d receive failed: %s", *udp.local, exc)
                await trio.sleep(0.1)  # do not spin on a persistent error
                continue
            batch += 1
            if batch >= _UDP_BATCH:
                batch = 0
                await trio.lowlevel.checkpoint()
            self._counters.datagrams_received += 1
            try:
                await self._datagram(udp, data, address)
            except Exception:  # bad input must never stop the loop
                log.exception("udp datagram from %s could not be handled", address[0])

    async def _datagram(self, udp: _UdpSocket, data: bytes, address: tuple[str, int]) -> None:
        if _is_blank(data):
            return  # a CRLF keep-alive over UDP: nothing to answer
        host, port = _normal_host(str(address[0])), int(address[1])
        try:
            message = parse_message(data, max_size=self.max_message_size)
        except SipParseError as exc:
            self._counters.parse_errors += 1
            log.info("udp from %s:%d: unparseable message: %s", host, port, exc)
            reply = stateless_error_response(data, exc.status_hint)
            if reply is not None:
                try:
                    await self._sendto(udp, reply, (host, port))
                except TransportError as send_exc:
                    log.info("udp %s:%d: could not answer: %s", host, port, send_exc)
            return
        await self._emit(MessageReceived(message, Source("udp", host, port, None)))

    def _udp_for(self, host: str) -> _UdpSocket:
        family = _family(host)
        for udp in self._udp:
            if udp.family == family:
                return udp
        kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
        raise TransportError(f"no {kind} udp listener to send from")

    async def _send_udp(self, data: bytes, host: str, port: int) -> None:
        await self._sendto(self._udp_for(host), data, (host, port))

    async def _sendto(self, udp: _UdpSocket, data: bytes, address: tuple[str, int]) -> None:
        # The address is always an IP literal here (``_family`` checked it): send on the raw
        # socket, with trio's checkpoints around it, instead of trio's ``sendto``, which
        # resolves the address through getaddrinfo on every datagram. Only a full socket
        # buffer waits, through trio.
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._try_sendto(udp, data, address):
            try:
                await udp.sock.sendto(data, address)
            except OSError as exc:
                raise TransportError(
                    f"udp send to {address[0]}:{address[1]} failed: {exc.strerror}") from exc
            self._counters.datagrams_sent += 1
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _try_sendto(self, udp: _UdpSocket, data: bytes, address: tuple[str, int]) -> bool:
        """Send on the raw socket; False if its buffer is full (nothing sent)."""
        for attempt in range(3):
            try:
                udp.raw.sendto(data, address)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in _ICMP_ERRNOS and attempt < 2:
                    # IP_RECVERR: the kernel reports an ICMP error about an *earlier*
                    # datagram on the next call; collect it and send this one again.
                    self._drain_icmp(udp)
                    continue
                raise TransportError(
                    f"udp send to {address[0]}:{address[1]} failed: {exc.strerror}") from exc
            self._counters.datagrams_sent += 1
            return True
        return False  # not reached: the third attempt returns or raises

    def send_nowait(self, data: bytes, dest: Destination) -> bool:
        """See ``Transport.send_nowait``."""
        if dest.transport != "udp":
            return False
        return self._try_sendto(self._udp_for(dest.host), data, (dest.host, dest.port))

    def _drain_icmp(self, udp: _UdpSocket) -> None:
        """Read the socket's error queue and report each unreachable destination."""
        if not _USE_RECVERR:
            return
        while True:
            try:
                _, ancdata, _, address = udp.raw.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
            except OSError:  # BlockingIOError when empty
                return
            code = errno.EHOSTUNREACH
            for level, kind, payload in ancdata:
                if (level, kind) in ((socket.IPPROTO_IP, _IP_RECVERR),
                                     (socket.IPPROTO_IPV6, _IPV6_RECVERR)) and len(payload) >= 4:
                    code = struct.unpack("=I", payload[:4])[0]
            if not isinstance(address, tuple) or len(address) < 2:
                continue
            host, port = _normal_host(str(address[0])), int(address[1])
            log.info("udp %s:%d unreachable: %s", host, port, os.strerror(code))
            self._emit_nowait(Unreachable("udp", host, port, os.strerror(code)))

    # -- events --

    async def _emit(self, event: TransportEvent) -> None:
        assert self._events is not None
        # Not contextlib.suppress: this runs for every message received.
        try:  # noqa: SIM105
            await self._events.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # only while the endpoint shuts down

    def _emit_nowait(self, event: TransportEvent) -> None:
        if self._events is None:
            return
        try:
            self._events.send_nowait(event)
        except trio.WouldBlock:
            log.warning("event queue full, dropped %s", type(event).__name__)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- TCP/TLS --

    async def _bind_stream(self, spec: ListenSpec) -> list[trio.SocketListener]:
        try:
            listeners = await trio.open_tcp_listeners(spec.port, host=spec.host)
        except OSError as exc:
            raise TransportError(
                f"cannot listen on {spec.transport} {spec.host}:{spec.port}: {exc.strerror}"
            ) from exc
        name = listeners[0].socket.getsockname()
        self._listening.setdefault(spec.transport, (_normal_host(name[0]), int(name[1])))
        return listeners

    def _server_tls(self, spec: ListenSpec) -> ssl.SSLContext:
        if spec.cert_file is None or spec.key_file is None:
            raise TransportError(f"tls listener {spec.host}:{spec.port} needs cert and key files")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(str(spec.cert_file), str(spec.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot load the TLS certificate {spec.cert_file}") from exc
        return context

    def _client_tls_context(self) -> ssl.SSLContext:
        if self._client_tls is None:
            try:
                context = ssl.create_default_context(
                    cafile=str(self.tls_ca_file) if self.tls_ca_file is not None else None)
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"cannot load the TLS CA file {self.tls_ca_file}") from exc
            if not self.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._client_tls = context
        return self._client_tls

    async def _accept_loop(
        self, transport: str, listeners: list[trio.SocketListener],
        context: ssl.SSLContext | None,
    ) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            try:
                await self._serve_accepted(transport, stream, context)
            except Exception:  # one bad connection must not stop the listener
                log.exception("accepted %s connection failed", transport)
                await trio.aclose_forcefully(stream)

        assert self._nursery is not None
        await trio.serve_listeners(handle, listeners, handler_nursery=self._nursery)

    async def _serve_accepted(
        self, transport: str, stream: trio.SocketStream, context: ssl.SSLContext | None
    ) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        host, port = _normal_host(str(peer[0])), int(peer[1])
        if self._inbound >= MAX_INBOUND_CONNECTIONS:
            log.warning("too many connections; refusing %s %s:%d", transport, host, port)
            await trio.aclose_forcefully(stream)
            return
        wrapped: trio.abc.Stream = stream
        if context is not None:
            ssl_stream = trio.SSLStream(stream, context, server_side=True)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await ssl_stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                log.info("tls handshake with %s:%d failed: %s", host, port, exc)
                await trio.aclose_forcefully(ssl_stream)
                return
            wrapped = ssl_stream
        conn = self._register(transport, host, port, wrapped, outbound=False)
        self._inbound += 1
        try:
            await self._serve_connection(conn)
        finally:
            self._inbound -= 1

    def _register(
        self, transport: str, host: str, port: int, stream: trio.abc.Stream, *, outbound: bool
    ) -> _Connection:
        self._serial += 1
        key = FlowKey(transport, host, port, self._serial)
        conn = _Connection(key, stream, outbound=outbound, now=trio.current_time(),
                           max_message_size=self.max_message_size)
        if outbound and self.keepalive_interval > 0:
            conn.next_ping = conn.last_activity + self._keepalive_delay()
        self._connections[key] = conn
        remote = (transport, host, port)
        current = self._by_remote.get(remote)
        if current is None or current.closed:
            self._by_remote[remote] = conn
        log.debug("flow %s:%s:%d #%d open (%s)", transport, host, port, key.serial,
                  "outbound" if outbound else "inbound")
        return conn

    def _keepalive_delay(self) -> float:
        return self.keepalive_interval * self._rng.uniform(KEEPALIVE_JITTER, 1.0)

    async def _connection_to(self, dest: Destination) -> _Connection:
        remote = (dest.transport, _normal_host(dest.host), dest.port)
        conn = self._by_remote.get(remote)
        if conn is not None and not conn.closed:
            return conn
        if self._nursery is None:
            raise TransportError("transport is not running")
        lock = self._connect_locks.setdefault(remote, trio.Lock())
        try:
            async with lock:
                conn = self._by_remote.get(remote)
                if conn is not None and not conn.closed:
                    return conn
                stream = await self._connect(dest)
                conn = self._register(dest.transport, remote[1], dest.port, stream,
                                      outbound=True)
                self._nursery.start_soon(self._serve_connection, conn)
                return conn
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._connect_locks.pop(remote, None)

    async def _connect(self, dest: Destination) -> trio.abc.Stream:
        where = f"{dest.transport} {dest.host}:{dest.port}"
        _family(dest.host)  # an IP literal, never a name to look up here
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(dest.host, dest.port)
                stream = tcp
                if dest.transport == "tls":
                    stream = trio.SSLStream(
                        tcp, self._client_tls_context(),
                        server_hostname=dest.server_name or dest.host)
                    await stream.do_handshake()
        except trio.TooSlowError as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise TransportError(f"connect to {where} timed out") from exc
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            raise TransportError(f"connect to {where} failed: {cause}") from exc
        return stream

    async def _send_stream(self, conn: _Connection, data: bytes) -> None:
        if conn.closed:
            raise TransportError(f"flow to {conn.key.host}:{conn.key.port} is closed",
                                 flow=conn.key)
        try:
            with trio.fail_after(SEND_TIMEOUT):
                async with conn.send_lock:
                    await conn.stream.send_all(data)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            conn.close(f"send failed: {type(exc).__name__}")
            raise TransportError(
                f"send on flow to {conn.key.host}:{conn.key.port} failed", flow=conn.key
            ) from exc
        if not _is_blank(data):
            self._counters.stream_messages_sent += 1
            conn.last_activity = trio.current_time()

    async def _serve_connection(self, conn: _Connection) -> None:
        """Read, frame and report one connection until it ends; then report the closure."""
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watchdog, conn)
                    reason = await self._read_loop(conn)
                    if conn.close_reason is None:
                        conn.close_reason = reason
                    nursery.cancel_scope.cancel()
        except Exception:  # a bug here must cost one connection, not the transport
            log.exception("flow %s:%d failed", conn.key.host, conn.key.port)
            conn.close_reason = conn.close_reason or "internal error"
        finally:
            conn.closed = True
            self._connections.pop(conn.key, None)
            remote = (conn.key.transport, conn.key.host, conn.key.port)
            if self._by_remote.get(remote) is conn:
                del self._by_remote[remote]
            await trio.aclose_forcefully(conn.stream)
            reason = conn.close_reason or "closed"
            log.debug("flow %s:%s:%d #%d closed: %s", conn.key.transport, conn.key.host,
                      conn.key.port, conn.key.serial, reason)
            self._emit_nowait(FlowClosed(conn.key, reason))

    async def _read_loop(self, conn: _Connection) -> str:
        """Read until the connection ends; return why it ended."""
        key = conn.key
        while True:
            try:
                data = await conn.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                return f"receive failed: {cause or type(exc).__name__}"
            if not data:
                return "closed by peer"
            conn.framer.feed(bytes(data))
            while True:
                try:
                    event = conn.framer.next_event()
                except SipParseError as exc:
                    self._counters.parse_errors += 1
                    log.info("flow %s:%d: framing error, closing: %s", key.host, key.port, exc)
                    return f"framing error: {exc}"
                if event is None:
                    break
                try:
                    if event is KEEPALIVE_PING:
                        conn.last_activity = trio.current_time()
                        await self._send_stream(conn, b"\r\n")
                    elif event is KEEPALIVE_PONG:
                        conn.pong_deadline = None
                        conn.pong_seen = True
                    elif isinstance(event, bytes):
                        await self._stream_message(conn, event)
                except TransportError:
                    return conn.close_reason or "send failed"

    async def _stream_message(self, conn: _Connection, data: bytes) -> None:
        key = conn.key
        self._counters.stream_messages_received += 1
        conn.last_activity = trio.current_time()
        try:
            message = parse_message(data, max_size=self.max_message_size)
        except SipParseError as exc:
            self._counters.parse_errors += 1
            log.info("flow %s:%d: unparseable message: %s", key.host, key.port, exc)
            reply = stateless_error_response(data, exc.status_hint)
            if reply is not None:
                await self._send_stream(conn, reply)
            return
        await self._emit(MessageReceived(message, Source(key.transport, key.host, key.port, key)))

    async def _watchdog(self, conn: _Connection) -> None:
        """Idle timeout, our keep-alive pings, and the pong deadline of each."""
        while True:
            deadlines = []
            if self.tcp_idle_timeout > 0:
                deadlines.append(conn.last_activity + self.tcp_idle_timeout)
            if conn.pong_deadline is not None:
                deadlines.append(conn.pong_deadline)
            elif conn.next_ping is not None:
                deadlines.append(conn.next_ping)
            if not deadlines:
                await trio.sleep_forever()
            await trio.sleep_until(min(deadlines))
            now = trio.current_time()
            if conn.pong_deadline is not None and now >= conn.pong_deadline:
                if conn.pong_seen:
                    conn.close(f"no keep-alive pong within {PONG_TIMEOUT:g} s")
                    return
                conn.pong_deadline = None  # never answered a ping: not held to it
            if self.tcp_idle_timeout > 0 and now >= conn.last_activity + self.tcp_idle_timeout:
                conn.close("idle")
                return
            if conn.pong_deadline is None and conn.next_ping is not None and now >= conn.next_ping:
                try:
                    await self._send_stream(conn, b"\r\n\r\n")
                except TransportError:
                    return  # the connection is closing already
                self._counters.keepalive_pings_sent += 1
                conn.pong_deadline = now + PONG_TIMEOUT
                conn.next_ping = now + self._keepalive_delay()


# ---------------------------------------------------------------------------------------------
# in-memory transport for tests


class MemoryTransport:
    """An in-memory ``Transport``: what one side sends, its peer receives (``pair``).

    Addressing is loose on purpose: any destination reaches the peer, unless the peer is
    marked ``unreachable`` (UDP then reports ``Unreachable`` to the sender, TCP/TLS raises
    ``TransportError``) or ``silent`` (everything is swallowed, like a dead host). Each send
    is one whole message; stream flows are simulated, one per pair and transport.
    ``sent`` records every ``(Destination, data)`` sent, for assertions.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 5060, *,
                 max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.peer: MemoryTransport | None = None
        self.unreachable = False
        self.silent = False
        self.sent: list[tuple[Destination, bytes]] = []
        self.on_send: Callable[[Destination, bytes], None] | None = None
        self._events: EventSink | None = None
        self._flows: dict[str, FlowKey] = {}  # transport -> our end of the flow to the peer
        self._serial = 0
        self._counters = _Counters()

    @classmethod
    def pair(
        cls, a: tuple[str, int] = ("127.0.0.1", 5060), b: tuple[str, int] = ("127.0.0.2", 5060)
    ) -> tuple[MemoryTransport, MemoryTransport]:
        """Two transports wired to each other."""
        left, right = cls(*a), cls(*b)
        left.peer, right.peer = right, left
        return left, right

    def local_address(self, transport: str) -> tuple[str, int] | None:
        return (self.host, self.port) if transport in TRANSPORTS else None

    def statistics(self) -> TransportStatistics:
        return self._counters.snapshot(len(self._flows))

    async def run(
        self,
        events: EventSink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._events = events
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._events = None

    async def send(self, data: bytes, dest: Destination) -> FlowKey | None:
        await trio.lowlevel.checkpoint()
        return self._send(data, dest)

    def send_nowait(self, data: bytes, dest: Destination) -> bool:
        if dest.transport != "udp":
            return False
        self._send(data, dest)
        return True

    def _send(self, data: bytes, dest: Destination) -> FlowKey | None:
        self.sent.append((dest, data))
        if self.on_send is not None:
            self.on_send(dest, data)
        peer = self.peer
        if dest.transport == "udp":
            self._counters.datagrams_sent += 1
            if peer is None or peer.silent:
                return None
            if peer.unreachable:
                self._deliver_event(Unreachable("udp", dest.host, dest.port, "unreachable"))
                return None
            peer._receive(data, Source("udp", self.host, self.port, None))
            return None
        if (dest.flow_only and dest.flow is not None
                and self._flows.get(dest.transport) != dest.flow):
            raise TransportError(f"flow to {dest.host}:{dest.port} is closed", flow=dest.flow)
        if peer is None or peer.unreachable:
            raise TransportError(f"connect to {dest.transport} {dest.host}:{dest.port} refused")
        flow = self._flow(dest.transport, peer)
        self._counters.stream_messages_sent += 1
        if not peer.silent:
            peer._receive(data, Source(dest.transport, self.host, self.port,
                                       peer._flow(dest.transport, self)))
        return flow

    def close_flow(self, flow: FlowKey) -> None:
        for transport, key in list(self._flows.items()):
            if key == flow:
                self._drop_flow(transport, "closed locally")
                if self.peer is not None:
                    self.peer._drop_flow(transport, "closed by peer")

    def _flow(self, transport: str, other: MemoryTransport) -> FlowKey:
        key = self._flows.get(transport)
        if key is None:
            self._serial += 1
            key = self._flows[transport] = FlowKey(transport, other.host, other.port,
                                                  self._serial)
        return key

    def _drop_flow(self, transport: str, reason: str) -> None:
        key = self._flows.pop(transport, None)
        if key is not None:
            self._deliver_event(FlowClosed(key, reason))

    def _deliver_event(self, event: TransportEvent) -> None:
        if self._events is None:
            return
        try:
            self._events.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.warning("memory transport dropped %s", type(event).__name__)

    def _receive(self, data: bytes, source: Source) -> None:
        if source.transport == "udp":
            self._counters.datagrams_received += 1
        else:
            self._counters.stream_messages_received += 1
        if _is_blank(data):
            if data == b"\r\n\r\n" and source.flow is not None and self.peer is not None:
                self.peer._receive(b"\r\n", Source(source.transport, self.host, self.port,
                                                   self.peer._flows.get(source.transport)))
            return
        try:
            message = parse_message(data, max_size=self.max_message_size)
        except SipParseError as exc:
            self._counters.parse_errors += 1
            reply = stateless_error_response(data, exc.status_hint)
            if reply is not None and self.peer is not None:
                self.sent.append((Destination(source.transport, source.host, source.port,
                                              source.flow), reply))
                self.peer._receive(reply, Source(source.transport, self.host, self.port,
                                                 self.peer._flows.get(source.transport)))
            return
        self._deliver_event(MessageReceived(message, source))
