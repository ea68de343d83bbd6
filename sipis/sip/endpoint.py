"""The trio SIP driver: client and server transactions over a ``Transport``, requests to a handler.

Strategy: the transaction machines (``sipis.sip.transaction``) decide; this module carries out
their actions on trio's clock. A client request runs inline in the caller's task: the task
sends, sleeps until the next timer or a matching response, feeds the machine, and returns the
final response or raises. Server transactions live in a table; their timers sit in one heap
served by one task. Everything the transport reports arrives on one channel and is dispatched
synchronously; anything that waits (a handler, a send) runs in a task of this endpoint's own
nursery.

Rules:

- ``request`` adds our top Via (``branch`` fresh per attempt, ``rport``, RFC 3581) and tries
  the targets in order (RFC 3263 §4.3): Timer F or a transport error moves on to the next
  one. Targets outside ``upstream_allow`` are never contacted (our SSRF guard); if none is
  left, ``TransportError("destination not allowed")`` is raised before anything is sent.
- Responses match a client transaction by top Via branch and CSeq method (RFC 3261
  §17.1.3). Provisionals are absorbed; the first final is returned. A response matching no
  transaction is dropped (this also absorbs final retransmissions, Timer K's only job).
- An incoming request gets ``received``/``rport`` on its top Via (RFC 3261 §18.2.1, RFC
  3581), then a server transaction keyed by (branch, sent-by, method) (§17.2.3).
  Retransmissions are absorbed by it (or answered with the last response). The handler runs
  once per transaction; its exception becomes a 500, and a ``None`` means no response.
- INVITE is minimal for now: 100 Trying at once, the handler once per branch, its final
  resent on INVITE retransmissions, an ACK for it absorbed. Any other ACK goes to the handler
  and is never answered.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import attrs
import trio

from sipis.sip.dns import DEFAULT_PORTS, Target
from sipis.sip.errors import SipError, TransactionTimeout, TransportError, excerpt
from sipis.sip.headers import Via
from sipis.sip.message import (
    MAX_MESSAGE_SIZE,
    SipRequest,
    SipResponse,
    make_response,
    new_branch,
    new_tag,
)
from sipis.sip.transaction import (
    Action,
    Deliver,
    NonInviteClientTransaction,
    Send,
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
    "ClientResult",
    "EndpointConfig",
    "EndpointStatistics",
    "FlowKey",
    "ListenSpec",
    "RequestHandler",
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

#: Transport events waiting for the dispatcher; beyond that the transports wait.
EVENT_QUEUE = 1000

#: Closed-flow notices kept per subscriber that has not read them yet.
FLOW_EVENT_BUFFER = 256

#: Handlers running at once; further requests get 503 at once (overload guard).
MAX_CONCURRENT_HANDLERS = 1000

#: An INVITE server transaction still waiting for its handler is forgotten after this (s).
INVITE_PENDING_LIFETIME = 3600.0

#: Responses queued for one client transaction (retransmissions beyond are dropped).
_CLIENT_INBOX = 16


@attrs.frozen
class EndpointConfig:
    """What the endpoint needs from the ``sip`` section of the configuration.

    ``upstream_allow``: networks that ``request`` may send to; empty allows nothing.
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
    target: Target
    flow: FlowKey | None


class RequestHandler(Protocol):
    """Answers requests that reach our listeners (the calls layer)."""

    async def handle_request(self, request: SipRequest, source: Source) -> SipResponse | None:
        """Return the response to send, or None to send nothing (ACK, or answered later)."""


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


@attrs.define(eq=False)
class _ClientTx:
    target: Target
    inbox: trio.MemorySendChannel[SipResponse | _TransportFailure]
    flow: FlowKey | None = None


@attrs.define(eq=False)
class _ServerTx:
    key: tuple[str, str, str]
    method: str
    source: Source
    dest: Destination
    tx: ServerNonInviteTransaction | None  # None for INVITE (minimal handling, see rules)
    expires_at: float
    last_final: bytes | None = None


