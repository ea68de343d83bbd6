"""The trio SIP driver: client and server transactions over a ``Transport``, requests to a handler.

Strategy: the transaction machines (``sipis.sip.transaction``) decide; this module carries out
their actions on trio's clock. A non-INVITE client transaction runs without a task of its own
(``_NonInviteClient``): it sends at once over UDP, is fed its responses by the receive path and
its timers by the timer loop, and wakes its caller once, with the final response or the error
(a task, a channel and a cancel scope per transaction cost more than the transaction itself
at thousands of REGISTERs a second). A client INVITE outlives its caller's interest (Timer D
ACKs retransmitted finals, Timer M relays 2xx retransmissions), so it runs in a task of this
endpoint's nursery and talks to its caller through a ``ClientInviteHandle``. Server
transactions live in a table; the timers of server and task-less client transactions sit in
one heap (one entry per transaction) served by one task. Every transport event is dispatched
at once, in the transport's own task (``_Dispatcher``); anything that waits (a handler, a
stream send) runs in a task of this endpoint's own nursery.

Rules — sending:

- ``request`` adds our top Via (``branch`` fresh per attempt, ``rport``, RFC 3581) and tries
  the targets in order (RFC 3263 §4.3): Timer F or a transport error moves on to the next
  one. ``invite`` does the same for one destination, without failover.
- Where we may send (our SSRF guard): a ``Target`` (from DNS or a URI, that is from an app or
  a provider) only inside ``upstream_allow``; outside it is never contacted, and if nothing is
  left ``TransportError("destination not allowed")`` is raised before anything is sent. A
  transport ``Destination`` is an address we *heard from* (a device binding's source, a
  server transaction's source): callers never build one from a URI. Sent to as given; with a
  ``flow``, over that flow only (``flow_only``): a device that connected to us is reached
  over its connection or not at all (RFC 5626 §5.3).
- ``replace_top_via=True``: the request was built by ``sipis.sip.proxy.forward_request`` and
  carries a Via of ours on top; it is replaced by the endpoint's (fresh branch, the
  destination's transport), so that the handle or result names the branch really used.
- Responses match a client transaction by top Via branch and CSeq method (RFC 3261
  §17.1.3). A response matching no transaction is dropped (this also absorbs non-INVITE
  final retransmissions, Timer K's only job).
- Client INVITE (``invite``): the ACK for a 300–699 is sent by the transaction (built by
  ``proxy.make_ack_for_non2xx``); every response it delivers — each 2xx retransmission in
  ACCEPTED too — reaches ``ClientInviteHandle.responses()``; Timer B, a transport error or a
  closed flow before any final ends that iteration with ``TransactionTimeout`` /
  ``TransportError``. ``cancel()`` sends a CANCEL (``proxy.make_cancel``, its own non-INVITE
  client transaction, same destination and flow) once a provisional is in (§9.1), never after
  a final. A transaction still without a final 64·T1 after its CANCEL (or
  ``INVITE_PENDING_LIFETIME`` after it started) is given up as ``TransactionTimeout``.

Rules — receiving:

- An incoming request gets ``received``/``rport`` on its top Via (RFC 3261 §18.2.1, RFC
  3581), then a server transaction keyed by (branch, sent-by, method) (§17.2.3).
  Retransmissions are absorbed by it (or answered with the last response). The handler runs
  once per transaction; its exception becomes a 500, and a ``None`` means no response.
- INVITE: a ``ServerInviteTransaction``, ``100 Trying`` at once, then the handler once per
  transaction: ``handle_invite(request, source, ServerInviteHandle)`` when the handler has it
  (``InviteHandler``), else ``handle_request``, whose response is sent through the
  transaction. Retransmitted INVITEs get the last provisional or the non-2xx final again.
  The ACK for a non-2xx final is absorbed by the transaction; an ACK that matches no
  transaction (the ACK for a 2xx has its own branch) goes to ``handle_request`` and is never
  answered.
- CANCEL (§9.2): matched to a live INVITE server transaction by branch, sent-by and Call-ID;
  answered ``200`` at once by its own non-INVITE server transaction (same To tag as our
  INVITE responses), then, if no final was sent yet, the INVITE handle learns of it
  (``cancelled``, ``cancel_reason``) and its handler sends the 487. A legacy handler (no
  ``handle_invite``) gets the 487 sent for it. A CANCEL matching nothing: ``481``.
- Responses go back per RFC 3261 §18.2.2 and RFC 3581: over the flow the request came on
  (TCP/TLS, or a new connection to the source address and Via port if it is gone), or to the
  source address and ``rport`` (UDP). Never to a Via host name: we answer whoever sent it.
- ``flow_closed_channel`` subscribers learn of every closed TCP/TLS flow.

Only this module and ``sipis.sip.transport`` read trio's clock in the SIP layer.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import ipaddress
import logging
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import attrs
import trio

from sipis.sip.dns import DEFAULT_PORTS, Target
from sipis.sip.errors import SipError, TransactionTimeout, TransportError, excerpt
from sipis.sip.headers import Via
from sipis.sip.message import (
    MAX_MESSAGE_SIZE,
    Headers,
    SipRequest,
    SipResponse,
    make_response,
    new_branch,
    new_tag,
)
from sipis.sip.proxy import make_ack_for_non2xx, make_cancel
from sipis.sip.transaction import (
    Action,
    ClientInviteTransaction,
    Deliver,
    InviteTxState,
    NonInviteClientTransaction,
    Send,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    StartTimer,
    StopTimer,
    Terminated,
    TimerConfig,
    TxOutcome,
)
from sipis.sip.transport import (
    TRANSPORTS,
    Destination,
    FlowClosed,
    FlowKey,
    ListenSpec,
    MessageReceived,
    NetworkTransport,
    Source,
    Transport,
    TransportEvent,
    Unreachable,
)

__all__ = [
    "ClientInviteHandle",
    "ClientResult",
    "Destination",
    "EndpointConfig",
    "EndpointStatistics",
    "FlowKey",
    "InviteHandler",
    "ListenSpec",
    "RequestHandler",
    "ServerInviteHandle",
    "SipEndpoint",
    "Source",
    "Target",
]

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: RFC 3261 §17.2.3: branches starting with this cookie are unique per transaction.
_MAGIC_COOKIE = "z9hG4bK"

#: Max-Forwards we add to a request that has none (RFC 3261 §8.1.1.6).
DEFAULT_MAX_FORWARDS = "70"

#: Closed-flow notices kept per subscriber that has not read them yet.
FLOW_EVENT_BUFFER = 256

#: Non-INVITE handlers running at once; further requests get 503 at once (overload guard).
MAX_CONCURRENT_HANDLERS = 1000

#: INVITE handlers (calls in progress) at once; further INVITEs get 503. Counted apart from
#: the short handlers above, so that ringing calls never starve REGISTER or OPTIONS.
MAX_CONCURRENT_INVITES = 1000

#: An INVITE transaction without a final response is given up after this (s): a server one
#: whose legacy handler answered nothing, a client one whose peer never sends a final.
INVITE_PENDING_LIFETIME = 3600.0

#: RFC 3261 §9.1: after its CANCEL, a client INVITE waits 64·T1 for the final, then gives up.
CANCEL_WAIT_MULTIPLIER = 64

#: Responses queued for one client transaction (retransmissions beyond are dropped).
_CLIENT_INBOX = 16

#: Responses a ``ClientInviteHandle`` keeps for a caller that does not read them.
_INVITE_QUEUE = 64

#: Name of the server-side pseudo-timer that forgets a transaction with no timer of its own.
_CLEANUP = "cleanup"


@attrs.frozen
class EndpointConfig:
    """What the endpoint needs from the ``sip`` section of the configuration.

    ``upstream_allow``: networks that a ``Target`` may be in; empty allows none.
    ``keepalive_interval``/``tcp_idle_timeout``: see ``sipis.sip.transport``; 0 turns off.
    """

    listen: tuple[ListenSpec, ...]
    public_host: str
    timers: TimerConfig = attrs.field(factory=TimerConfig)
    keepalive_interval: float = 90.0
    tcp_idle_timeout: float = 3600.0
    max_message_size: int = MAX_MESSAGE_SIZE
    upstream_allow: tuple[IPNetwork, ...] = ()
    tls_ca_file: Path | None = None
    tls_verify: bool = True
    user_agent: str = "sipis"


@attrs.frozen
class ClientResult:
    """The final response to ``SipEndpoint.request``, the target that gave it, and its flow."""

    response: SipResponse
    target: Target | Destination
    flow: FlowKey | None


class RequestHandler(Protocol):
    """Answers requests that reach our listeners (the calls layer)."""

    async def handle_request(self, request: SipRequest, source: Source) -> SipResponse | None:
        """Return the response to send, or None to send nothing (ACK, or answered later)."""


@runtime_checkable
class InviteHandler(RequestHandler, Protocol):
    """A ``RequestHandler`` that keeps INVITEs: it answers them through a handle, over time."""

    async def handle_invite(
        self, request: SipRequest, source: Source, tx: ServerInviteHandle
    ) -> None:
        """Answer the INVITE through ``tx`` (100 Trying is already sent).

        Runs in the endpoint's nursery for as long as the handler likes (the call's life is a
        good choice): ``tx`` stays usable after the return, e.g. for 2xx retransmissions. If
        it returns or raises before a final response went out, the endpoint answers 500.
        """


@dataclasses.dataclass(frozen=True)
class EndpointStatistics:
    """Counters of one endpoint (``statistics()``)."""

    client_transactions: int
    server_transactions: int
    flows_open: int
    datagrams_received: int
    datagrams_sent: int
    stream_messages_received: int
    stream_messages_sent: int
    parse_errors: int
    requests_received: int
    responses_unmatched: int
    handler_errors: int

    @property
    def transactions_in_flight(self) -> int:
        """Client plus server transactions."""
        return self.client_transactions + self.server_transactions


@attrs.frozen
class _TransportFailure:
    """A flow closed or ICMP refused while a client transaction was using it."""

    reason: str
    flow: FlowKey | None


@attrs.frozen
class _Wake:
    """Nudges a client INVITE task: its caller asked for a CANCEL."""


_WAKE = _Wake()

_ClientInput = SipResponse | _TransportFailure | _Wake


@attrs.define(eq=False)
class _ClientTx:
    """A client transaction as the dispatcher sees it: where it sends, and who hears of
    its responses and failures (a channel to an INVITE's task, or a non-INVITE machine)."""

    dest: Destination
    deliver: Callable[[_ClientInput], None]
    flow: FlowKey | None = None


def _channel_delivery(send: trio.MemorySendChannel[_ClientInput]
                      ) -> Callable[[_ClientInput], None]:
    def deliver(item: _ClientInput) -> None:
        # Dropped on a flood of retransmissions, or when the transaction just ended.
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                 trio.ClosedResourceError):
            send.send_nowait(item)
    return deliver


