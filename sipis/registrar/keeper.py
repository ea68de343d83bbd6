"""The registration keeper: every instance's upstream binding, driven on trio.

Strategy: one ``Binding`` (sans-IO, ``binding.py``) per instance, one heap of wake-up times, and
one dispatcher task that fires due bindings. Every REGISTER that leaves — first, refresh, auth
retry, unREGISTER — first takes a token from one global bucket (``register_rate`` per second,
``register_burst`` deep), so that a restart with many instances spreads its REGISTERs instead of
storming the provider. The dispatcher takes the token *before* it starts a task, so a cold start
with 100k due bindings holds 100k heap entries, not 100k waiting tasks.

The keeper persists a binding's status when its state or error changes (and its last success at
most every ``PERSIST_REGISTERED_EVERY`` seconds): a refresh does not cost a disk write.
"""

from __future__ import annotations

import collections
import heapq
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from sipis.registrar.binding import (
    Action,
    Binding,
    BindingParams,
    BindingPolicy,
    FailureKind,
    Outcome,
    RegState,
    Schedule,
    SendRegister,
    StatusChanged,
)
from sipis.sip.dns import Target
from sipis.sip.errors import ResolveError, SipParseError, TransactionTimeout, TransportError
from sipis.sip.headers import URI, Address
from sipis.sip.message import SipRequest
from sipis.store.errors import StoreError
from sipis.store.models import InstanceRecord, RegistrationStatus

log = logging.getLogger(__name__)

#: Persist last_registered_at at least this often (seconds) while a binding stays up, so a
#: restart does not mistake a healthy instance for one unregistered past its max age.
PERSIST_REGISTERED_EVERY = 600.0

#: Status changes within this window (s) are written together, in one transaction: a write
#: per REGISTER (one fsync each) was most of a registration's cost at 100k instances.
PERSIST_BATCH_DELAY = 0.25

#: Registrations the dispatcher drives at once. The token bucket paces REGISTERs, but when
#: sipis itself is the slower side (CPU-bound: ~0.7 ms per REGISTER transaction here) a rate
#: set above what it can process let answers queue unread until UDP retransmitted the
#: requests (Timer E): the provider then saw more REGISTERs per second than the limit, and
#: some transactions timed out. With this many in flight the queue stays far below T1.
MAX_IN_FLIGHT = 128


class ClientResultLike(Protocol):
    @property
    def response(self) -> object: ...

    @property
    def flow(self) -> object: ...


class Endpoint(Protocol):
    """The part of ``sipis.sip.endpoint.SipEndpoint`` the keeper uses."""

    async def request(self, request: SipRequest, targets: Sequence[Target]) -> ClientResultLike: ...

    def start_request(self, request: SipRequest, targets: Sequence[Target],
                      done: Callable[[Any], None]) -> Callable[[], None]:
        """``request`` without a task: ``done`` gets the result or the error, once."""
        ...

    def contact_host_port(self, transport: str) -> tuple[str, int]: ...

    def flow_closed_channel(self) -> trio.MemoryReceiveChannel[object]: ...


class Resolver(Protocol):
    async def resolve(self, uri: URI) -> Sequence[Target]: ...

    def resolve_now(self, uri: URI) -> Sequence[Target] | None:
        """The targets when no lookup is needed (an IP literal), else None."""
        ...


class StatusStore(Protocol):
    async def set_registrations(
        self, items: Sequence[tuple[str, RegistrationStatus]],
    ) -> int: ...


class RegisterMetrics(Protocol):
    """Where REGISTER transactions are counted (``sipis.metrics.Metrics`` fits)."""

    def register_done(self, result: str, seconds: float | None) -> None:
        """One transaction ended: ``result`` as in ``register_result()`` or a failure kind;
        ``seconds`` until the final answer, None when none came."""
        ...


@attrs.frozen
class KeeperConfig:
    """The ``registrar`` section as the keeper needs it."""

    policy: BindingPolicy = attrs.Factory(BindingPolicy)
    register_rate: float = 100.0
    register_burst: int = 20
    unregister_wait: float = 5.0  # how long remove() waits for the Expires: 0 answer
    transports: tuple[str, ...] = ("udp", "tcp")  # what we listen on, i.e. can put in a Contact


#: ``RegState`` → the API's ``registration.state``: IDLE and UNREGISTERING are passing
#: states of the machine, not of the API.
_API_STATES: dict[RegState, str] = {
    **{state: state.value for state in RegState},
    RegState.IDLE: "registering", RegState.UNREGISTERING: "unregistered",
}

