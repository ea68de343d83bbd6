"""The trio call driver: carries out what ``IncomingCall`` and ``DeviceRegistrar`` decide.

It is the endpoint's ``InviteHandler``: every request that reaches sipis's SIP listeners comes
here. The sans-IO machines decide; this module runs their actions on trio's clock (timers with
``trio.sleep_until`` in the call's own nursery), sends pushes through the dispatcher, and
proxies the call to the woken device with ``sipis.sip.proxy``.

Rules (SPEC.md "SIP behaviour"):

- OPTIONS → 200 with Allow. ACK without a Route of ours → absorbed. CANCEL/BYE outside a
  dialog → 481. Unknown methods → 405. A Request-URI whose host is not ours, on a request that
  carries no Route of ours → 403: nothing is relayed anywhere but along a dialog we
  record-routed.
- REGISTER (to us) → ``DeviceRegistrar`` (realm = ``service.policy.realm``, HA1 from
  ``service.device_ha1_cached``). An authenticated REGISTER is "heard from the device"
  (``service.touch``, awaited). ADDED/REFRESHED bindings wake the held calls of the instance.
- INVITE to a contact token → one ``IncomingCall``, run inside ``handle_invite`` for the
  call's whole life. Unknown token → 404; Max-Forwards 0 → 483.
- Forwarded INVITEs carry a double (or single) Record-Route whose token names the instance
  by its **contact token** (already known to the provider: it is the Request-URI user), not
  by the instance id, which the provider never needs to learn.
- In-dialog requests (a Route of ours): ``process_route``; toward the device they go to the
  dialog's device destination (the binding's source and flow); toward the provider only to
  the address the initial INVITE came from (kept per Call-ID in a bounded table), else 403.
  ACK statelessly, re-INVITE through a client INVITE transaction, the others through
  ``endpoint.request``; the response is relayed back.
- MESSAGE to a contact token → held in the store (encrypted, ``calls.message_retention``,
  at most ``calls.max_held_messages`` per instance, then 486) and 200; then an alert push
  naming the sender (the text only when ``push.message_body``) unless a device binding is
  live. Is-composing (RFC 3994) bodies are answered 200 and neither held nor pushed. Held
  messages are delivered as MESSAGEs from sipis (a UAC of its own: From/To of the original,
  a new Call-ID, ``Date`` of reception) over the binding, in order, whenever the device
  REGISTERs, and when one arrives while a binding is live. A 2xx or a permanent refusal drops
  the message; a timeout, transport error or 408/480/503 keeps it for the next REGISTER.
- Every finished call leaves a call record (``GET /v1/instances/{id}/calls``), purged after
  ``calls.call_record_retention``, like expired messages, by a task of ``run``.
- Wipes from anywhere (API, sweeper, CLI, dead tokens) reach ``forget_instance``: the
  instance's device bindings go with it.

Keys: the nonce key and the Record-Route key are given by the daemon, derived from the store
key ring (stable across restarts); random per driver when not given (tests).
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs
import trio

from sipis import randomness
from sipis.calls.call import (
    CallAction,
    CallConfig,
    CallEvent,
    CallState,
    Cancel,
    Decline,
    DeviceReady,
    DeviceResponse,
    DeviceUnreachable,
    Finished,
    ForwardCancel,
    ForwardInvite,
    IncomingCall,
    InviteReceived,
    Progress,
    PushAccepted,
    PushFailed,
    RelayResponse,
    SendFinal,
    SendProvisional,
    SendPush,
    StartTimer,
    StopTimer,
    TimerFired,
    WipeInstance,
)
from sipis.calls.device import DeviceBinding, DeviceRegistrar, NonceIssuer
from sipis.push.base import (
    InvalidToken,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
    PushStart,
    PushTarget,
)
from sipis.sip.endpoint import ClientInviteHandle, ClientResult, ServerInviteHandle
from sipis.sip.errors import SipError, SipParseError, TransactionTimeout, TransportError
from sipis.sip.headers import URI, Address, Via
from sipis.sip.message import (
    Headers,
    SipRequest,
    SipResponse,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
)
from sipis.sip.proxy import (
    ProxyError,
    ProxyIdentity,
    RecordRouteSigner,
    RelayRefused,
    is_ours_for,
    nat_target,
    parse_record_route_token,
    process_route,
)
from sipis.sip.proxy import forward_request as proxy_forward_request
from sipis.sip.proxy import forward_response as proxy_forward_response
from sipis.sip.transport import Destination, FlowKey, Source
from sipis.store.errors import NotFound, StoreError
from sipis.store.models import CallRecord, HeldMessage, InstanceRecord

__all__ = ["ALLOW", "CallDriver", "DriverSettings"]

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, REGISTER, UPDATE, INFO"

#: Dialogs remembered for in-dialog routing (oldest forgotten first).
MAX_DIALOGS = 10_000

#: How long a dialog is remembered without a BYE (s).
DIALOG_LIFETIME = 12 * 3600.0

#: Deadline for call-ended, message and instance-expiring pushes (s).
ALERT_PUSH_DEADLINE = 30.0

#: instance-expiring pushes in flight at once.
EXPIRY_PUSHES_AT_ONCE = 50

#: Call records finished within this window (s) are written together, in one transaction.
RECORD_BATCH_DELAY = 1.0

#: How often expired messages and old call records are purged (s).
PURGE_INTERVAL = 300.0

#: Final answers of a device to a held MESSAGE that keep it for the next REGISTER.
_RETRY_LATER = frozenset({408, 480, 500, 503, 504})

_IS_COMPOSING = "application/im-iscomposing+xml"


# --- what the driver needs from the rest of sipis ------------------------------------------


class DriverStore(Protocol):
    async def get_by_contact_token(self, token: str) -> InstanceRecord: ...

    async def hold_message(self, msg: HeldMessage, *, max_per_instance: int) -> bool: ...

    async def held_messages(self, instance_id: str) -> list[HeldMessage]: ...

    async def drop_message(self, message_id: str) -> bool: ...

    async def add_call_records(self, records: Sequence[CallRecord]) -> None: ...

    async def call_records(self, instance_id: str, *, limit: int = 500) -> list[CallRecord]: ...

    async def purge(self, *, now: float, records_ended_before: float) -> tuple[int, int]: ...


class DriverPolicy(Protocol):
    @property
    def realm(self) -> str: ...


class DriverService(Protocol):
    """The parts of ``InstanceService`` the driver calls."""

    @property
    def policy(self) -> DriverPolicy: ...

    def device_ha1_cached(self, instance_id: str, algorithm: str) -> str | None: ...

    def kept_record_by_contact_token(self, token: str) -> InstanceRecord | None: ...

    async def touch(self, instance_id: str) -> InstanceRecord: ...

    async def wipe(self, instance_id: str, reason: str) -> bool: ...


class DriverPush(Protocol):
    def start(self, request: PushRequest) -> PushStart | None: ...

    async def send(self, request: PushRequest, *, deadline: float,
                   started: PushStart | None = None) -> PushResult: ...


class DriverEndpoint(Protocol):
    """The parts of ``SipEndpoint`` the driver calls."""

    def contact_host_port(self, transport: str) -> tuple[str, int]: ...

    async def invite(self, request: SipRequest, destination: Destination, *,
                     replace_top_via: bool = False) -> ClientInviteHandle: ...

    async def request(self, request: SipRequest, targets: list[Destination], *,
                      replace_top_via: bool = False) -> ClientResult: ...

    async def send_request_stateless(self, request: SipRequest, destination: Destination, *,
                                     add_via: bool = False) -> FlowKey | None: ...

    def flow_closed_channel(self) -> trio.MemoryReceiveChannel[FlowKey]: ...


class CallMetrics(Protocol):
    def call_push_accepted(self, seconds: float) -> None:
        """Seconds from the INVITE's arrival to the push service's acceptance of its push."""


@attrs.frozen
class DriverSettings:
    """Configuration of the driver (from ``sip``, ``calls`` and ``push``)."""

    public_host: str
    local_hosts: frozenset[str]
    transports: tuple[str, ...] = ("udp", "tcp")
    call: CallConfig = attrs.Factory(CallConfig)
    message_body: bool = False
    min_expires: int = 60
    max_expires: int = 3600
    message_retention: float = 7 * 86400.0
    max_held_messages: int = 100
    call_record_retention: float = 7 * 86400.0


@attrs.define(eq=False)
class _Dialog:
    """A dialog sipis record-routed: where each side is reached."""

    token: str  # the instance's contact token (the Record-Route token names it)
    upstream: Destination
    device: Destination
    created: float


@attrs.define(eq=False)
class _Call:
    """The running state of one call (the machine plus the driver's handles)."""

    machine: IncomingCall
    record: InstanceRecord
    request: SipRequest
    source: Source
    tx: ServerInviteHandle
    ref: str
    events: trio.MemorySendChannel[CallEvent]
    nursery: trio.Nursery  # the call push, the device leg: cancelled when the call ends
    outer: trio.Nursery  # call-ended pushes and 2xx retransmissions: awaited
    timers: dict[str, float] = attrs.Factory(dict)  # name → deadline (trio time)
    client: ClientInviteHandle | None = None
    record_route: list[str] = attrs.Factory(list)
    finished: bool = False
    final_status: int | None = None  # of the final we sent upstream
    started_at: float = 0.0  # unix time of the INVITE
    invite_at: float = 0.0  # trio time the INVITE reached the driver (latency metric)

    def report(self, event: CallEvent) -> None:
        # The call is over: late news is dropped, as the machine would drop it.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError,
                                 trio.WouldBlock):
            self.events.send_nowait(event)