@attrs.define(eq=False)
class _ServerTx:
    key: tuple[str, str, str]
    # The request, until a non-INVITE transaction has its final response: then it only
    # absorbs retransmissions (Timer J, 32 s over UDP) and needs the response bytes alone.
    request: SipRequest | None
    source: Source
    dest: Destination
    tx: ServerNonInviteTransaction | ServerInviteTransaction
    timers: dict[str, float] = attrs.field(factory=dict)
    wake_at: float | None = None  # deadline of its live entry in the endpoint's timer heap
    handle: ServerInviteHandle | None = None


@lru_cache(maxsize=1024)
def _allowed(host: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether ``host`` (an IP literal) is in ``networks`` (cached: asked per request)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return any(address in network for network in networks)


def _normal_ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower()


def _reply_destination(via: Via, source: Source) -> Destination:
    """Where a response to a request with top Via ``via`` from ``source`` goes (§18.2.2)."""
    if source.transport == "udp":
        port = source.port if via.has_rport else (via.port or DEFAULT_PORTS["udp"])
        return Destination("udp", source.host, port)
    port = via.port or DEFAULT_PORTS.get(source.transport, 5060)
    return Destination(source.transport, source.host, port, flow=source.flow)


def _server_key(request: SipRequest | SipResponse, method: str) -> tuple[str, str, str]:
    """(branch, sent-by, method) per RFC 3261 §17.2.3; an RFC 2543 fallback without cookie."""
    via = request.top_via
    branch = via.branch or ""
    if not branch.startswith(_MAGIC_COOKIE):
        from_tag = request.from_.tag or ""
        branch = f"2543:{branch}:{request.call_id}:{request.cseq.seq}:{from_tag}"
    return (branch, via.sent_by.lower(), method)


def _without_top_via(headers: Headers) -> Headers:
    """A copy of ``headers`` without the first Via element (a line may hold several)."""
    out: list[tuple[str, str]] = []
    done = False
    for name, value in headers:
        if not done and name == "Via":
            done = True
            rest = Headers([("Via", value)]).get_list("Via")[1:]
            if rest:
                out.append((name, ", ".join(rest)))
            continue
        out.append((name, value))
    return Headers(out)


def _flow_of(exc: TransportError) -> FlowKey | None:
    return exc.flow if isinstance(exc.flow, FlowKey) else None


class SipEndpoint:
    """The SIP endpoint of sipis (see the module rules).

    Args:
        config: listeners, public host, timers and limits.
        handler: gets every new incoming request; an ``InviteHandler`` gets INVITEs through
            ``handle_invite``.
        transport: the transport to use; by default the network one built from ``config``
            (tests pass a ``MemoryTransport``).
    """

    def __init__(
        self, config: EndpointConfig, *, handler: RequestHandler,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self._handler = handler
        # Asked once: isinstance() against a runtime-checkable Protocol costs tens of µs.
        self._invite_handler = handler if isinstance(handler, InviteHandler) else None
        self._transport: Transport = transport if transport is not None else NetworkTransport(
            config.listen,
            keepalive_interval=config.keepalive_interval,
            tcp_idle_timeout=config.tcp_idle_timeout,
            max_message_size=config.max_message_size,
            tls_ca_file=config.tls_ca_file,
            tls_verify=config.tls_verify,
        )
        self._nursery: trio.Nursery | None = None
        self._client: dict[tuple[str, str], _ClientTx] = {}
        self._server: dict[tuple[str, str, str], _ServerTx] = {}
        # Timers of server transactions and task-less client ones, in one heap served by
        # one task: one entry per transaction, at its earliest timer (``wake_at``); an entry
        # whose deadline is no longer its owner's ``wake_at`` is stale and skipped.
        self._timers: list[tuple[float, int, _ServerTx | _NonInviteClient]] = []
        self._timer_seq = 0
        self._timer_wakeup = trio.Event()
        self._timer_next = math.inf  # what the timer loop sleeps until
        self._via_parts: dict[str, tuple[str, str]] = {}  # transport → our Via around the branch
        self._subscribers: list[trio.MemorySendChannel[FlowKey]] = []
        self._handlers_running = 0
        self._invites_running = 0
        self._requests_received = 0
        self._responses_unmatched = 0
        self._handler_errors = 0

    # -- lifecycle and addresses --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every listener, report started, then serve until cancelled.

        Raises:
            TransportError: a listener cannot be bound.
        """
        started = False
        self._via_parts.clear()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._transport.run, _Dispatcher(self))
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                task_status.started()
                started = True
        except BaseExceptionGroup as group:
            # A listener that cannot be bound: raise the TransportError itself, not a group.
            if not started and len(group.exceptions) == 1 and isinstance(
                    group.exceptions[0], TransportError):
                raise group.exceptions[0] from None
            raise
        finally:
            self._nursery = None
            for subscriber in self._subscribers:
                subscriber.close()
            self._subscribers.clear()

    def bound_port(self, transport: str) -> int:
        """The port our ``transport`` listener is bound to (after ``run`` has started).

        Raises:
            LookupError: no listener of that transport.
        """
        address = self._transport.local_address(transport)
        if address is None:
            raise LookupError(f"no {transport} listener")
        return address[1]

    def contact_host_port(self, transport: str) -> tuple[str, int]:
        """(public host, port) to advertise for ``transport``: the listener's ``public_port``,
        else its bound port.

        Raises:
            LookupError: no listener of that transport.
        """
        for spec in self.config.listen:
            if spec.transport == transport and spec.public_port is not None:
                return self.config.public_host, spec.public_port
        return self.config.public_host, self.bound_port(transport)

    def flow_closed_channel(self) -> trio.MemoryReceiveChannel[FlowKey]:
        """A new subscription to closed TCP/TLS flows; closed when the endpoint stops."""
        send, receive = trio.open_memory_channel[FlowKey](FLOW_EVENT_BUFFER)
        self._subscribers.append(send)
        return receive

    def statistics(self) -> EndpointStatistics:
        """Current counters, merged with the transport's."""
        transport = self._transport.statistics()
        return EndpointStatistics(
            client_transactions=len(self._client),
            server_transactions=len(self._server),
            flows_open=transport.flows_open,
            datagrams_received=transport.datagrams_received,
            datagrams_sent=transport.datagrams_sent,
            stream_messages_received=transport.stream_messages_received,
            stream_messages_sent=transport.stream_messages_sent,
            parse_errors=transport.parse_errors,
            requests_received=self._requests_received,
            responses_unmatched=self._responses_unmatched,
            handler_errors=self._handler_errors,
        )

    # -- where we may send --

    def _destination(self, where: Target | Destination, method: str) -> Destination | None:
        """The transport destination for ``where``, or None if the SSRF guard refuses it."""
        if isinstance(where, Destination):
            if where.flow is not None and not where.flow_only:
                return attrs.evolve(where, flow_only=True)
            return where
        if not _allowed(where.host, self.config.upstream_allow):
            log.warning("%s to %s refused: destination not allowed", method, excerpt(where.host))
            return None
        return Destination(where.transport, where.host, where.port,
                           server_name=where.server_name)

    def _check_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise TransportError("the SIP endpoint is not running")
        return self._nursery

    def _via(self, transport: str, branch: str) -> Via:
        try:
            host, port = self.contact_host_port(transport)
        except LookupError:  # e.g. outbound TCP without a TCP listener
            fallback = next(iter(self.config.listen), None)
            port = DEFAULT_PORTS[transport]
            if fallback is not None:
                port = self.contact_host_port(fallback.transport)[1]
            host = self.config.public_host
        return Via(transport.upper(), host, port, (("branch", branch), ("rport", None)))

    def _check_own_top_via(self, request: SipRequest) -> None:
        """``replace_top_via`` must only ever drop a Via of ours, never the sender's."""
        if "Via" not in request.headers:
            raise ValueError("replace_top_via: the request has no Via")
        if _normal_ip(request.top_via.host) != _normal_ip(self.config.public_host):
            raise ValueError("replace_top_via: the top Via is not ours")

    def _outgoing(
        self, request: SipRequest, transport: str, branch: str, replace_top_via: bool
    ) -> SipRequest:
        """A copy of ``request`` with our Via on top and a Max-Forwards."""
        headers = _without_top_via(request.headers) if replace_top_via else request.headers.copy()
        parts = self._via_parts.get(transport)
        if parts is None:
            # Our Via differs per transaction by its branch only: format it once.
            before, _, after = str(self._via(transport, "\0")).partition("\0")
            parts = self._via_parts[transport] = (before, after)
        headers.prepend("Via", f"{parts[0]}{branch}{parts[1]}")
        if "Max-Forwards" not in headers:
            headers.add("Max-Forwards", DEFAULT_MAX_FORWARDS)
        return SipRequest(request.method, request.uri, headers, request.body)

    # -- client side: non-INVITE --

    async def request(
        self, request: SipRequest, targets: Sequence[Target | Destination], *,
        replace_top_via: bool = False,
    ) -> ClientResult:
        """Send a non-INVITE request and wait for its final response, failing over.

        Args:
            request: the request without our Via (we add it; the object is not changed).
            targets: RFC 3263 targets in failover order, or destinations we heard from (a
                device binding's source and flow, for in-dialog requests toward the device;
                see the module rules).
            replace_top_via: the request's top Via is ours (``proxy.forward_request``):
                replace it instead of adding one.

        Returns:
            The first final response, the target that sent it and the flow used.

        Raises:
            TransportError: no allowed target ("destination not allowed"), the endpoint is
                not running, or the last allowed target failed at the transport level (a
                destination's flow has closed, too).
            TransactionTimeout: the last allowed target did not answer before Timer F.
            ValueError: an INVITE or ACK (see ``invite``, ``send_request_stateless``), or
                ``replace_top_via`` on a request whose top Via is not ours.
        """
        return await _reported(lambda done: self.start_request(
            request, targets, done, replace_top_via=replace_top_via))

    def start_request(
        self, request: SipRequest, targets: Sequence[Target | Destination],
        done: Callable[[ClientResult | SipError], None], *, replace_top_via: bool = False,
    ) -> Callable[[], None]:
        """``request`` without a waiting task: ``done`` hears the outcome once.

        ``done`` gets the ``ClientResult``, or the ``TransactionTimeout`` / ``TransportError``
        that ``request`` would raise. It runs in the endpoint's receive or timer path (or
        before this returns, when the last target fails at once): it must not block or
        raise. For callers that chain transactions (a REGISTER, its 401, the authenticated
        REGISTER) without a task switch between them.

        Returns:
            a function that abandons the request: ``done`` is then never called.

        Raises:
            TransportError, ValueError: as ``request`` does, before anything is sent.
        """
        if request.method in ("INVITE", "ACK"):
            raise ValueError(f"{request.method} needs its own transaction kind (RFC 3261 §17.1.1)")
        if replace_top_via:
            self._check_own_top_via(request)
        allowed: list[tuple[Target | Destination, Destination]] = []
        for target in targets:
            dest = self._destination(target, request.method)
            if dest is not None:
                allowed.append((target, dest))
        if not allowed:
            raise TransportError("destination not allowed")
        self._check_running()
        failover = _Failover(self, request, allowed, replace_top_via, done)
        failover.next(None)
        return failover.abandon

    async def _run_non_invite(
        self, outgoing: SipRequest, branch: str, dest: Destination
    ) -> tuple[SipResponse, FlowKey | None]:
        """One non-INVITE client transaction to one destination (RFC 3261 §17.1.2).

        The transaction runs without this task (``_NonInviteClient``): the task only sleeps
        until its end is reported. Cancelling the wait abandons the transaction.
        """
        return await _reported(
            lambda done: self._start_non_invite(outgoing, branch, dest, done).abandon)

    def _start_non_invite(
        self, outgoing: SipRequest, branch: str, dest: Destination,
        done: Callable[[tuple[SipResponse, FlowKey | None] | SipError], None],
    ) -> _NonInviteClient:
        tx = NonInviteClientTransaction(
            branch=branch, data=outgoing.to_bytes(), reliable=dest.transport != "udp",
            timers=self.config.timers)
        client = _NonInviteClient(self, (branch, outgoing.method), tx, dest, done)
        self._client[client.key] = client.record
        client.start(trio.current_time())
        return client

    def _client_send_now(self, client: _NonInviteClient, data: bytes) -> str | None:
        """Send for a task-less client: at once if the transport can (UDP), else in a task of
        ours whose failure is fed back to the machine. The failure text, or None."""
        record = client.record
        try:
            if self._transport.send_nowait(data, record.dest):
                return None
            nursery = self._check_running()
        except TransportError as exc:
            record.flow = record.flow or _flow_of(exc)
            return str(exc)
        nursery.start_soon(self._client_send_later, client, data)
        return None

    async def _client_send_later(self, client: _NonInviteClient, data: bytes) -> None:
        error = await self._client_send(client.record, data)
        if error is not None:
            client.feed(_TransportFailure(error, client.record.flow))

    async def _send(self, data: bytes, dest: Destination) -> FlowKey | None:
        """``Transport.send``, without a task switch when the datagram goes at once."""
        if self._transport.send_nowait(data, dest):
            return None
        return await self._transport.send(data, dest)

    async def _client_send(self, record: _ClientTx, data: bytes) -> str | None:
        """Send on a client transaction's way; the failure text, or None once sent."""
        try:
            flow = await self._send(data, record.dest)
        except TransportError as exc:
            record.flow = record.flow or _flow_of(exc)
            return str(exc)
        if flow is not None:
            record.flow = flow
            if record.dest.flow != flow:
                record.dest = attrs.evolve(record.dest, flow=flow)
        return None

    @staticmethod
    async def _next_client_input(
        inbox: trio.MemoryReceiveChannel[_ClientInput], deadline: float
    ) -> _ClientInput | None:
        """The next response, failure or wake-up; None once ``deadline`` has passed."""
        with trio.move_on_at(deadline):
            return await inbox.receive()
        return None

    # -- client side: INVITE --

    async def invite(
        self, request: SipRequest, destination: Target | Destination, *,
        replace_top_via: bool = False,
    ) -> ClientInviteHandle:
        """Start an INVITE client transaction (RFC 3261 §17.1.1, RFC 6026) to ``destination``.

        The transaction runs in the endpoint's nursery; the handle gives its responses and
        lets the caller cancel it. No failover: a proxy forwarding to a device binding has
        exactly one place to go.

        Args:
            request: the INVITE without our Via (we add it; the object is not changed).
            destination: a ``Target`` (checked against ``upstream_allow``) or a destination
                we heard from, e.g. a device binding's source with its ``flow``.
            replace_top_via: the request's top Via is ours (``proxy.forward_request``):
                replace it instead of adding one.

        Returns:
            The handle; ``handle.request`` is the INVITE as sent, ``handle.branch`` its branch.

        Raises:
            TransportError: the destination is not allowed, or the endpoint is not running.
                Failures after this (the flow has closed, connection refused, Timer B) come
                out of ``handle.responses()``.
            ValueError: not an INVITE, or ``replace_top_via`` on a Via that is not ours.
        """
        await trio.lowlevel.checkpoint()
        if request.method != "INVITE":
            raise ValueError(f"invite() sends an INVITE, not a {request.method}")
        if replace_top_via:
            self._check_own_top_via(request)
        dest = self._destination(destination, "INVITE")
        if dest is None:
            raise TransportError("destination not allowed")
        if dest.transport not in TRANSPORTS:
            raise TransportError(f"unsupported transport {excerpt(dest.transport)}")
        nursery = self._check_running()
        branch = new_branch()
        outgoing = self._outgoing(request, dest.transport, branch, replace_top_via)

        def make_ack(response: object) -> bytes:
            assert isinstance(response, SipResponse)
            return make_ack_for_non2xx(outgoing, response).to_bytes()

        tx = ClientInviteTransaction(
            branch=branch, data=outgoing.to_bytes(), reliable=dest.transport != "udp",
            timers=self.config.timers, make_ack=make_ack)
        send, inbox = trio.open_memory_channel[_ClientInput](_CLIENT_INBOX)
        record = _ClientTx(dest, _channel_delivery(send), dest.flow)
        handle = ClientInviteHandle(outgoing, branch, dest, tx, record)
        self._client[(branch, "INVITE")] = record
        nursery.start_soon(self._run_invite, handle, tx, record, inbox)
        return handle

    async def _run_invite(
        self, handle: ClientInviteHandle, tx: ClientInviteTransaction, record: _ClientTx,
        inbox: trio.MemoryReceiveChannel[_ClientInput],
    ) -> None:
        """Drive one INVITE client transaction until it terminates (or is given up)."""
        dest = record.dest
        timers: dict[str, float] = {}
        give_up = trio.current_time() + INVITE_PENDING_LIFETIME
        failure = "transport error"
        error: SipError | None = None
        try:
            actions: collections.deque[Action] = collections.deque(tx.start(trio.current_time()))
            while True:
                while actions:
                    action = actions.popleft()
                    if isinstance(action, Send):
                        send_error = await self._client_send(record, action.data)
                        handle.flow = record.flow
                        if send_error is not None:
                            failure = send_error
                            actions.extend(tx.transport_error(trio.current_time()))
                    elif isinstance(action, StartTimer):
                        timers[action.name] = action.deadline
                    elif isinstance(action, StopTimer):
                        timers.pop(action.name, None)
                    elif isinstance(action, Deliver):
                        assert isinstance(action.response, SipResponse)
                        handle._deliver(action.response)
                    elif isinstance(action, Terminated):
                        if action.outcome is TxOutcome.TIMEOUT:
                            error = TransactionTimeout(
                                f"no response to INVITE from {dest.transport} "
                                f"{dest.host}:{dest.port} (Timer B)")
                        elif action.outcome is TxOutcome.TRANSPORT_ERROR:
                            error = TransportError(failure, flow=record.flow)
                        return
                if handle.cancel_requested and not handle.cancel_sent and tx.cancel_allowed:
                    handle.cancel_sent = True
                    cancel_wait = CANCEL_WAIT_MULTIPLIER * self.config.timers.t1
                    give_up = min(give_up, trio.current_time() + cancel_wait)
                    self._check_running().start_soon(self._run_cancel, handle, record.dest)
                # Only a transaction still waiting for its final is given up on.
                waiting = tx.state in (InviteTxState.CALLING, InviteTxState.PROCEEDING)
                deadline = min(min(timers.values(), default=math.inf),
                               give_up if waiting else math.inf)
                item = await self._next_client_input(inbox, deadline)
                now = trio.current_time()
                if isinstance(item, SipResponse):
                    actions.extend(tx.receive_response(item.status, item, now))
                elif isinstance(item, _TransportFailure):
                    failure = item.reason
                    actions.extend(tx.transport_error(now))
                elif item is None:
                    actions.extend(_fire_due(timers, now, tx.timer_fired))
                    if not actions and waiting and now >= give_up:
                        error = TransactionTimeout(
                            f"no final response to INVITE from {dest.transport} "
                            f"{dest.host}:{dest.port}"
                            + (" after its CANCEL" if handle.cancel_sent else ""))
                        return
        finally:
            self._client.pop((handle.branch, "INVITE"), None)
            inbox.close()
            if error is None and tx.state is not InviteTxState.TERMINATED:
                error = TransportError("the SIP endpoint stopped")
            handle._finish(error)

    async def _run_cancel(self, handle: ClientInviteHandle, dest: Destination) -> None:
        """Send the CANCEL of a client INVITE as its own transaction (RFC 3261 §9.1)."""
        cancel = make_cancel(handle.request, reason=handle.cancel_reason)
        try:
            response, _ = await self._run_non_invite(cancel, handle.branch, dest)
        except (TransactionTimeout, TransportError) as exc:
            log.info("CANCEL to %s %s:%d failed: %s", dest.transport, dest.host, dest.port, exc)
            handle.cancel_result = exc
            return
        handle.cancel_result = response

    # -- client side: stateless --

    async def send_request_stateless(
        self, request: SipRequest, destination: Target | Destination, *, add_via: bool = False,
    ) -> FlowKey | None:
        """Send a request with no transaction: an ACK for a 2xx, or a relayed end-to-end ACK.

        Args:
            request: sent as it is (a proxied ACK carries our Via from
                ``proxy.forward_request`` already), unless ``add_via``.
            destination: as for ``request``; the same guard applies.
            add_via: add our Via (fresh branch) and a Max-Forwards, as a UAC's own ACK needs.

        Returns:
            The flow used (None for UDP).

        Raises:
            TransportError: not allowed, not running, or the send failed.
        """
        dest = self._destination(destination, request.method)
        if dest is None:
            raise TransportError("destination not allowed")
        self._check_running()
        if add_via:
            request = self._outgoing(request, dest.transport, new_branch(), False)
        return await self._send(request.to_bytes(), dest)

    # -- dispatch --

    def _dispatch(self, event: TransportEvent) -> None:
        if isinstance(event, MessageReceived):
            if isinstance(event.message, SipResponse):
                self._response_received(event.message, event.source)
            else:
                self._request_received(event.message, event.source)
        elif isinstance(event, FlowClosed):
            self._flow_closed(event)
        elif isinstance(event, Unreachable):
            where = (event.transport, _normal_ip(event.host), event.port)
            for record in list(self._client.values()):
                dest = record.dest
                if (dest.transport, _normal_ip(dest.host), dest.port) == where:
                    self._notify(record, _TransportFailure(
                        f"{event.transport} {event.host}:{event.port} unreachable: "
                        f"{event.reason}", None))

    def _response_received(self, response: SipResponse, source: Source) -> None:
        via = response.top_via
        record = self._client.get((via.branch or "", response.cseq.method))
        if record is None:
            self._responses_unmatched += 1
            log.debug("dropped a %d response matching no transaction", response.status)
            return
        if record.flow is None and source.flow is not None:
            # Answered over a stream before our send of the request returned (it runs in a
            # task of its own): the flow it used is the one the answer came on.
            record.flow = source.flow
        self._notify(record, response)

    @staticmethod
    def _notify(record: _ClientTx, item: _ClientInput) -> None:
        record.deliver(item)

    def _flow_closed(self, event: FlowClosed) -> None:
        for record in list(self._client.values()):
            if record.flow == event.flow:
                self._notify(record, _TransportFailure(
                    f"flow to {event.flow.host}:{event.flow.port} closed: {event.reason}",
                    event.flow))
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(event.flow)
            except trio.WouldBlock:
                log.warning("a flow-closed subscriber is not reading; notice dropped")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(subscriber)

    # -- server side --

    def _request_received(self, request: SipRequest, source: Source) -> None:
        self._requests_received += 1
        nursery = self._check_running()
        via = self._mark_received(request, source)
        method = request.method
        now = trio.current_time()
        if method == "ACK":
            self._ack_received(request, source, now)
            return
        key = _server_key(request, method)
        record = self._server.get(key)
        if record is not None:  # a retransmission
            self._spawn_transmit(record, self._apply(record, record.tx.receive_request(now)))
            return
        reliable = source.transport != "udp"
        dest = _reply_destination(via, source)
        if method == "INVITE":
            invite_tx = ServerInviteTransaction(branch=key[0], reliable=reliable,
                                                timers=self.config.timers)
            record = _ServerTx(key, request, source, dest, invite_tx)
            self._server[key] = record
            self._invite_received(record, invite_tx, nursery)
            return
        tx = ServerNonInviteTransaction(branch=key[0], reliable=reliable,
                                        timers=self.config.timers)
        record = _ServerTx(key, request, source, dest, tx)
        self._server[key] = record
        self._arm(record, _CLEANUP, now + 64 * self.config.timers.t1)  # the client gives up
        if method == "CANCEL":
            self._cancel_received(record, nursery)
            return
        if self._handlers_running >= MAX_CONCURRENT_HANDLERS:
            log.warning("too many requests in progress; answering 503")
            nursery.start_soon(self._server_send, record, _busy(request))
            return
        self._handlers_running += 1
        nursery.start_soon(self._handle, record, request, source)

    def _ack_received(self, request: SipRequest, source: Source, now: float) -> None:
        """An ACK: the INVITE transaction's own (non-2xx) or the handler's (2xx, stray)."""
        record = self._server.get(_server_key(request, "INVITE"))
        if record is not None and isinstance(record.tx, ServerInviteTransaction):
            state = record.tx.state
            if state in (InviteTxState.COMPLETED, InviteTxState.CONFIRMED):
                if record.handle is not None:
                    record.handle._acked()
                self._apply(record, record.tx.receive_ack(now))
                return
            if state is InviteTxState.PROCEEDING:
                log.debug("dropped an ACK before any final response")
                return
        if self._handlers_running >= MAX_CONCURRENT_HANDLERS:
            log.warning("too many requests in progress; ACK dropped")
            return
        self._handlers_running += 1
        self._check_running().start_soon(self._handle, None, request, source)

    def _invite_received(
        self, record: _ServerTx, tx: ServerInviteTransaction, nursery: trio.Nursery
    ) -> None:
        handle = ServerInviteHandle(self, record, tx, managed=self._invite_handler is not None)
        record.handle = handle
        if self._invites_running >= MAX_CONCURRENT_INVITES:
            log.warning("too many INVITEs in progress; answering 503")
            nursery.start_soon(self._server_send, record, _busy(handle.request))
            return
        self._invites_running += 1
        nursery.start_soon(self._handle_invite, handle)

    @staticmethod
    def _mark_received(request: SipRequest, source: Source) -> Via:
        """Add received/rport to the top Via (RFC 3261 §18.2.1, RFC 3581 §4); return it."""
        vias = request.headers.get_list("Via")
        top = Via.parse(vias[0])
        params: dict[str, str | None] = {}
        if top.has_rport:
            params["rport"] = str(source.port)
            params["received"] = source.host
        elif top.host.lower() != source.host.lower():
            params["received"] = source.host
        if params:
            top = top.with_params(**params)
            request.headers.set("Via", ", ".join([str(top), *vias[1:]]))
        return top

    async def _handle(self, record: _ServerTx | None, request: SipRequest, source: Source) -> None:
        """Run the handler for a new request and send what it returns (counted by the caller)."""
        try:
            try:
                response = await self._handler.handle_request(request, source)
            except Exception:
                self._handler_errors += 1
                log.exception("handler failed on %s", request.method)
                response = make_response(request, 500, to_tag=new_tag())
            if record is None or response is None:
                return
            await self._server_send(record, response)
        finally:
            self._handlers_running -= 1

    async def _handle_invite(self, handle: ServerInviteHandle) -> None:
        """100 Trying, then the handler; a 500 if it leaves the INVITE without a final."""
        record = handle._record
        try:
            await handle.send_provisional(handle.make_response(100))
            try:
                if self._invite_handler is not None:
                    await self._invite_handler.handle_invite(
                        handle.request, handle.source, handle)
                    if handle.final_status is None:
                        log.warning("INVITE handler returned without a final response")
                        await handle.send_final(handle.make_response(500))
                    return
                response = await self._handler.handle_request(handle.request, handle.source)
            except Exception:
                self._handler_errors += 1
                log.exception("handler failed on INVITE")
                if handle.final_status is None:
                    await handle.send_final(handle.make_response(500))
                return
            if response is not None:
                await self._server_send(record, response)
            if handle.final_status is None and handle.state is InviteTxState.PROCEEDING:
                # Answered later through send_response(), or forgotten after a while.
                self._arm(record, _CLEANUP, trio.current_time() + INVITE_PENDING_LIFETIME)
        finally:
            self._invites_running -= 1

    def _cancel_received(self, record: _ServerTx, nursery: trio.Nursery) -> None:
        """200 (then tell the INVITE's handle) or 481 to a new CANCEL (RFC 3261 §9.2), from
        the receive path when the transport takes the answer at once (UDP): a task per
        CANCEL cost a spawn and a scheduler pass per cancelled call."""
        request = record.request
        assert request is not None  # no final sent yet
        invite = self._server.get(_server_key(request, "INVITE"))
        handle = invite.handle if invite is not None else None
        if (handle is None or handle.state is InviteTxState.TERMINATED
                or handle.request.call_id != request.call_id):
            rest = self._server_send_now(record, make_response(request, 481, to_tag=new_tag()))
            if isinstance(rest, list):
                nursery.start_soon(self._transmit, record, rest)
            return
        reasons = request.headers.get_all("Reason")
        reason = ", ".join(reasons) if reasons else None
        rest = self._server_send_now(record, make_response(request, 200, to_tag=handle.to_tag))
        if isinstance(rest, list):  # the 200 waits for the transport: the rest after it
            nursery.start_soon(self._cancel_answered, record, rest, handle, reason, nursery)
            return
        self._cancel_invite(handle, reason, nursery)

    async def _cancel_answered(self, record: _ServerTx, rest: list[bytes],
                               handle: ServerInviteHandle, reason: str | None,
                               nursery: trio.Nursery) -> None:
        """The rest of ``_cancel_received`` once its 200 has been sent."""
        with trio.CancelScope(shield=True):
            await self._transmit(record, rest)
        self._cancel_invite(handle, reason, nursery)

    @staticmethod
    def _cancel_invite(handle: ServerInviteHandle, reason: str | None,
                       nursery: trio.Nursery) -> None:
        """Tell the INVITE's handle of the CANCEL its 200 answered."""
        if handle.state is not InviteTxState.PROCEEDING:
            return  # the final is out already: the CANCEL has no effect on the INVITE
        handle._cancel(reason)
        if not handle._managed:  # a legacy handler cannot hear of it: the 487 is sent for it
            nursery.start_soon(handle.send_final, handle.make_response(487))

    async def send_response(self, response: SipResponse, source: Source) -> None:
        """Send a response to a request received from ``source`` (provisionals, late finals).

        It goes through the request's server transaction if that still exists, else
        straight to where §18.2.2 says.

        Raises:
            TransportError: it could not be sent statelessly.
        """
        key = _server_key(response, response.cseq.method)
        record = self._server.get(key)
        if record is None:
            await self.send_response_stateless(response, source)
            return
        await self._server_send(record, response)

    async def send_response_stateless(
        self, response: SipResponse, to: Source | Destination
    ) -> FlowKey | None:
        """Send a response with no transaction (a relayed 2xx retransmission, a late 2xx).

        Args:
            response: sent as it is.
            to: the ``Source`` of the request (the response goes where §18.2.2 and RFC 3581
                say, from its top Via), or a ``Destination`` to use as it is.

        Returns:
            The flow used (None for UDP).

        Raises:
            TransportError: it could not be sent.
        """
        dest = _reply_destination(response.top_via, to) if isinstance(to, Source) else to
        return await self._send(response.to_bytes(), dest)

    async def _server_send(self, record: _ServerTx, response: SipResponse) -> bool:
        """Pass a TU response through its server transaction; True if it went out.

        Shielded: a response the machine has taken is sent even if the caller is cancelled
        (bounded by the transport's connect and send timeouts), so that the machine and the
        wire never disagree and a stream never carries half a message.
        """
        rest = self._server_send_now(record, response)
        if not isinstance(rest, list):
            return rest
        sent = False
        with trio.CancelScope(shield=True):
            sent = await self._transmit(record, rest)
        return sent

    def _server_send_now(self, record: _ServerTx, response: SipResponse) -> bool | list[bytes]:
        """``_server_send`` up to what the transport takes at once: True if all of it went,
        False if nothing is to go (or sending failed), else the bytes left for
        ``_transmit``."""
        data = response.to_bytes()
        datas = self._apply(record, record.tx.send_response(
            response.status, data, trio.current_time()))
        if not datas:
            return False
        handle = record.handle
        if response.status >= 200:
            if handle is None:
                record.request = None  # a completed non-INVITE keeps its answer's bytes only
            elif handle.final_status is None:
                handle.final_status = response.status
        rest = self._transmit_now(record, datas)
        if rest is None:
            return False
        return rest or True  # all sent at once (UDP): no task switch before the caller goes on

    def _apply(self, record: _ServerTx, actions: list[Action]) -> list[bytes]:
        """Carry out a server transaction's timer and end actions; return what to send."""
        out: list[bytes] = []
        for action in actions:
            if isinstance(action, Send):
                out.append(action.data)
            elif isinstance(action, StartTimer):
                record.timers.pop(_CLEANUP, None)  # the machine keeps its own time now
                self._arm(record, action.name, action.deadline)
            elif isinstance(action, StopTimer):
                record.timers.pop(action.name, None)
            elif isinstance(action, Terminated):
                self._forget(record, action.outcome)
        return out

    def _spawn_transmit(self, record: _ServerTx, datas: list[bytes]) -> None:
        """Send (a retransmission, a timer's answer...) at once if the transport takes it,
        else from a task."""
        rest = self._transmit_now(record, datas)
        if rest:
            self._check_running().start_soon(self._transmit, record, rest)

    def _transmit_now(self, record: _ServerTx, datas: list[bytes]) -> list[bytes] | None:
        """Send what the transport takes at once (UDP, socket buffer not full). Returns what
        is left for ``_transmit`` (empty when all went), or None if a send failed (the
        machine has been told)."""
        for i, data in enumerate(datas):
            try:
                if not self._transport.send_nowait(data, record.dest):
                    return datas[i:]
            except TransportError as exc:
                self._reply_not_sent(record, exc)
                self._transmit_failed(record)
                return None
        return []

    async def _transmit(self, record: _ServerTx, datas: list[bytes]) -> bool:
        """Send a server transaction's messages in order; on a failure tell the machine."""
        for data in datas:
            if not await self._send_reply(record, data):
                self._transmit_failed(record)
                return False
        return True

    def _transmit_failed(self, record: _ServerTx) -> None:
        if record.handle is not None:
            record.handle.send_failures += 1
        self._apply(record, record.tx.transport_error(trio.current_time()))

    @staticmethod
    def _reply_not_sent(record: _ServerTx, exc: TransportError) -> None:
        log.info("response to %s %s:%d not sent: %s", record.dest.transport,
                 record.dest.host, record.dest.port, exc)

    async def _send_reply(self, record: _ServerTx, data: bytes) -> bool:
        """Send a response on the record's way back; False (logged) if that failed."""
        try:
            flow = await self._transport.send(data, record.dest)
        except TransportError as exc:
            self._reply_not_sent(record, exc)
            return False
        if flow is not None and flow != record.dest.flow:
            record.dest = attrs.evolve(record.dest, flow=flow)
        return True

    def _forget(self, record: _ServerTx, outcome: TxOutcome | None) -> None:
        record.timers.clear()
        record.wake_at = None
        if self._server.get(record.key) is record:
            del self._server[record.key]
        handle, record.handle = record.handle, None  # handle → record → handle: a cycle
        if handle is not None:
            handle._ended(outcome)

    # -- server timers --

    def _arm(self, record: _ServerTx | _NonInviteClient, name: str, deadline: float) -> None:
        record.timers[name] = deadline
        self._wake_at(record, deadline)

    def _wake_at(self, record: _ServerTx | _NonInviteClient, deadline: float) -> None:
        """Make sure the timer loop looks at ``record`` by ``deadline``. A transaction keeps
        one heap entry, for its earliest timer: a UDP client arms E and F, and F (32 s) is
        nearly always stale by then; a heap of them all cost more than the transactions."""
        if record.wake_at is not None and record.wake_at <= deadline:
            return
        record.wake_at = deadline
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, record))
        if deadline < self._timer_next:
            self._timer_wakeup.set()

    async def _timer_loop(self) -> None:
        """Fire the transactions' timers (server G, H, I, J, L and clean-up deadlines; client
        E, F, K of task-less non-INVITE transactions)."""
        timers = self._timers
        while True:
            # Stale entries on top are dropped first, so the loop sleeps until a live one:
            # most client entries are stale by then (the answer came), and waking for each
            # would cost a scheduler pass per transaction.
            while timers and timers[0][2].wake_at != timers[0][0]:
                heapq.heappop(timers)
            self._timer_next = timers[0][0] if timers else math.inf
            with trio.move_on_at(self._timer_next):
                await self._timer_wakeup.wait()
            self._timer_wakeup = trio.Event()
            now = trio.current_time()
            while timers and timers[0][0] <= now:
                when, _, owner = heapq.heappop(timers)
                if owner.wake_at != when:
                    continue  # stale: the transaction is gone or wants an earlier wake-up
                owner.wake_at = None
                self._fire_timers(owner, now)
                if owner.timers:  # the next timer of this transaction
                    self._wake_at(owner, min(owner.timers.values()))

    def _fire_timers(self, owner: _ServerTx | _NonInviteClient, now: float) -> None:
        """Fire the transaction's timers due at ``now``, earliest first (one may stop or
        start another)."""
        while owner.timers:
            name, when = min(owner.timers.items(), key=_deadline)
            if when > now:
                return
            del owner.timers[name]
            if isinstance(owner, _NonInviteClient):
                try:
                    owner.timer_fired(name, now)
                except Exception:  # a machine bug must not stop every other timer
                    log.exception("client timer %s failed", name)
                    return
                continue
            if name == _CLEANUP:
                self._forget(owner, None)
                return
            try:
                datas = self._apply(owner, owner.tx.timer_fired(name, now))
            except Exception:  # a machine bug must not stop every other timer
                log.exception("server timer %s failed", name)
                return
            self._spawn_transmit(owner, datas)