#: The least time (seconds) the dispatcher sleeps when it waits for bucket tokens.
TOKEN_WAIT_BATCH = 0.001

#: A token counts as whole from this (refills are float sums of elapsed time × rate).
_WHOLE_TOKEN = 1.0 - 1e-9


class TokenBucket:
    """A token bucket on trio's clock: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp: float | None = None
        self._lock = trio.Lock()  # FIFO: waiters are served in order

    def _refill(self, now: float) -> None:
        if self._stamp is None:
            self._stamp = now
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        """Take a free token now if there is one and nobody waits in line for it."""
        if self._lock.locked():
            return False
        self._refill(trio.current_time())
        if self._tokens >= _WHOLE_TOKEN:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until ``try_acquire`` may succeed (a token's time when one waits in line)."""
        if self._lock.locked():
            return 1.0 / self.rate
        self._refill(trio.current_time())
        # At least 10 µs: a float clock adds nothing smaller to a large time.
        return max(1e-5, (1.0 - self._tokens) / self.rate)

    async def acquire(self) -> None:
        """Wait until a token is free and take it."""
        if not self._lock.locked():
            # Fast path, no waiter queued: take a free token without the lock's scheduling.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._refill(trio.current_time())
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
        async with self._lock:
            self._refill(trio.current_time())
            if self._tokens < 1.0:
                await trio.sleep((1.0 - self._tokens) / self.rate)
                self._refill(trio.current_time())
            self._tokens -= 1.0


@attrs.define
class _Entry:
    """The keeper's per-instance state around the sans-IO binding."""

    record: InstanceRecord
    binding: Binding
    target_uri: URI  # where REGISTERs go: the outbound proxy, else the registrar
    flow: object | None = None
    scheduled_at: float | None = None
    busy: bool = False  # a task is driving this binding's actions now
    needs_start: bool = True  # next fire is Binding.start(), not a refresh
    first_outcome: Outcome | None = None
    outcome_event: trio.Event = attrs.Factory(trio.Event)
    unregistered_event: trio.Event = attrs.Factory(trio.Event)
    persisted: RegistrationStatus | None = None
    removed: bool = False


@attrs.frozen
class KeeperStatistics:
    bindings: int
    by_state: dict[str, int]
    registers_sent: int
    scheduled: int