def _push_target(record: InstanceRecord) -> PushTarget:
    return PushTarget(provider=record.push_provider, token=record.push_token, app=record.app,
                      environment=record.push_environment)


def _short(value: str) -> str:
    return value[:8]


def _respond(request: SipRequest, status: int, reason: str | None = None) -> SipResponse:
    return make_response(request, status, reason, to_tag=new_tag())


class CallDriver:
    """``RequestHandler`` + ``InviteHandler`` of the endpoint (see the module rules).

    Built before the endpoint (which needs its handler); ``attach`` gives it the endpoint and
    the instance service once they exist, and ``run`` serves the flow-closed notices.
    Until ``attach``, calls, messages and REGISTERs are answered 503.
    """

    def __init__(
        self,
        *,
        store: DriverStore,
        push: DriverPush,
        settings: DriverSettings,
        nonce_key: bytes | None = None,
        signer_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
        metrics: CallMetrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._push = push
        self.settings = settings
        self._local_hosts = frozenset(h.lower() for h in settings.local_hosts)
        self._clock = clock
        self.registrar = DeviceRegistrar(
            "sipis",
            nonce_issuer=NonceIssuer(nonce_key or secrets.token_bytes(32)),
            ha1_lookup=self._ha1,
            min_expires=settings.min_expires,
            max_expires=settings.max_expires,
            default_expires=settings.max_expires,
        )
        self.signer = RecordRouteSigner(signer_key or secrets.token_bytes(32))
        self._endpoint: DriverEndpoint | None = None
        self._service: DriverService | None = None
        self._waiting: dict[str, set[_Call]] = {}  # instance → its calls (DeviceReady)
        self._dialogs: collections.OrderedDict[str, _Dialog] = collections.OrderedDict()
        self._calls: dict[tuple[str, str], _Call] = {}
        self._nursery: trio.Nursery | None = None
        self._is_ours: Callable[[URI], bool] = lambda uri: False
        self._delivering: set[str] = set()  # instances whose held messages are being sent
        self._draining = False  # stopping: new calls are refused, calls in progress go on
        self._expiry_pushes = trio.CapacityLimiter(EXPIRY_PUSHES_AT_ONCE)
        self._unsaved_records: list[CallRecord] = []
        self._records_due = trio.Event()
        self.outcomes: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"CallDriver(calls={len(self._calls)}, dialogs={len(self._dialogs)})"

    # -- composition -------------------------------------------------------------------------

    def attach(self, *, endpoint: DriverEndpoint, service: DriverService) -> None:
        """Late-bind the endpoint (running) and the instance service."""
        self._endpoint = endpoint
        self._service = service
        identities = [self._identity(t) for t in self.settings.transports]
        ports = {i.port for i in identities}
        self._is_ours = is_ours_for(
            identities, extra_hosts=[(h, p) for h in self._local_hosts for p in ports])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the background tasks (message pushes) and drop bindings of closed flows."""
        endpoint = self._need_endpoint()
        closed = endpoint.flow_closed_channel()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._purge_forever)
            nursery.start_soon(self._write_records)
            task_status.started()
            try:
                async for flow in closed:
                    for change in self.registrar.bindings.remove_flow(flow):
                        log.info("instance=%s device flow closed; binding dropped",
                                 _short(change.binding.instance_id))
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def reconfigure(self, settings: DriverSettings) -> None:
        """SIGHUP: new timers, limits and bounds for calls, messages and device REGISTERs
        from now on; calls in progress keep the timers they started with."""
        self.settings = settings
        self._local_hosts = frozenset(h.lower() for h in settings.local_hosts)
        self.registrar.min_expires = settings.min_expires
        self.registrar.max_expires = settings.max_expires
        self.registrar.default_expires = settings.max_expires

    def drain(self) -> None:
        """Graceful stop: refuse new calls (503 with Retry-After, so the provider tries another
        contact of the user or again later); calls in progress and dialogs go on."""
        self._draining = True

    @property
    def busy(self) -> int:
        """Calls in progress plus established dialogs routed through us."""
        return len(self._calls) + len(self._dialogs)

    async def wait_idle(self, poll: float = 0.1) -> None:
        """Return once no call is in progress and every dialog has ended (BYE seen)."""
        while self.busy:
            await trio.sleep(poll)

    async def _write_records(self) -> None:
        """The call-record writer: batches off the call path; what is left is written,
        shielded, when the driver stops."""
        try:
            while True:
                await self._records_due.wait()
                await trio.sleep(RECORD_BATCH_DELAY)
                await self.flush_records()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await self.flush_records()

    async def flush_records(self) -> None:
        """Write the queued call records now."""
        batch, self._unsaved_records = self._unsaved_records, []
        self._records_due = trio.Event()
        try:
            await self._store.add_call_records(batch)
        except StoreError:
            log.exception("%d call records not kept", len(batch))

    async def _purge_forever(self) -> None:
        while True:
            await self.purge()
            await trio.sleep(PURGE_INTERVAL)

    async def purge(self) -> tuple[int, int]:
        """Drop expired held messages and call records past their retention."""
        now = self._clock()
        try:
            dropped = await self._store.purge(
                now=now, records_ended_before=now - self.settings.call_record_retention)
        except StoreError:
            log.exception("purge of held messages and call records failed")
            return 0, 0
        if any(dropped):
            log.info("purged %d expired messages and %d old call records", *dropped)
        return dropped

    def forget_instance(self, instance_id: str, reason: str = "") -> None:
        """The instance was wiped (by any path): its device bindings go too."""
        removed = self.registrar.bindings.remove_instance(instance_id)
        if removed:
            log.info("instance=%s device bindings dropped with the instance",
                     _short(instance_id))

    async def call_records(self, instance_id: str) -> list[CallRecord]:
        """``GET /v1/instances/{id}/calls``: newest first, within the retention."""
        await self.flush_records()  # calls that ended a moment ago are shown too
        cutoff = self._clock() - self.settings.call_record_retention
        return [r for r in await self._store.call_records(instance_id) if r.ended_at >= cutoff]

    def _need_endpoint(self) -> DriverEndpoint:
        if self._endpoint is None:
            raise RuntimeError("CallDriver.attach() was not called")
        return self._endpoint

    def _identity(self, transport: str) -> ProxyIdentity:
        endpoint = self._need_endpoint()
        transport = transport.lower()
        try:
            _, port = endpoint.contact_host_port(transport)
        except LookupError:
            _, port = endpoint.contact_host_port(self.settings.transports[0])
        return ProxyIdentity(self.settings.public_host, port, transport)

    def _ha1(self, instance_id: str, algorithm: str) -> str | None:
        if self._service is None:
            return None
        return self._service.device_ha1_cached(instance_id, algorithm)

    # -- the fast channel (the HTTPS API calls these) ------------------------------------------

    def progress(self, instance_id: str, call_ref: str) -> bool:
        """``POST …/progress``: the device is waking up; False if no such call rings."""
        return self._feed(instance_id, call_ref, Progress())

    def decline(self, instance_id: str, call_ref: str) -> bool:
        """``POST …/decline``: the user declined; False if no such call rings."""
        return self._feed(instance_id, call_ref, Decline())

    def _feed(self, instance_id: str, call_ref: str, event: CallEvent) -> bool:
        call = self._calls.get((instance_id, call_ref))
        if call is None or call.finished:
            return False
        call.report(event)
        return True

    # -- RequestHandler ------------------------------------------------------------------------

    async def handle_request(self, request: SipRequest, source: Source) -> SipResponse | None:
        """Everything but INVITE (see the module rules)."""
        method = request.method
        try:
            in_dialog = self._has_our_route(request)
        except SipParseError:
            return None if method == "ACK" else _respond(request, 400)
        if in_dialog:
            return await self._in_dialog(request)
        if method == "ACK":
            return None
        if request.uri.host.lower() not in self._local_hosts:
            return _respond(request, 403, "Relaying Forbidden")
        if method == "OPTIONS":
            response = _respond(request, 200)
            response.headers.add("Allow", ALLOW)
            return response
        if method in ("CANCEL", "BYE"):
            return _respond(request, 481)
        if method == "REGISTER":
            return await self._register(request, source)
        if method == "MESSAGE":
            return await self._message(request)
        response = _respond(request, 405)
        response.headers.add("Allow", ALLOW)
        return response

    async def _lookup(self, request: SipRequest) -> InstanceRecord | SipResponse:
        token = request.uri.user
        if not token:
            return _respond(request, 404)
        if self._service is not None:  # the hot path: no store read when the keeper has it
            kept = self._service.kept_record_by_contact_token(token)
            if kept is not None:
                return kept
        try:
            return await self._store.get_by_contact_token(token)
        except NotFound:
            return _respond(request, 404)
        except StoreError:
            log.exception("store lookup failed for an incoming %s", request.method)
            return _respond(request, 500)

    # -- REGISTER ------------------------------------------------------------------------------

    async def _register(self, request: SipRequest, source: Source) -> SipResponse:
        service = self._service
        if service is None:
            return _respond(request, 503)
        self.registrar.realm = service.policy.realm
        result = self.registrar.handle_register(request, source, trio.current_time())
        if result.instance_id is not None:
            try:
                await service.touch(result.instance_id)
            except NotFound:
                log.info("instance=%s REGISTER for an instance that is gone",
                         _short(result.instance_id))
                return _respond(request, 404)
            except StoreError:
                log.exception("instance=%s touch failed", _short(result.instance_id))
        woken = {c.binding.instance_id for c in result.changes if c.kind.reachable}
        for instance_id in woken:
            self._wake(instance_id)
            self._start_delivery(instance_id)
        if result.instance_id is not None:
            log.info("instance=%s device REGISTER → %d", _short(result.instance_id),
                     result.response.status)
        return result.response

    def _wake(self, instance_id: str) -> None:
        """The instance's device registered: ``DeviceReady`` to each call waiting for it."""
        calls = self._waiting.get(instance_id)
        if not calls:
            return
        binding = self._live_binding(instance_id)
        if binding is None:
            return
        for call in list(calls):
            if call.machine.state in (CallState.ALERTING, CallState.PROGRESS):
                call.report(DeviceReady(binding))

    def _live_binding(self, instance_id: str) -> DeviceBinding | None:
        live = self.registrar.bindings.live(instance_id, trio.current_time())
        return live[0] if live else None

    def _binding_destination(self, binding: DeviceBinding) -> Destination:
        transport, host, port = nat_target(
            (binding.transport, binding.host, binding.port), binding.contact)
        flow = binding.flow if isinstance(binding.flow, FlowKey) else None
        return Destination(transport, host, port, flow=flow, flow_only=flow is not None)

    # -- MESSAGE -------------------------------------------------------------------------------

    async def _message(self, request: SipRequest) -> SipResponse:
        found = await self._lookup(request)
        if isinstance(found, SipResponse):
            return found
        record = found
        full_type = (request.headers.get("Content-Type") or "text/plain").strip()
        content_type = full_type.split(";")[0].strip().lower()
        if content_type == _IS_COMPOSING:
            return _respond(request, 200)
        now = self._clock()
        held = HeldMessage(
            id=randomness.token_hex(12), instance_id=record.id, received_at=now,
            expires_at=now + self.settings.message_retention,
            from_=str(attrs.evolve(request.from_, params=tuple(
                (k, v) for k, v in request.from_.params if k.lower() != "tag"))),
            to=str(attrs.evolve(request.to, params=())), content_type=full_type,
            body=request.body)
        try:
            kept = await self._store.hold_message(
                held, max_per_instance=self.settings.max_held_messages)
        except NotFound:
            return _respond(request, 404)
        except StoreError:
            log.exception("instance=%s MESSAGE could not be held", _short(record.id))
            return _respond(request, 500)
        if not kept:
            log.info("instance=%s MESSAGE refused: %d already held", _short(record.id),
                     self.settings.max_held_messages)
            return _respond(request, 486, "Busy Here")
        if self._live_binding(record.id) is not None:
            self._start_delivery(record.id)
            log.info("instance=%s MESSAGE held, delivering to the live binding",
                     _short(record.id))
            return _respond(request, 200)
        body: str | None = None
        if self.settings.message_body and content_type.startswith("text/"):
            body = request.body.decode("utf-8", "replace")
        push = self._push_request(record, request, PushKind.MESSAGE, call=None, body=body)
        if self._nursery is not None:
            self._nursery.start_soon(self._alert_push, push, record.id)
        else:
            await self._alert_push(push, record.id)
        log.info("instance=%s MESSAGE held until the device registers", _short(record.id))
        return _respond(request, 200)

    def _start_delivery(self, instance_id: str) -> None:
        if self._nursery is not None and instance_id not in self._delivering:
            self._delivering.add(instance_id)
            self._nursery.start_soon(self._deliver_held, instance_id)

    async def _deliver_held(self, instance_id: str) -> None:
        """Send the instance's held messages over its binding, oldest first (module rules)."""
        try:
            while True:
                try:
                    pending = await self._store.held_messages(instance_id)
                except StoreError:
                    log.exception("instance=%s held messages unreadable", _short(instance_id))
                    return
                now = self._clock()
                pending = [m for m in pending if m.expires_at > now]
                if not pending:
                    return
                for msg in pending:
                    binding = self._live_binding(instance_id)
                    if binding is None or not await self._deliver_one(msg, binding):
                        return
                # more may have arrived while we were sending: look again
        finally:
            self._delivering.discard(instance_id)

    async def _deliver_one(self, msg: HeldMessage, binding: DeviceBinding) -> bool:
        """One MESSAGE to the device; True if it is settled (dropped), False to stop."""
        endpoint = self._need_endpoint()
        try:
            request = SipRequest("MESSAGE", binding.contact, Headers([
                ("Max-Forwards", "70"),
                ("From", f"{msg.from_};tag={new_tag()}"),
                ("To", msg.to),
                ("Call-ID", new_call_id()),
                ("CSeq", "1 MESSAGE"),
                ("Date", email.utils.formatdate(msg.received_at, usegmt=True)),
                ("Content-Type", msg.content_type),
            ]), msg.body)
            result = await endpoint.request(request, [self._binding_destination(binding)])
        except (TransactionTimeout, TransportError) as exc:
            log.info("instance=%s held MESSAGE not delivered (kept): %s",
                     _short(msg.instance_id), exc)
            return False
        except (SipError, ValueError) as exc:  # a stored header that no longer parses
            log.warning("instance=%s held MESSAGE unusable, dropped: %s",
                        _short(msg.instance_id), exc)
            status = None
        else:
            status = result.response.status
            if status in _RETRY_LATER:
                log.info("instance=%s held MESSAGE answered %d (kept)",
                         _short(msg.instance_id), status)
                return False
        try:
            await self._store.drop_message(msg.id)
        except StoreError:
            log.exception("instance=%s delivered MESSAGE not dropped", _short(msg.instance_id))
            return False
        log.info("instance=%s held MESSAGE delivered → %s", _short(msg.instance_id), status)
        return True

    async def instance_expiring(self, record: InstanceRecord) -> None:
        """The sweeper's ``instance-expiring`` alert push (SPEC.md "Lifetime"), sent in the
        background: the sweep does not wait for APNs/FCM. At most EXPIRY_PUSHES_AT_ONCE are
        in flight (a mass expiry would otherwise open thousands of streams at once)."""
        push = PushRequest(kind=PushKind.INSTANCE_EXPIRING, target=_push_target(record),
                           instance=record.id, to_uri=record.aor, sent_at=int(self._clock()))

        async def send() -> None:
            async with self._expiry_pushes:
                await self._alert_push(push, record.id)

        if self._nursery is not None:
            self._nursery.start_soon(send)
        else:
            await send()

    async def _alert_push(self, push: PushRequest, instance_id: str) -> None:
        """An alert push (call-ended, message, instance-expiring); a dead token wipes the
        instance, as for a call push."""
        try:
            await self._push.send(push, deadline=trio.current_time() + ALERT_PUSH_DEADLINE)
        except InvalidToken as exc:
            await self._wipe(instance_id, exc.reason)
        except PushError as exc:
            log.info("instance=%s %s push failed: %s", _short(instance_id), push.kind.value,
                     exc.reason)

    def _push_request(self, record: InstanceRecord, request: SipRequest, kind: PushKind, *,
                      call: str | None, reason: str | None = None,
                      body: str | None = None) -> PushRequest:
        from_ = request.from_
        return PushRequest(
            kind=kind,
            target=_push_target(record),
            instance=record.id,
            call=call,
            from_uri=str(from_.uri),
            from_name=from_.display_name,
            to_uri=str(request.to.uri),
            sip_call_id=request.call_id,
            reason=reason,
            sent_at=int(self._clock()),
            body=body,
        )

    # -- InviteHandler -------------------------------------------------------------------------

    async def handle_invite(self, request: SipRequest, source: Source,
                            tx: ServerInviteHandle) -> None:
        """An initial INVITE to a contact token runs a call; a re-INVITE is proxied."""
        invite_at = trio.current_time()
        try:
            in_dialog = self._has_our_route(request)
        except SipParseError:
            await tx.send_final(tx.make_response(400))
            return
        if in_dialog:
            await self._reinvite(request, tx)
            return
        if request.uri.host.lower() not in self._local_hosts:
            await tx.send_final(tx.make_response(403, "Relaying Forbidden"))
            return
        if self._service is None or self._endpoint is None:
            await tx.send_final(tx.make_response(503))
            return
        if self._draining:
            refused = tx.make_response(503, "Service Unavailable")
            refused.headers.add("Retry-After", "30")
            await tx.send_final(refused)
            return
        found = await self._lookup(request)
        if isinstance(found, SipResponse):
            await tx.send_final(tx.make_response(found.status, found.reason))
            return
        if request.max_forwards == 0:
            await tx.send_final(tx.make_response(483, "Too Many Hops"))
            return
        await self._run_call(found, request, source, tx, invite_at)

    async def _run_call(self, record: InstanceRecord, request: SipRequest, source: Source,
                        tx: ServerInviteHandle, invite_at: float) -> None:
        send, receive = trio.open_memory_channel[CallEvent](math.inf)
        ref = randomness.token_hex(8)
        async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
            call = _Call(IncomingCall(self.settings.call), record, request, source, tx,
                         ref, send, nursery, outer, started_at=self._clock(),
                         invite_at=invite_at)
            self._calls[(record.id, ref)] = call
            waiting = self._waiting.setdefault(record.id, set())
            waiting.add(call)
            try:
                # No watcher tasks: the CANCEL and the device's REGISTER report to the call
                # from the paths that receive them (a task each cost ~4 % of a call's CPU).
                tx.when_cancelled(lambda reason: call.report(Cancel(reason)))
                first = InviteReceived(self._live_binding(record.id))
                await self._execute(call, call.machine.handle(first, trio.current_time()))
                while not call.finished:
                    # The call's timers are deadlines this task waits on beside its events
                    # (a task per timer cost ~3 % of a call's CPU).
                    event: CallEvent | None = None
                    with trio.move_on_at(min(call.timers.values(), default=math.inf)):
                        event = await receive.receive()
                    if event is None:
                        name = min(call.timers, key=call.timers.__getitem__)
                        del call.timers[name]
                        event = TimerFired(name)
                    await self._execute(call, call.machine.handle(event, trio.current_time()))
            finally:
                call.finished = True
                send.close()
                self._calls.pop((record.id, ref), None)
                waiting.discard(call)
                if not waiting and self._waiting.get(record.id) is waiting:
                    del self._waiting[record.id]
                nursery.cancel_scope.cancel()

    async def _execute(self, call: _Call, actions: Iterable[CallAction]) -> None:
        for action in actions:
            match action:
                case SendProvisional(status, reason, headers):
                    response = call.tx.make_response(status, reason)
                    for name, value in headers:
                        response.headers.add(name, value)
                    await call.tx.send_provisional(response)
                case SendFinal(status, reason, headers):
                    response = call.tx.make_response(status, reason)
                    for name, value in headers:
                        response.headers.add(name, value)
                    await call.tx.send_final(response)
                    call.final_status = call.final_status or status
                    self._dialogs.pop(call.request.call_id, None)
                case RelayResponse(status, response):
                    if isinstance(response, SipResponse):
                        await self._relay_upstream(call, response)
                case SendPush(kind, reason):
                    self._start_push(call, kind, reason)
                case ForwardInvite(binding):
                    await self._forward_invite(call, binding)
                case ForwardCancel():
                    if call.client is not None:
                        call.client.cancel(call.tx.cancel_reason)
                case StartTimer(name, deadline):
                    call.timers[name] = deadline  # a restarted timer replaces the old one
                case StopTimer(name):
                    call.timers.pop(name, None)
                case WipeInstance(reason):
                    await self._wipe(call.record.id, reason)
                case Finished(outcome):
                    call.finished = True
                    self.outcomes[outcome.value] += 1
                    log.info("call instance=%s call=%s outcome=%s", _short(call.record.id),
                             call.ref, outcome.value)
                    self._record_call(call, outcome.value)

    def _record_call(self, call: _Call, outcome: str) -> None:
        """Queue the call's record for the writer (no store write on the call's path)."""
        from_ = call.request.from_
        self._unsaved_records.append(CallRecord(
            instance_id=call.record.id, call=call.ref, sip_call_id=call.request.call_id,
            from_uri=str(from_.uri), from_name=from_.display_name,
            to_uri=str(call.request.to.uri), started_at=call.started_at,
            ended_at=self._clock(), outcome=outcome))
        self._records_due.set()

    def _start_push(self, call: _Call, kind: PushKind, reason: str | None) -> None:
        push = self._push_request(call.record, call.request, kind, call=call.ref, reason=reason)
        if kind is not PushKind.CALL:
            call.outer.start_soon(self._alert_push, push, call.record.id)
            return
        deadline = trio.current_time() + self.settings.call.ring_timeout
        # On the wire now if it can be: the task below only waits for the answer.
        started = self._push.start(push)

        async def send_call_push() -> None:
            try:
                await self._push.send(push, deadline=deadline, started=started)
            except InvalidToken as exc:
                call.report(PushFailed(dead_token=True, reason=exc.reason))
            except PushError as exc:
                log.info("instance=%s call=%s push failed: %s", _short(call.record.id),
                         call.ref, exc.reason)
                call.report(PushFailed(dead_token=False, reason=exc.reason))
            else:
                if self._metrics is not None:
                    self._metrics.call_push_accepted(trio.current_time() - call.invite_at)
                call.report(PushAccepted())

        call.nursery.start_soon(send_call_push)

    async def _wipe(self, instance_id: str, reason: str) -> None:
        service = self._service
        assert service is not None
        from sipis.instances import WipeReason  # late: instances imports the registrar stack

        log.info("instance=%s wiping: %s", _short(instance_id), reason)
        try:
            await service.wipe(instance_id, WipeReason.TOKEN_INVALID)
        except StoreError:
            log.exception("instance=%s wipe failed", _short(instance_id))
        self.forget_instance(instance_id)

    # -- proxying the call to the device -------------------------------------------------------

    async def _forward_invite(self, call: _Call, binding: DeviceBinding) -> None:
        endpoint = self._need_endpoint()
        request = call.request
        try:
            dest = self._binding_destination(binding)
            device = self._identity(dest.transport)
            upstream = self._identity(call.source.transport)
            call.record_route = self.signer.record_route(
                call_id=request.call_id, from_tag=request.from_.tag or "",
                instance_id=call.record.contact_token, upstream=upstream, device=device)
            forwarded = proxy_forward_request(
                request, via=device, branch=new_branch(), target_uri=binding.contact,
                record_route=call.record_route, is_ours=self._is_ours)
            handle = await endpoint.invite(forwarded, dest, replace_top_via=True)
        except (ProxyError, SipError, ValueError) as exc:
            log.info("instance=%s call=%s forward failed: %s", _short(call.record.id), call.ref,
                     exc)
            call.report(DeviceUnreachable(str(exc)))
            return
        call.client = handle
        self._remember_dialog(request.call_id, _Dialog(
            call.record.contact_token, call.tx.destination, dest, trio.current_time()))
        log.info("instance=%s call=%s forwarded to the device (%s)", _short(call.record.id),
                 call.ref, dest.transport)
        call.outer.start_soon(self._read_device, call, handle)

    async def _read_device(self, call: _Call, handle: ClientInviteHandle) -> None:
        """Report the device's responses; after the call has ended relay 2xx retransmissions."""
        try:
            async for response in handle.responses():
                if call.client is not handle:
                    continue  # an older forward (the machine moved on)
                if call.finished:
                    if 200 <= response.status <= 299:
                        if (call.final_status or 200) >= 300:
                            await self._end_stray_2xx(call, handle, response)
                        else:
                            await self._relay_upstream(call, response)
                    continue
                call.report(DeviceResponse(response.status, response.reason, response))
        except (TransactionTimeout, TransportError) as exc:
            if call.client is handle:
                call.report(DeviceUnreachable(str(exc)))

    async def _relay_upstream(self, call: _Call, response: SipResponse) -> None:
        client = call.client
        branch = client.branch if client is not None else None

        def is_ours(via: Via) -> bool:
            return branch is not None and via.branch == branch

        relayed = proxy_forward_response(response, is_our_via=is_ours,
                                         record_route=call.record_route)
        if relayed is None:
            return
        if relayed.status < 200:
            await call.tx.send_provisional(relayed)
            return
        call.final_status = call.final_status or relayed.status
        if relayed.status < 300:
            await call.tx.send_2xx(relayed)
        else:
            await call.tx.send_final(relayed)
            self._dialogs.pop(call.request.call_id, None)

    async def _end_stray_2xx(self, call: _Call, handle: ClientInviteHandle,
                             response: SipResponse) -> None:
        """The device answered after we had sent a non-2xx final upstream (a CANCEL or
        timer race): ACK its 2xx and BYE the dialog, so that the phone does not stay in a
        call nobody hears (RFC 3261 §13.2.2.4 as the UAC of this leg)."""
        endpoint = self._need_endpoint()
        try:
            contacts = response.headers.get_list("Contact")
            target = Address.parse(contacts[0]).uri if contacts else handle.request.uri
            seq = handle.request.cseq.seq
            base = Headers([
                ("From", handle.request.headers.get("From") or ""),
                ("To", response.headers.get("To") or ""),
                ("Call-ID", handle.request.call_id),
            ])
            ack = SipRequest("ACK", target, base.copy())
            ack.headers.add("CSeq", f"{seq} ACK")
            await endpoint.send_request_stateless(ack, handle.destination, add_via=True)
            bye = SipRequest("BYE", target, base.copy())
            bye.headers.add("CSeq", f"{seq + 1} BYE")
            await endpoint.request(bye, [handle.destination])
        except (SipError, ValueError) as exc:
            log.info("instance=%s call=%s late 2xx not ended: %s", _short(call.record.id),
                     call.ref, exc)
            return
        log.info("instance=%s call=%s device answered too late: ACKed and BYEd",
                 _short(call.record.id), call.ref)

    # -- in-dialog requests --------------------------------------------------------------------

    def _has_our_route(self, request: SipRequest) -> bool:
        routes = request.headers.get_list("Route")
        if routes and self._is_ours(Address.parse(routes[0]).uri):
            return True
        return self._is_ours(request.uri) and parse_record_route_token(request.uri) is not None

    def _remember_dialog(self, call_id: str, dialog: _Dialog) -> None:
        self._dialogs.pop(call_id, None)
        self._dialogs[call_id] = dialog
        now = trio.current_time()
        while self._dialogs:
            oldest = next(iter(self._dialogs.values()))
            if len(self._dialogs) <= MAX_DIALOGS and now - oldest.created < DIALOG_LIFETIME:
                break
            self._dialogs.popitem(last=False)

    def _route(self, request: SipRequest) -> tuple[SipRequest, Destination] | SipResponse:
        """Where an in-dialog request goes, as (request to forward, destination)."""
        try:
            decision = process_route(request, self._is_ours, signer=self.signer)
        except RelayRefused:
            return _respond(request, 403, "Relaying Forbidden")
        except SipParseError:
            return _respond(request, 400)
        dialog = self._dialogs.get(request.call_id)
        if dialog is None or dialog.token != decision.dialog.instance_id:
            log.info("in-dialog %s for a dialog we do not know: refused", request.method)
            return _respond(request, 403, "Relaying Forbidden")
        dest = dialog.device if decision.toward.value == "d" else dialog.upstream
        try:
            forwarded = proxy_forward_request(
                decision.request, via=self._identity(dest.transport), branch=new_branch())
        except ProxyError as exc:
            return _respond(request, exc.status, exc.reason)
        except SipParseError:
            return _respond(request, 400)
        return forwarded, dest

    async def _in_dialog(self, request: SipRequest) -> SipResponse | None:
        routed = self._route(request)
        if isinstance(routed, SipResponse):
            return None if request.method == "ACK" else routed
        forwarded, dest = routed
        endpoint = self._need_endpoint()
        if request.method == "ACK":
            try:
                await endpoint.send_request_stateless(forwarded, dest)
            except TransportError as exc:
                log.info("in-dialog ACK not relayed: %s", exc)
            return None
        try:
            result = await endpoint.request(forwarded, [dest], replace_top_via=True)
        except TransactionTimeout:
            return _respond(request, 408)
        except TransportError:
            return _respond(request, 480)
        relayed = proxy_forward_response(result.response, is_our_via=lambda via: True)
        if relayed is None:
            return _respond(request, 500)
        if request.method == "BYE" and relayed.status < 300:
            self._dialogs.pop(request.call_id, None)
        return relayed

    async def _reinvite(self, request: SipRequest, tx: ServerInviteHandle) -> None:
        routed = self._route(request)
        if isinstance(routed, SipResponse):
            await tx.send_final(tx.make_response(routed.status, routed.reason))
            return
        forwarded, dest = routed
        try:
            handle = await self._need_endpoint().invite(forwarded, dest, replace_top_via=True)
        except TransportError:
            await tx.send_final(tx.make_response(480))
            return

        async def relay_cancel() -> None:
            handle.cancel(await tx.wait_cancelled())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_cancel)
            try:
                async for response in handle.responses():
                    relayed = proxy_forward_response(
                        response, is_our_via=lambda via: via.branch == handle.branch)
                    if relayed is None:
                        continue
                    if relayed.status < 200:
                        await tx.send_provisional(relayed)
                    elif relayed.status < 300:
                        await tx.send_2xx(relayed)
                    else:
                        await tx.send_final(relayed)
            except TransactionTimeout:
                await tx.send_final(tx.make_response(408))
            except TransportError:
                await tx.send_final(tx.make_response(480))
            nursery.cancel_scope.cancel()