def _deadline(item: tuple[str, float]) -> float:
    return item[1]


def _busy(request: SipRequest) -> SipResponse:
    busy = make_response(request, 503, to_tag=new_tag())
    busy.headers.add("Retry-After", "5")
    return busy


_R = TypeVar("_R")


async def _reported(start: Callable[[Callable[[_R | SipError], None]], Callable[[], None]]
                    ) -> _R:
    """Run something that reports its end through a callback (a task-less transaction),
    with this task asleep until then; cancelling the wait abandons it.

    ``start(done)`` starts it and returns its abandon function; ``done`` gets the result or
    the ``SipError`` to raise, once (maybe before ``start`` returns).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    ended: list[_R | SipError] = []
    parked = False

    def done(result: _R | SipError) -> None:
        ended.append(result)
        if parked:
            trio.lowlevel.reschedule(task)

    abandon = start(done)
    if ended:
        await trio.lowlevel.cancel_shielded_checkpoint()
    else:
        parked = True

        def abort(_: object) -> trio.lowlevel.Abort:
            abandon()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
    result = ended[0]
    if isinstance(result, SipError):
        raise result
    return result


class _Failover:
    """A non-INVITE request tried on each allowed target in turn (RFC 3263 §4.3), without a
    task: the next target starts from the failed transaction's end report."""

    __slots__ = ("_abandoned", "_allowed", "_client", "_dest", "_done", "_endpoint",
                 "_replace_top_via", "_request", "_target")

    def __init__(
        self, endpoint: SipEndpoint, request: SipRequest,
        allowed: list[tuple[Target | Destination, Destination]], replace_top_via: bool,
        done: Callable[[ClientResult | SipError], None],
    ) -> None:
        self._endpoint = endpoint
        self._request = request
        self._allowed = iter(allowed)
        self._replace_top_via = replace_top_via
        self._done = done
        self._client: _NonInviteClient | None = None
        self._target: Target | Destination | None = None
        self._dest: Destination | None = None
        self._abandoned = False

    def next(self, error: SipError | None) -> None:
        """Start on the next allowed target; report ``error`` if none is left (made only
        then, when the first target is tried: an exception per request cost ~1 %)."""
        for target, dest in self._allowed:
            self._target, self._dest = target, dest
            try:
                if dest.transport not in TRANSPORTS:
                    raise TransportError(f"unsupported transport {excerpt(dest.transport)}")
                branch = new_branch()
                outgoing = self._endpoint._outgoing(self._request, dest.transport, branch,
                                                    self._replace_top_via)
            except TransportError as exc:
                self._failed(exc)
                error = exc
                continue
            client = self._endpoint._start_non_invite(outgoing, branch, dest, self._ended)
            if not client.finished:
                self._client = client
            return
        self._done(error if error is not None else TransportError("no target"))

    def abandon(self) -> None:
        self._abandoned = True
        client, self._client = self._client, None
        if client is not None:
            client.abandon()

    def _ended(self, result: tuple[SipResponse, FlowKey | None] | SipError) -> None:
        self._client = None
        if self._abandoned:
            return
        if isinstance(result, SipError):
            self._failed(result)
            self.next(result)
            return
        response, flow = result
        assert self._target is not None
        self._done(ClientResult(response, self._target, flow))

    def _failed(self, exc: SipError) -> None:
        dest = self._dest
        assert dest is not None
        log.info("%s to %s %s:%d failed: %s", self._request.method, dest.transport,
                 dest.host, dest.port, exc)