class RegistrationKeeper:
    """Keeps every instance's REGISTER binding alive at its provider."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        resolver: Resolver,
        store: StatusStore,
        config: KeeperConfig,
        rng: random.Random | None = None,
        metrics: RegisterMetrics | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._metrics = metrics
        self._resolver = resolver
        self._store = store
        self.config = config
        self._rng = rng or random.Random()  # noqa: S311 — jitter only
        self._bucket = TokenBucket(config.register_rate, config.register_burst)
        self._in_flight = trio.Semaphore(MAX_IN_FLIGHT)
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._wall_offset = time.time() - _now_or_zero()
        self.registers_sent = 0
        # Status changes waiting for the batch writer: id → (entry, status).
        self._unsaved: dict[str, tuple[_Entry, RegistrationStatus]] = {}
        self._unsaved_event = trio.Event()
        # Task-less drives that ran out of bucket tokens mid-registration, oldest first
        # (the dispatcher goes on with them): (entry, its queue, targets, slot).
        self._out_of_tokens: collections.deque[
            tuple[_Entry, collections.deque[SendRegister], Sequence[Target], bool]
        ] = collections.deque()
        self._dispatch_stopped = False
        self._slot_wanted: trio.Event | None = None  # the dispatcher waits for a free slot

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the dispatcher, the flow watcher and the status writer until cancelled."""
        self._wall_offset = time.time() - trio.current_time()
        self._dispatch_stopped = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_flows)
                nursery.start_soon(self._dispatch)
                nursery.start_soon(self._write_statuses)
                task_status.started()
        finally:
            self._nursery = None  # answers still in flight end their drives quietly

    def reconfigure(self, config: KeeperConfig) -> None:
        """New registrar settings (SIGHUP): rate and policy apply to the next REGISTERs."""
        self.config = config
        self._bucket.rate = config.register_rate
        self._bucket.burst = float(config.register_burst)
        for entry in self._entries.values():
            entry.binding.policy = config.policy

    # -- public API -------------------------------------------------------------------------

    async def register_first(self, record: InstanceRecord) -> Outcome:
        """Register a new instance and wait for the first outcome (the API's create).

        On success the binding stays kept (call ``adopt_registered`` once it is stored, or
        ``remove`` if storing failed); on failure it is dropped. Cancelling the wait (the API's
        timeout) unREGISTERs whatever may have been bound in the meantime.
        """
        entry = self._new_entry(record)
        self._entries[record.id] = entry
        try:
            self._fire(entry, prepaid=False)
            await entry.outcome_event.wait()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove(record.id, wait=False)
            raise
        outcome = entry.first_outcome
        assert outcome is not None
        if not outcome.registered:
            self._forget(record.id)
        return outcome

    def adopt(self, record: InstanceRecord, *, delay: float = 0.0) -> None:
        """Keep an instance loaded from the store: register it again (after ``delay``)."""
        if record.id in self._entries:
            return
        entry = self._new_entry(record, report_outcome=False)
        entry.first_outcome = Outcome(False, None, "adopted")  # no API call waits on it
        entry.outcome_event.set()
        self._entries[record.id] = entry
        self._schedule(entry, trio.current_time() + delay)

    def update_record(self, record: InstanceRecord) -> None:
        """The app changed the instance: a new password applies to the next REGISTER."""
        entry = self._entries.get(record.id)
        if entry is None:
            return
        if record.password != entry.record.password:
            entry.binding.update_password(record.password)
            if entry.binding.state in (RegState.AUTH_FAILED, RegState.BACKOFF):
                self._schedule(entry, trio.current_time())
        entry.record = record

    async def remove(self, instance_id: str, *, wait: bool = True) -> None:
        """Send Expires: 0 and stop keeping the instance (wipe, DELETE, foreground)."""
        entry = self._entries.get(instance_id)
        if entry is None:
            return
        entry.removed = True
        actions = entry.binding.unregister(trio.current_time())
        self._run_actions(entry, actions)
        if wait:
            with trio.move_on_after(self.config.unregister_wait):
                await entry.unregistered_event.wait()
        self._forget(instance_id)

    def record(self, instance_id: str) -> InstanceRecord | None:
        """The record kept for this instance (decrypted, current after ``update_record``), or
        None if it is not kept: lets the INVITE path find an instance without the store."""
        entry = self._entries.get(instance_id)
        return None if entry is None or entry.removed else entry.record

    def status(self, instance_id: str) -> RegistrationStatus | None:
        """The live registration status (wall-clock times), None if not kept."""
        entry = self._entries.get(instance_id)
        if entry is None:
            return None
        return self._status_of(entry.binding)

    def registered_since(self, instance_id: str) -> tuple[bool, float | None] | None:
        """(registered now?, wall time of the last success) without building a status: the
        sweeper asks this of every instance. None if not kept."""
        entry = self._entries.get(instance_id)
        if entry is None:
            return None
        b = entry.binding
        last = b.last_registered_at
        return (b.state is RegState.REGISTERED,
                None if last is None else last + self._wall_offset)

    def is_kept(self, instance_id: str) -> bool:
        return instance_id in self._entries

    def statistics(self) -> KeeperStatistics:
        by_state: dict[str, int] = {}
        for entry in self._entries.values():
            key = entry.binding.state.value
            by_state[key] = by_state.get(key, 0) + 1
        return KeeperStatistics(
            bindings=len(self._entries),
            by_state=by_state,
            registers_sent=self.registers_sent,
            scheduled=len(self._heap),
        )

    # -- internals --------------------------------------------------------------------------

    def _new_entry(self, record: InstanceRecord, *, report_outcome: bool = True) -> _Entry:
        aor = URI.parse(record.aor)
        registrar = (
            URI.parse(record.registrar)
            if record.registrar
            else URI(scheme=aor.scheme, user=None, host=aor.host, port=aor.port)
        )
        if registrar.user is not None or registrar.password is not None or registrar.headers:
            # Only copy when there is something to drop: otherwise the one parsed registrar
            # URI is shared by every instance that names it (less memory, faster start).
            registrar = attrs.evolve(registrar, user=None, password=None, headers=())
        target_uri = URI.parse(record.outbound_proxy) if record.outbound_proxy else registrar
        transport = _preferred_transport(target_uri, self.config.transports)
        params = BindingParams(
            aor=aor,
            username=record.username,
            password=record.password,
            registrar=registrar,
            contact=self._contact(record, transport),
            expires=record.expires,
        )
        binding = Binding(params, self.config.policy, rng=self._rng, report_outcome=report_outcome)
        # What the store holds already counts as persisted: after a restart, re-registering
        # a stored "registered" instance then writes nothing (one disk write per instance
        # saved on a cold start), unless PERSIST_REGISTERED_EVERY has passed.
        return _Entry(record=record, binding=binding, target_uri=target_uri,
                      persisted=record.registration)

    def _contact(self, record: InstanceRecord, transport: str) -> Address:
        host, port = self._endpoint.contact_host_port(transport)
        uri = URI(scheme="sip", user=record.contact_token, host=host, port=port,
                  params=(("transport", transport),))
        return Address(uri=uri, params=(("+sip.instance", f'"<{record.instance_urn}>"'),))

    def _schedule(self, entry: _Entry, at: float | None) -> None:
        entry.scheduled_at = at
        if at is None:
            return
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, entry.record.id))
        self._wakeup.set()

    def _forget(self, instance_id: str) -> None:
        entry = self._entries.pop(instance_id, None)
        if entry is not None:
            entry.scheduled_at = None  # lazy heap deletion

    async def _dispatch(self) -> None:
        """Spend the bucket's tokens: first on the drives that ran out of them mid-registration
        (a 401's authenticated REGISTER; they hold in-flight slots already), then on the
        bindings falling due, one token and one in-flight slot each.

        One task serves both, and every token free when it wakes: at the rate limit, a task
        or a sleep per waiting REGISTER cost ~10 % of a registration's CPU. On stop, the
        drives still waiting end without sending.
        """
        waiting = self._out_of_tokens
        bucket = self._bucket
        try:
            while True:
                self._wakeup = trio.Event()
                if waiting:
                    if bucket.try_acquire():
                        self._go_on_prepaid(*waiting.popleft())
                    else:
                        await self._until_token()
                    continue
                if not self._heap:
                    await self._wakeup.wait()
                    continue
                at, _, instance_id = self._heap[0]
                entry = self._entries.get(instance_id)
                if entry is None or entry.scheduled_at != at:
                    heapq.heappop(self._heap)  # stale
                    continue
                if at > trio.current_time():
                    with trio.move_on_at(at):
                        await self._wakeup.wait()
                    continue
                if entry.busy:
                    # The running drive will schedule it again; look at it then.
                    heapq.heappop(self._heap)
                    entry.scheduled_at = None
                    continue
                # Pay for the REGISTER (and take an in-flight slot) before starting it: a cold
                # start with many due bindings then waits here, in the heap.
                try:
                    self._in_flight.acquire_nowait()
                except trio.WouldBlock:
                    # Until a drive ends (its slot), or one waits for a token.
                    self._slot_wanted = trio.Event()
                    await self._slot_wanted.wait()
                    self._slot_wanted = None
                    continue
                if not bucket.try_acquire():
                    self._in_flight.release()
                    await self._until_token()
                    continue
                heapq.heappop(self._heap)
                entry.scheduled_at = None
                self._fire(entry, prepaid=True, slot=True)
        finally:
            self._dispatch_stopped = True
            while waiting:
                entry, _, _, slot = waiting.popleft()
                self._drive_ended(entry, slot)

    async def _until_token(self) -> None:
        """Sleep until the bucket has a token (whatever else happens, it needs one).

        At high rates it sleeps a little longer, for the tokens of up to
        ``TOKEN_WAIT_BATCH`` seconds (never more than the burst holds): one wake-up then
        sends several REGISTERs, instead of one scheduler pass each.
        """
        bucket = self._bucket
        batch = min(TOKEN_WAIT_BATCH, (bucket.burst - 1.0) / bucket.rate)
        await trio.sleep(max(bucket.wait_time(), batch))

    def _go_on_prepaid(self, entry: _Entry, queue: collections.deque[SendRegister],
                       targets: Sequence[Target], slot: bool) -> None:
        try:
            self._go_on(entry, queue, targets, prepaid=True, slot=slot)
        except Exception:
            self._step_failed(entry, slot)

    def _fire(self, entry: _Entry, *, prepaid: bool, slot: bool = False) -> None:
        """Drive ``entry``; ``slot``: it holds an in-flight slot to release.

        Without a task when nothing has to wait (an IP-literal registrar or proxy, a bucket
        token at hand): the REGISTER goes out now and each answer drives the next step from
        the endpoint's receive path. A task per registration, woken for the 401 and the 200,
        cost ~15 % of a registration's CPU. Otherwise a task drives it (``_drive``)."""
        assert self._nursery is not None, "RegistrationKeeper.run() is not running"
        entry.busy = True
        try:
            targets = self._resolver.resolve_now(entry.target_uri)
        except ResolveError:
            targets = None  # the task reports it, as for a failed lookup
        if targets is None:
            self._nursery.start_soon(self._drive, entry, prepaid, slot)
            return
        try:
            self._use_transport(entry, targets)
            queue = collections.deque(self._apply_local(entry, self._due_actions(entry)))
            self._go_on(entry, queue, targets, prepaid=prepaid, slot=slot)
        except Exception:
            self._step_failed(entry, slot)

    def _go_on(self, entry: _Entry, queue: collections.deque[SendRegister],
               targets: Sequence[Target], *, prepaid: bool, slot: bool) -> None:
        """The task-less drive (``_send_all`` without a task): send the next REGISTER; its
        answer comes back to ``answered``, which goes on from there."""
        if not queue:
            self._persist(entry)
            self._drive_ended(entry, slot)
            return
        if not prepaid and not self._bucket.try_acquire():
            # Out of tokens (the dispatcher spends them as they come when many bindings are
            # due): the dispatcher goes on with this drive, before any new one, at its next
            # token.
            if self._dispatch_stopped:  # the keeper is stopping: nothing more goes out
                self._drive_ended(entry, slot)
                return
            self._out_of_tokens.append((entry, queue, targets, slot))
            self._wakeup.set()  # the dispatcher may wait for a due time, or be idle
            if self._slot_wanted is not None:
                self._slot_wanted.set()
            return
        send = queue.popleft()
        self.registers_sent += 1
        started = trio.current_time()

        def answered(outcome: object) -> None:
            try:
                actions = self._transaction_ended(entry, outcome, started)
                queue.extend(self._apply_local(entry, actions))
                if self._nursery is None:  # the keeper stopped meanwhile
                    self._drive_ended(entry, slot)
                    return
                self._go_on(entry, queue, targets, prepaid=False, slot=slot)
            except Exception:
                self._step_failed(entry, slot)

        try:
            self._endpoint.start_request(send.request, self._usable(entry, targets), answered)
        except (ResolveError, TransportError, SipParseError) as exc:
            answered(exc)

    @staticmethod
    def _usable(entry: _Entry, targets: Sequence[Target]) -> list[Target]:
        """The targets on the Contact's transport (the registrar answers on it).

        Raises:
            ResolveError: none is.
        """
        transport = entry.binding.params.contact.uri.transport or "udp"
        usable = [t for t in targets if t.transport == transport]
        if not usable:
            raise ResolveError(f"no {transport} target for {entry.target_uri.host}")
        return usable

    @staticmethod
    def _due_actions(entry: _Entry) -> list[Action]:
        """What the binding does now that it is due: its first REGISTER, or a refresh/retry."""
        now = trio.current_time()
        if entry.needs_start:
            entry.needs_start = False
            return entry.binding.start(now)
        return entry.binding.on_timer(now)

    def _step_failed(self, entry: _Entry, slot: bool) -> None:
        """A task-less drive step raised (a bug): log it and end the drive, so that the
        binding is not left busy and its slot is given back."""
        log.exception("instance=%s: registration step failed", _short(entry.record.id))
        self._drive_ended(entry, slot)

    def _drive_ended(self, entry: _Entry, slot: bool) -> None:
        entry.busy = False
        if slot:
            self._in_flight.release()
            if self._slot_wanted is not None:
                self._slot_wanted.set()

    def _run_actions(self, entry: _Entry, actions: list[Action]) -> None:
        """Actions produced outside a driving task (remove): hand sends to a new task."""
        sends = self._apply_local(entry, actions)
        if sends:
            if entry.busy:
                return  # the driving task is mid-transaction; it sends the next REGISTER
            if self._nursery is None:
                return  # the keeper has stopped (shutdown): nothing more goes out
            entry.busy = True
            self._nursery.start_soon(self._drive_sends, entry, sends)

    async def _drive(self, entry: _Entry, prepaid: bool, slot: bool = False) -> None:
        try:
            resolved = await self._resolve_contact(entry)
            sends = self._apply_local(entry, self._due_actions(entry))
            await self._send_all(entry, sends, prepaid=prepaid, resolved=resolved)
        finally:
            self._drive_ended(entry, slot)

    async def _drive_sends(self, entry: _Entry, sends: list[SendRegister],
                           slot: bool = False) -> None:
        try:
            await self._send_all(entry, sends)
        finally:
            self._drive_ended(entry, slot)

    async def _resolve_contact(self, entry: _Entry) -> list[Sequence[Target]]:
        """Pick the Contact's transport from where RFC 3263 sends us (before anything is bound).

        Returns the resolution as a holder for the drive's transactions (empty: resolve when
        sending), so that a REGISTER and its authenticated retry resolve once, not thrice.
        """
        if entry.binding.state == RegState.REGISTERED:
            return []
        try:
            targets = await self._resolver.resolve(entry.target_uri)
        except ResolveError:
            return []  # the send reports it
        self._use_transport(entry, targets)
        return [targets]

    def _use_transport(self, entry: _Entry, targets: Sequence[Target]) -> None:
        """Before a binding is registered, its Contact names the first transport RFC 3263
        sends us on (the registrar's answers come back on it)."""
        if entry.binding.state == RegState.REGISTERED:
            return
        for target in targets:
            if target.transport in self.config.transports:
                if target.transport != entry.binding.params.contact.uri.transport:
                    entry.binding.set_contact(self._contact(entry.record, target.transport))
                break

    async def _send_all(
        self, entry: _Entry, sends: list[SendRegister], *, prepaid: bool = False,
        resolved: list[Sequence[Target]] | None = None,
    ) -> None:
        resolved = resolved if resolved is not None else []
        queue = list(sends)
        while queue:
            send = queue.pop(0)
            if prepaid:
                prepaid = False
            else:
                await self._bucket.acquire()
            actions = await self._transact(entry, send.request, resolved)
            queue.extend(self._apply_local(entry, actions))
        self._persist(entry)

    async def _transact(self, entry: _Entry, request: SipRequest,
                        resolved: list[Sequence[Target]] | None = None) -> list[Action]:
        """One REGISTER transaction; ``resolved`` holds this drive's resolution (filled here
        when empty)."""
        self.registers_sent += 1
        started = trio.current_time()
        try:
            if resolved:
                everywhere = resolved[0]
            else:
                everywhere = await self._resolver.resolve(entry.target_uri)
                if resolved is not None:
                    resolved.append(everywhere)
            result: object = await self._endpoint.request(
                request, self._usable(entry, everywhere))
        except (ResolveError, TransactionTimeout, TransportError, SipParseError) as exc:
            result = exc
        return self._transaction_ended(entry, result, started)

    def _transaction_ended(self, entry: _Entry, outcome: object,
                           started: float) -> list[Action]:
        """Count a REGISTER transaction's end and feed it to the binding."""
        now = trio.current_time()
        if isinstance(outcome, ResolveError):
            self._count("resolve-error", None)
            return entry.binding.on_failure(FailureKind.RESOLVE, str(outcome), now)
        if isinstance(outcome, TransactionTimeout):
            self._count("timeout", None)
            return entry.binding.on_failure(FailureKind.TIMEOUT, str(outcome), now)
        if isinstance(outcome, (TransportError, SipParseError)):
            self._count("transport-error", None)
            return entry.binding.on_failure(FailureKind.TRANSPORT, str(outcome), now)
        if isinstance(outcome, BaseException):
            raise outcome
        entry.flow = getattr(outcome, "flow", None)
        response = getattr(outcome, "response", None)
        status = getattr(response, "status", 0)
        self._count(register_result(status), now - started)
        return entry.binding.on_response(response, now)  # type: ignore[arg-type]

    def _count(self, result: str, seconds: float | None) -> None:
        if self._metrics is not None:
            self._metrics.register_done(result, seconds)

    def _apply_local(self, entry: _Entry, actions: list[Action]) -> list[SendRegister]:
        """Apply schedule/outcome/status actions; return the REGISTERs still to send."""
        sends: list[SendRegister] = []
        for action in actions:
            if isinstance(action, SendRegister):
                sends.append(action)
            elif isinstance(action, Schedule):
                if not entry.removed:
                    self._schedule(entry, action.at)
            elif isinstance(action, Outcome):
                if entry.first_outcome is None:
                    entry.first_outcome = action
                    entry.outcome_event.set()
            elif isinstance(action, StatusChanged):
                self._log_status(entry, action)
                if action.state == RegState.UNREGISTERED:
                    entry.unregistered_event.set()
        return sends

    def _log_status(self, entry: _Entry, status: StatusChanged) -> None:
        if status.state in (RegState.REGISTERED, RegState.REGISTERING):
            if log.isEnabledFor(logging.DEBUG):  # (its arguments cost ~1 % of a REGISTER)
                log.debug("instance=%s registration=%s expires=%s", _short(entry.record.id),
                          status.state.value, status.granted_expires)
        else:
            log.info("instance=%s registration=%s error=%r", _short(entry.record.id),
                     status.state.value, status.last_error)

    def _persist(self, entry: _Entry) -> None:
        """Queue the binding's status for the batch writer if it changed (or its
        last_registered_at is older than PERSIST_REGISTERED_EVERY in the store)."""
        if entry.removed or entry.record.id not in self._entries:
            return
        status = self._status_of(entry.binding)
        old = entry.persisted
        if old is not None and old.state == status.state and old.last_error == status.last_error:
            stale = (status.last_registered_at or 0.0) - (old.last_registered_at or 0.0)
            if stale < PERSIST_REGISTERED_EVERY:
                return
        self._unsaved[entry.record.id] = (entry, status)
        self._unsaved_event.set()

    async def _write_statuses(self) -> None:
        """The batch writer; on cancellation (stop) it writes what is left, shielded."""
        try:
            while True:
                await self._unsaved_event.wait()
                await trio.sleep(PERSIST_BATCH_DELAY)
                await self.flush_statuses()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await self.flush_statuses()

    async def flush_statuses(self) -> int:
        """Write every queued status now, in one transaction; returns how many were stored.
        Instances removed meanwhile (or never stored: the create path stores them itself)
        are skipped."""
        batch, self._unsaved = self._unsaved, {}
        self._unsaved_event = trio.Event()
        items = [(instance_id, status) for instance_id, (entry, status) in batch.items()
                 if not entry.removed and self._entries.get(instance_id) is entry]
        if not items:
            return 0
        try:
            stored = await self._store.set_registrations(items)
        except StoreError:
            log.exception("could not persist %d registration statuses", len(items))
            return 0
        for entry, status in batch.values():
            entry.persisted = status
        return stored

    def _status_of(self, b: Binding) -> RegistrationStatus:
        """The binding's status as the API and the store show it (wall-clock times)."""
        offset = self._wall_offset
        at, last = b.next_attempt_at, b.last_registered_at
        return RegistrationStatus(
            state=_API_STATES[b.state],
            last_error=b.last_error,
            next_attempt_at=None if at is None else at + offset,
            granted_expires=b.granted_expires,
            last_registered_at=None if last is None else last + offset,
        )

    async def _watch_flows(self) -> None:
        """A TCP/TLS flow dropped: every binding on it must register again (RFC 5626 §4.4)."""
        channel = self._endpoint.flow_closed_channel()
        async for flow in channel:
            now = trio.current_time()
            for entry in list(self._entries.values()):
                if entry.flow != flow or entry.removed:
                    continue
                entry.flow = None
                log.info("instance=%s flow lost, registering again", _short(entry.record.id))
                self._run_actions(entry, entry.binding.on_flow_lost(now))


#: SIP statuses of a REGISTER answer counted on their own; others by class ("2xx", "4xx"):
#: 401/407 are digest challenges, 403/404 refusals that end in auth-failed, 423 Interval Too
#: Brief. A bounded set, so it can be a metric label.
REGISTER_STATUSES = frozenset({401, 403, 404, 407, 423})


def register_result(status: int) -> str:
    """The ``result`` of a REGISTER transaction answered with ``status``."""
    if status in REGISTER_STATUSES:
        return str(status)
    return f"{max(1, min(status // 100, 6))}xx"


def _preferred_transport(uri: URI, transports: Sequence[str]) -> str:
    explicit = uri.transport
    if explicit:
        return explicit.lower()
    if uri.scheme == "sips":
        return "tls"
    return "udp" if "udp" in transports else transports[0]


def _short(instance_id: str) -> str:
    """Instance ids in logs are shortened: enough to correlate, not to address."""
    return instance_id[:8]


def _now_or_zero() -> float:
    try:
        return trio.current_time()
    except RuntimeError:
        return 0.0