def _allowed(host: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return any(address in network for network in networks)


def _normal_ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


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


class SipEndpoint:
    """The SIP endpoint of sipis (see the module rules).

    Args:
        config: listeners, public host, timers and limits.
        handler: gets every new incoming request.
        transport: the transport to use; by default the network one built from ``config``
            (tests pass a ``MemoryTransport``).
    """

    def __init__(
        self, config: EndpointConfig, *, handler: RequestHandler,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self._handler = handler
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
        self._timers: list[tuple[float, int, tuple[str, str, str]]] = []
        self._timer_seq = 0
        self._timer_wakeup = trio.Event()
        self._subscribers: list[trio.MemorySendChannel[FlowKey]] = []
        self._handlers_running = 0
        self._requests_received = 0
        self._responses_unmatched = 0
        self._handler_errors = 0

    # -- lifecycle and addresses --

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every listener, report started, then serve until cancelled.

        Raises:
            TransportError: a listener cannot be bound.
        """
        send, receive = trio.open_memory_channel[TransportEvent](EVENT_QUEUE)
        started = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._transport.run, send)
                self._nursery = nursery
                nursery.start_soon(self._dispatch_loop, receive)
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

    # -- client side --

    async def request(self, request: SipRequest, targets: Sequence[Target]) -> ClientResult:
        """Send a non-INVITE request and wait for its final response, failing over.

        Args:
            request: the request without our Via (we add it; the object is not changed).
            targets: RFC 3263 targets in failover order.

        Returns:
            The first final response, the target that sent it and the flow used.

        Raises:
            TransportError: no allowed target ("destination not allowed"), or the last
                allowed target failed at the transport level.
            TransactionTimeout: the last allowed target did not answer before Timer F.
            ValueError: an INVITE or ACK (not supported here yet).
        """
        if request.method in ("INVITE", "ACK"):
            raise ValueError(f"{request.method} needs its own transaction kind (RFC 3261 §17.1.1)")
        allowed = []
        for target in targets:
            if _allowed(target.host, self.config.upstream_allow):
                allowed.append(target)
            else:
                log.warning("%s to %s refused: destination not allowed", request.method,
                            excerpt(target.host))
        if not allowed:
            raise TransportError("destination not allowed")
        if self._nursery is None:
            raise TransportError("the SIP endpoint is not running")
        error: SipError = TransportError("no target")
        for target in allowed:
            try:
                return await self._attempt(request, target)
            except (TransactionTimeout, TransportError) as exc:
                log.info("%s to %s %s:%d failed: %s", request.method, target.transport,
                         target.host, target.port, exc)
                error = exc
        raise error

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

    async def _attempt(self, request: SipRequest, target: Target) -> ClientResult:
        """One client transaction to one target (RFC 3261 §17.1.2)."""
        if target.transport not in TRANSPORTS:
            raise TransportError(f"unsupported transport {excerpt(target.transport)}")
        branch = new_branch()
        outgoing = SipRequest(request.method, request.uri, request.headers.copy(), request.body)
        outgoing.headers.prepend("Via", str(self._via(target.transport, branch)))
        if "Max-Forwards" not in outgoing.headers:
            outgoing.headers.add("Max-Forwards", DEFAULT_MAX_FORWARDS)
        tx = NonInviteClientTransaction(
            branch=branch, data=outgoing.to_bytes(), reliable=target.transport != "udp",
            timers=self.config.timers)
        send, inbox = trio.open_memory_channel[SipResponse | _TransportFailure](_CLIENT_INBOX)
        record = _ClientTx(target, send)
        key = (branch, request.method)
        self._client[key] = record
        dest = Destination(target.transport, target.host, target.port,
                           server_name=target.server_name)
        timers: dict[str, float] = {}
        failure = "transport error"
        try:
            actions: collections.deque[Action] = collections.deque(tx.start(trio.current_time()))
            final: SipResponse | None = None
            while True:
                while actions:
                    action = actions.popleft()
                    if isinstance(action, Send):
                        try:
                            flow = await self._transport.send(action.data, dest)
                        except TransportError as exc:
                            failure = str(exc)
                            record.flow = record.flow or _flow_of(exc)
                            actions.extend(tx.transport_error(trio.current_time()))
                        else:
                            if flow is not None:
                                record.flow = flow
                                dest = attrs.evolve(dest, flow=flow)
                    elif isinstance(action, StartTimer):
                        timers[action.name] = action.deadline
                    elif isinstance(action, StopTimer):
                        timers.pop(action.name, None)
                    elif isinstance(action, Deliver):
                        response = action.response
                        if isinstance(response, SipResponse) and response.status >= 200:
                            final = response
                    elif isinstance(action, Terminated):
                        if action.outcome is TxOutcome.TIMEOUT:
                            raise TransactionTimeout(
                                f"no final response from {target.transport} "
                                f"{target.host}:{target.port} (Timer F)")
                        if action.outcome is TxOutcome.TRANSPORT_ERROR:
                            raise TransportError(failure, flow=record.flow)
                if final is not None:
                    # Timer K (UDP) would only absorb retransmissions of this final; an
                    # unmatched response is dropped anyway, so the caller need not wait.
                    return ClientResult(final, target, record.flow)
                more, reason = await self._next_client_input(tx, inbox, timers)
                actions.extend(more)
                failure = reason or failure
        finally:
            self._client.pop(key, None)
            send.close()

    async def _next_client_input(
        self,
        tx: NonInviteClientTransaction,
        inbox: trio.MemoryReceiveChannel[SipResponse | _TransportFailure],
        timers: dict[str, float],
    ) -> tuple[list[Action], str | None]:
        """Wait for a response, a transport failure or the earliest timer; feed it to ``tx``.

        Returns the machine's actions, and the failure text for a transport failure.
        """
        deadline = min(timers.values(), default=math.inf)
        with trio.move_on_at(deadline):
            item = await inbox.receive()
            now = trio.current_time()
            if isinstance(item, _TransportFailure):
                return tx.transport_error(now), item.reason
            return tx.receive_response(item.status, item, now), None
        now = trio.current_time()
        actions: list[Action] = []
        for name, when in sorted(timers.items(), key=lambda item: item[1]):
            if when <= now:
                del timers[name]
                actions.extend(tx.timer_fired(name, now))
        return actions, None

    # -- dispatch --

    async def _dispatch_loop(self, receive: trio.MemoryReceiveChannel[TransportEvent]) -> None:
        async with receive:
            async for event in receive:
                try:
                    self._dispatch(event)
                except Exception:  # a bug on one message must not stop the endpoint
                    log.exception("dispatching %s failed", type(event).__name__)

    def _dispatch(self, event: TransportEvent) -> None:
        if isinstance(event, MessageReceived):
            if isinstance(event.message, SipResponse):
                self._response_received(event.message)
            else:
                self._request_received(event.message, event.source)
        elif isinstance(event, FlowClosed):
            self._flow_closed(event)
        elif isinstance(event, Unreachable):
            for record in list(self._client.values()):
                target = record.target
                if (target.transport, _normal_ip(target.host), target.port) == (
                        event.transport, _normal_ip(event.host), event.port):
                    self._notify(record, _TransportFailure(
                        f"{event.transport} {event.host}:{event.port} unreachable: "
                        f"{event.reason}", None))

    def _response_received(self, response: SipResponse) -> None:
        via = response.top_via
        record = self._client.get((via.branch or "", response.cseq.method))
        if record is None:
            self._responses_unmatched += 1
            log.debug("dropped a %d response matching no transaction", response.status)
            return
        self._notify(record, response)

    @staticmethod
    def _notify(record: _ClientTx, item: SipResponse | _TransportFailure) -> None:
        # Dropped on a flood of retransmissions, or when the transaction just ended.
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                 trio.ClosedResourceError):
            record.inbox.send_nowait(item)

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
        assert self._nursery is not None
        via = self._mark_received(request, source)
        method = request.method
        now = trio.current_time()
        if method == "ACK":
            invite = self._server.get(_server_key(request, "INVITE"))
            if invite is None:  # an ACK for a 2xx, or stray: the handler decides
                self._handlers_running += 1
                self._nursery.start_soon(self._handle, None, request, source)
            return
        key = _server_key(request, method)
        record = self._server.get(key)
        if record is not None:  # a retransmission
            if record.tx is not None:
                self._nursery.start_soon(self._execute, record, record.tx.receive_request(now))
            elif record.last_final is not None:
                self._nursery.start_soon(self._send_reply, record, record.last_final)
            return
        reliable = source.transport != "udp"
        if method == "INVITE":
            tx = None
            expires = now + INVITE_PENDING_LIFETIME
        else:
            tx = ServerNonInviteTransaction(branch=key[0], reliable=reliable,
                                            timers=self.config.timers)
            expires = now + 64 * self.config.timers.t1  # the client gives up by then
        record = _ServerTx(key, method, source, _reply_destination(via, source), tx, expires)
        self._server[key] = record
        self._schedule(record)
        if self._handlers_running >= MAX_CONCURRENT_HANDLERS:
            log.warning("too many requests in progress; answering 503")
            busy = make_response(request, 503, to_tag=new_tag())
            busy.headers.add("Retry-After", "5")
            self._nursery.start_soon(self._respond, record, busy)
            return
        self._handlers_running += 1
        self._nursery.start_soon(self._handle, record, request, source)

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
            if record is not None and record.tx is None:  # INVITE: stop retransmissions
                await self._send_reply(record, make_response(request, 100).to_bytes())
            try:
                response = await self._handler.handle_request(request, source)
            except Exception:
                self._handler_errors += 1
                log.exception("handler failed on %s", request.method)
                response = make_response(request, 500, to_tag=new_tag())
            if record is None or response is None:
                return
            await self._respond(record, response)
        finally:
            self._handlers_running -= 1

    async def send_response(self, response: SipResponse, source: Source) -> None:
        """Send a response to a request received from ``source`` (provisionals, late finals).

        It goes through the request's server transaction if that still exists, else
        straight to where §18.2.2 says.

        Raises:
            TransportError: it could not be sent.
        """
        key = _server_key(response, response.cseq.method)
        record = self._server.get(key)
        if record is None:
            dest = _reply_destination(response.top_via, source)
            await self._transport.send(response.to_bytes(), dest)
            return
        await self._respond(record, response)

    async def _respond(self, record: _ServerTx, response: SipResponse) -> None:
        data = response.to_bytes()
        now = trio.current_time()
        if record.tx is not None:
            await self._execute(record, record.tx.send_response(response.status, data, now))
            return
        if response.status >= 200:  # INVITE: keep the final for retransmitted INVITEs
            record.last_final = data
            record.expires_at = now + 64 * self.config.timers.t1
            self._schedule(record)
        await self._send_reply(record, data)

    async def _execute(self, record: _ServerTx, actions: list[Action]) -> None:
        """Carry out a server transaction's actions."""
        queue = collections.deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Send):
                if not await self._send_reply(record, action.data) and record.tx is not None:
                    queue.extend(record.tx.transport_error(trio.current_time()))
            elif isinstance(action, StartTimer):
                record.expires_at = action.deadline
                self._schedule(record)
            elif isinstance(action, Terminated) and self._server.get(record.key) is record:
                del self._server[record.key]

    async def _send_reply(self, record: _ServerTx, data: bytes) -> bool:
        """Send a response on the record's way back; False (logged) if that failed."""
        try:
            flow = await self._transport.send(data, record.dest)
        except TransportError as exc:
            log.info("response to %s %s:%d not sent: %s", record.dest.transport,
                     record.dest.host, record.dest.port, exc)
            return False
        if flow is not None and flow != record.dest.flow:
            record.dest = attrs.evolve(record.dest, flow=flow)
        return True

    # -- server timers --

    def _schedule(self, record: _ServerTx) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (record.expires_at, self._timer_seq, record.key))
        self._timer_wakeup.set()

    async def _timer_loop(self) -> None:
        """Fire Timer J and the clean-up deadlines of server transactions."""
        while True:
            deadline = self._timers[0][0] if self._timers else math.inf
            with trio.move_on_at(deadline):
                await self._timer_wakeup.wait()
            self._timer_wakeup = trio.Event()
            now = trio.current_time()
            while self._timers and self._timers[0][0] <= now:
                _, _, key = heapq.heappop(self._timers)
                record = self._server.get(key)
                if record is None or record.expires_at > now:
                    continue  # gone, or rescheduled later
                if record.tx is not None:
                    record.tx.timer_fired("J", now)
                del self._server[key]


def _flow_of(exc: TransportError) -> FlowKey | None:
    return exc.flow if isinstance(exc.flow, FlowKey) else None