class _NonInviteClient:
    """One non-INVITE client transaction driven without a task (RFC 3261 §17.1.2).

    The endpoint feeds it responses and transport failures from the receive path and its
    timers from the timer loop; it sends through ``SipEndpoint._client_send_now`` and reports
    its end once through ``done``: the final response and flow, or a ``TransactionTimeout`` /
    ``TransportError``. A task, a channel and a cancel scope per transaction cost more than
    the transaction itself when thousands of REGISTERs a second go out.
    """

    __slots__ = ("_done", "_endpoint", "_failure", "_pending", "_running", "finished", "key",
                 "record", "timers", "tx", "wake_at")

    def __init__(
        self, endpoint: SipEndpoint, key: tuple[str, str], tx: NonInviteClientTransaction,
        dest: Destination, done: Callable[[tuple[SipResponse, FlowKey | None] | SipError], None],
    ) -> None:
        self._endpoint = endpoint
        self.key = key
        self.tx = tx
        self.record = _ClientTx(dest, self.feed, dest.flow)
        self._done = done
        self.timers: dict[str, float] = {}
        self.wake_at: float | None = None  # see SipEndpoint._wake_at
        self.finished = False
        self._failure = "transport error"
        self._pending: collections.deque[_ClientInput] = collections.deque()
        self._running = False  # inside _run: input that arrives now waits its turn

    def start(self, now: float) -> None:
        self._run(self.tx.start(now))

    def feed(self, item: _ClientInput) -> None:
        """A response or transport failure for this transaction (a ``_WAKE`` is ignored)."""
        if self.finished:
            return
        if self._running:  # e.g. an ICMP error reported while we were sending
            self._pending.append(item)
            return
        self._run(self._input(item))

    def timer_fired(self, name: str, now: float) -> None:
        if not self.finished:
            self._run(self.tx.timer_fired(name, now))

    def abandon(self) -> None:
        """Nobody waits for the outcome any more (the caller was cancelled): forget it."""
        self._end()

    def _input(self, item: _ClientInput) -> list[Action]:
        now = trio.current_time()
        if isinstance(item, SipResponse):
            return self.tx.receive_response(item.status, item, now)
        if isinstance(item, _TransportFailure):
            self._failure = item.reason
            return self.tx.transport_error(now)
        return []

    def _run(self, actions: list[Action]) -> None:
        self._running = True
        try:
            queue = collections.deque(actions)
            while not self.finished:
                if not queue:
                    if not self._pending:
                        return
                    queue.extend(self._input(self._pending.popleft()))
                    continue
                action = queue.popleft()
                if isinstance(action, Send):
                    error = self._endpoint._client_send_now(self, action.data)
                    if error is not None:
                        self._failure = error
                        queue.extend(self.tx.transport_error(trio.current_time()))
                elif isinstance(action, StartTimer):
                    self._endpoint._arm(self, action.name, action.deadline)
                elif isinstance(action, StopTimer):
                    self.timers.pop(action.name, None)
                elif isinstance(action, Deliver):
                    response = action.response
                    if isinstance(response, SipResponse) and response.status >= 200:
                        # Timer K (UDP) would only absorb retransmissions of this final; an
                        # unmatched response is dropped anyway, so nobody need wait for it.
                        self._finish((response, self.record.flow))
                elif isinstance(action, Terminated):
                    dest = self.record.dest
                    if action.outcome is TxOutcome.TIMEOUT:
                        self._finish(TransactionTimeout(
                            f"no final response from {dest.transport} "
                            f"{dest.host}:{dest.port} (Timer F)"))
                    elif action.outcome is TxOutcome.TRANSPORT_ERROR:
                        self._finish(TransportError(self._failure, flow=self.record.flow))
                    else:
                        self._finish(TransportError("transaction ended without a response"))
        finally:
            self._running = False

    def _end(self) -> None:
        self.finished = True
        self.timers.clear()
        self.wake_at = None
        self._pending.clear()
        # The record's ``deliver`` is our bound method: break that cycle, so that the
        # transaction is freed at once rather than by the cyclic collector.
        self.record.deliver = _ignore
        if self._endpoint._client.get(self.key) is self.record:
            del self._endpoint._client[self.key]

    def _finish(self, result: tuple[SipResponse, FlowKey | None] | SipError) -> None:
        self._end()
        self._done(result)


def _ignore(item: _ClientInput) -> None:
    """The ``deliver`` of a finished transaction: what still arrives is dropped."""


class _Dispatcher:
    """The endpoint's ``EventSink``: each transport event is dispatched at once, in the
    transport's task (dispatching never waits: what waits runs in tasks of its own)."""

    def __init__(self, endpoint: SipEndpoint) -> None:
        self._endpoint = endpoint

    async def send(self, value: TransportEvent) -> None:
        self.send_nowait(value)

    def send_nowait(self, value: TransportEvent) -> None:
        try:
            self._endpoint._dispatch(value)
        except Exception:  # a bug on one message must not stop the endpoint
            log.exception("dispatching %s failed", type(value).__name__)


def _fire_due(timers: dict[str, float], now: float, fire: _TimerFire) -> list[Action]:
    """Fire every timer in ``timers`` due at ``now``, earliest first; remove them."""
    actions: list[Action] = []
    for name, when in sorted(timers.items(), key=lambda item: item[1]):
        if when <= now:
            del timers[name]
            actions.extend(fire(name, now))
    return actions


class _TimerFire(Protocol):
    def __call__(self, name: str, now: float) -> list[Action]: ...


# ---------------------------------------------------------------------------------------------
# handles


class ServerInviteHandle:
    """The handler's side of one INVITE server transaction (RFC 3261 §17.2.1, RFC 6026).

    Given to ``InviteHandler.handle_invite``; ``100 Trying`` is already out. Send responses
    built with ``make_response`` (our To tag) or relayed ones (the device's To tag, same
    Vias). Sending never raises for a network failure: the methods return False and
    ``send_failures`` counts them (RFC 6026 §8.8: the transaction carries on).

    Attributes:
        request: the INVITE as received (top Via with ``received``/``rport``).
        source: where it came from.
        to_tag: the To tag of our own responses (the INVITE's own, for a re-INVITE).
        cancelled: True once a matching CANCEL arrived before any final (already answered
            200); ``cancel_reason`` holds its ``Reason`` header values joined by ", "
            (RFC 3326).
        acked: True once the ACK for our non-2xx final arrived.
        terminated: True once the transaction has ended (``outcome`` says how).
        final_status: the status of the first final response sent, None before.
    """

    def __init__(
        self, endpoint: SipEndpoint, record: _ServerTx, tx: ServerInviteTransaction, *,
        managed: bool,
    ) -> None:
        self._endpoint = endpoint
        self._record = record
        self._tx = tx
        self._managed = managed
        assert record.request is not None  # kept by INVITE transactions
        self.request = record.request
        self.source = record.source
        self.to_tag = self.request.to.tag or new_tag()
        self.cancelled = False
        self.cancel_reason: str | None = None
        self.acked = False
        self.terminated = False
        self.final_status: int | None = None
        self.send_failures = 0
        # Made by a waiter only, set and dropped at the next change: most handles are never
        # waited on, and four events each (with their task sets) were a tenth of what a
        # call's transaction kept alive for Timer I.
        self._changed: trio.Event | None = None
        self._on_cancel: Callable[[str | None], None] | None = None

    def __repr__(self) -> str:
        return (f"ServerInviteHandle(branch={self.branch!r}, state={self.state.name}, "
                f"final={self.final_status})")

    @property
    def branch(self) -> str:
        """The INVITE's top Via branch (a CANCEL for it carries the same)."""
        return self._tx.branch

    @property
    def state(self) -> InviteTxState:
        """The transaction's state."""
        return self._tx.state

    @property
    def outcome(self) -> TxOutcome | None:
        """How it ended (``TIMEOUT``: Timer H, no ACK), once terminated; None before."""
        return self._tx.outcome

    @property
    def destination(self) -> Destination:
        """Where responses go (RFC 3261 §18.2.2)."""
        return self._record.dest

    def make_response(self, status: int, reason: str | None = None) -> SipResponse:
        """A response of our own to the INVITE, with ``to_tag`` (none on a 100)."""
        return make_response(self.request, status, reason,
                             to_tag=None if status == 100 else self.to_tag)

    async def send_provisional(self, response: SipResponse) -> bool:
        """Send a 1xx; a retransmitted INVITE gets the last one again.

        Returns:
            True if it went out; False if the transaction is past PROCEEDING or sending
            failed.

        Raises:
            ValueError: not a 1xx.
        """
        if not 100 <= response.status <= 199:
            raise ValueError(f"{response.status} is not a provisional response")
        return await self._endpoint._server_send(self._record, response)

    async def send_final(self, response: SipResponse) -> bool:
        """Send the final response.

        A 300–699 is retransmitted over UDP (Timer G) until the ACK, for at most Timer H;
        a 2xx moves to ACCEPTED for Timer L (see ``send_2xx`` for its retransmissions).

        Returns:
            True if it went out; False if a final was sent before (except a 2xx in
            ACCEPTED, which is sent) or sending failed.

        Raises:
            ValueError: not 200–699.
        """
        if not 200 <= response.status <= 699:
            raise ValueError(f"{response.status} is not a final response")
        return await self._endpoint._server_send(self._record, response)

    async def send_2xx(self, response: SipResponse) -> bool:
        """Send a 2xx, first or again: a proxy relays each 2xx retransmission of the UAS.

        After Timer L has ended the transaction it still goes, statelessly, to the same
        place. After a non-2xx final it is dropped (the call layer ACKs and BYEs it).

        Returns:
            True if it went out.

        Raises:
            ValueError: not a 2xx.
        """
        if not 200 <= response.status <= 299:
            raise ValueError(f"{response.status} is not a 2xx response")
        if self.final_status is not None and self.final_status >= 300:
            return False
        if self._tx.state is InviteTxState.TERMINATED:
            sent = False
            with trio.CancelScope(shield=True):
                sent = await self._endpoint._send_reply(self._record, response.to_bytes())
            return sent
        return await self._endpoint._server_send(self._record, response)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    def _change(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_cancelled(self) -> str | None:
        """Wait for a CANCEL (already answered 200); return its ``Reason`` header, if any."""
        await self._wait_until(lambda: self.cancelled)
        return self.cancel_reason

    def when_cancelled(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(cancel_reason)`` once a CANCEL has come (at once if it has): a
        task-less ``wait_cancelled`` for a handler that must not block on it. One callback
        per handle; it runs in the endpoint's receive path and must not raise."""
        if self.cancelled:
            callback(self.cancel_reason)
        else:
            self._on_cancel = callback

    async def wait_ack(self) -> bool:
        """Wait for the ACK of our non-2xx final: True, or False if the transaction ended
        without one (Timer H, or it was a 2xx, whose ACK goes to ``handle_request``)."""
        await self._wait_until(lambda: self.acked or self.terminated)
        return self.acked

    async def wait_terminated(self) -> TxOutcome | None:
        """Wait until the transaction has ended; return its outcome."""
        await self._wait_until(lambda: self.terminated)
        return self.outcome

    # -- endpoint side --

    def _cancel(self, reason: str | None) -> None:
        if not self.cancelled:
            self.cancel_reason = reason
            self.cancelled = True
            self._change()
            callback, self._on_cancel = self._on_cancel, None
            if callback is not None:
                callback(reason)

    def _acked(self) -> None:
        self.acked = True
        self._change()

    def _ended(self, outcome: TxOutcome | None) -> None:
        self._on_cancel = None  # it may refer to this handle: no cycle outlives the transaction
        self.terminated = True
        self._change()


class ClientInviteHandle:
    """The caller's side of one INVITE client transaction (see ``SipEndpoint.invite``).

    Attributes:
        request: the INVITE as sent (our Via on top); a CANCEL or ACK is built from it.
        branch: its branch: the responses' top Via carries it (``proxy.forward_response``).
        destination: where it was sent; ``flow`` is the flow used, once known.
        final: the first final response, once in.
        cancel_requested / cancel_sent: ``cancel()`` was called / the CANCEL went out.
        cancel_result: the CANCEL's final response, or its ``TransactionTimeout`` /
            ``TransportError``; None while it runs (or if none was sent).
        error: why the transaction ended without a final response, once ``terminated``.
        terminated: set when the transaction is over (Timer D or M included).
    """

    def __init__(
        self, request: SipRequest, branch: str, destination: Destination,
        tx: ClientInviteTransaction, record: _ClientTx,
    ) -> None:
        self.request = request
        self.branch = branch
        self.destination = destination
        self.flow: FlowKey | None = destination.flow
        self.final: SipResponse | None = None
        self.cancel_requested = False
        self.cancel_sent = False
        self.cancel_reason: str | None = None
        self.cancel_result: SipResponse | SipError | None = None
        self.error: SipError | None = None
        self.terminated = trio.Event()
        self._tx = tx
        self._record = record
        self._queue: collections.deque[SipResponse] = collections.deque()
        self._done = False  # no further response will be delivered
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"ClientInviteHandle(branch={self.branch!r}, state={self.state.name})"

    @property
    def state(self) -> InviteTxState:
        """The transaction's state."""
        return self._tx.state

    @property
    def cancel_allowed(self) -> bool:
        """Whether a CANCEL may go now (after a provisional, before a final; §9.1)."""
        return self._tx.cancel_allowed

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the INVITE (RFC 3261 §9.1); ``reason`` is an RFC 3326 Reason value.

        The CANCEL goes at once if a provisional is in, else as soon as one arrives; if a
        final arrives first, none is sent. The INVITE's final (487, or whatever comes)
        still arrives through ``responses()``. Later calls do nothing.
        """
        if self.cancel_requested or self.terminated.is_set():
            return
        self.cancel_requested = True
        self.cancel_reason = reason
        SipEndpoint._notify(self._record, _WAKE)

    def responses(self) -> _InviteResponses:
        """An async iterator over the responses, in order of arrival (100 included).

        It ends after a 300–699 final; after a 2xx it goes on yielding every further 2xx
        (retransmissions, other forks) until Timer M. If the transaction ends with no final
        (Timer B, a transport error or closed flow, the endpoint stopping) it raises that
        ``TransactionTimeout`` / ``TransportError``. Meant for one reader.
        """
        return _InviteResponses(self)

    async def wait_terminated(self) -> None:
        """Wait until the transaction is over."""
        await self.terminated.wait()

    # -- endpoint side --

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _deliver(self, response: SipResponse) -> None:
        if response.status >= 200 and self.final is None:
            self.final = response
        if len(self._queue) >= _INVITE_QUEUE:
            log.warning("INVITE %s: responses not read, dropped a %d", self.branch[-8:],
                        response.status)
        else:
            self._queue.append(response)
        if response.status >= 300:
            self._done = True  # retransmissions of it are absorbed (Timer D)
        self._wake()

    def _finish(self, error: SipError | None) -> None:
        if self.final is None:
            self.error = error
        self._done = True
        self.terminated.set()
        self._wake()


class _InviteResponses:
    """The iterator of ``ClientInviteHandle.responses()``."""

    def __init__(self, handle: ClientInviteHandle) -> None:
        self._handle = handle

    def __aiter__(self) -> _InviteResponses:
        return self

    async def __anext__(self) -> SipResponse:
        handle = self._handle
        await trio.lowlevel.checkpoint()
        while True:
            if handle._queue:
                return handle._queue.popleft()
            if handle._done:
                if handle.error is not None:
                    raise handle.error
                raise StopAsyncIteration
            await handle._changed.wait()
