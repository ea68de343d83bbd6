"""The trio keeper: pacing, refreshes, removal and flow loss, against an in-memory registrar.

The registrar here is a small digest-checking fake speaking real SIP messages; the tests against
a real Kamailio are in tests/test_registration_kamailio.py.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from sipis.registrar.binding import BindingPolicy, RegState
from sipis.registrar.keeper import (
    MAX_IN_FLIGHT,
    KeeperConfig,
    RegistrationKeeper,
    TokenBucket,
)
from sipis.sip.digest import make_challenge, verify_authorization
from sipis.sip.errors import TransactionTimeout, TransportError
from sipis.sip.headers import URI
from sipis.sip.message import SipRequest, SipResponse, make_response
from sipis.store.models import InstanceRecord, RegistrationStatus


@attrs.frozen
class FakeTarget:  # shaped like sipis.sip.dns.Target
    transport: str = "udp"


@attrs.frozen
class FakeResult:
    response: SipResponse
    flow: object | None


class FakeRegistrar:
    """Answers REGISTERs like a digest-checking registrar; records what it saw, and when."""

    def __init__(self, *, grant: int = 60, password: str = "pw") -> None:
        self.grant = grant
        self.password = password
        self.down = False
        self.delay = 0.001  # before each answer
        self.seen: list[tuple[float, SipRequest]] = []
        self.bindings: dict[str, float] = {}  # contact token -> expiry time
        self.flow_send, self.flow_recv = trio.open_memory_channel[object](100)
        self.flow: object = ("tcp", "127.0.0.1", 5060)

    # -- the Endpoint protocol --
    async def request(self, request: SipRequest, targets: Sequence[object]) -> FakeResult:
        now = trio.current_time()
        self.seen.append((now, request))
        await trio.sleep(self.delay)
        if self.down:
            await trio.sleep(32)
            raise TransactionTimeout("Timer F")
        auth = request.headers.get("Authorization")
        user = None
        if auth:
            user = verify_authorization(
                auth, method="REGISTER",
                password_lookup=lambda u: self.password if u == "alice" else None,
                realm="sip.test",
            )
        if user is None:
            resp = make_response(request, 401)
            resp.headers.add("WWW-Authenticate",
                             make_challenge("sip.test", f"nonce{len(self.seen)}", algorithm="MD5"))
            return FakeResult(resp, self.flow)
        contact = request.headers.get("Contact") or ""
        token = contact.split("sip:", 1)[1].split("@", 1)[0]
        expires = int(request.headers.get("Expires") or "0")
        if expires == 0:
            self.bindings.pop(token, None)
            return FakeResult(make_response(request, 200), self.flow)
        self.bindings[token] = now + self.grant
        resp = make_response(request, 200)
        resp.headers.add("Contact", f"{contact};expires={self.grant}")
        return FakeResult(resp, self.flow)

    def start_request(self, request: SipRequest, targets: Sequence[object],
                      done: Callable[[object], None]) -> Callable[[], None]:
        """``request`` reported through ``done``, as the endpoint's task-less variant."""
        async def run() -> None:
            try:
                result = await self.request(request, targets)
            except (TransactionTimeout, TransportError) as exc:
                done(exc)
                return
            done(result)

        trio.lowlevel.spawn_system_task(run)
        return lambda: None

    def contact_host_port(self, transport: str) -> tuple[str, int]:
        return ("127.0.0.1", 5070)

    def flow_closed_channel(self) -> trio.MemoryReceiveChannel[object]:
        return self.flow_recv


class FakeResolver:
    """A registrar by name: every drive resolves in a task."""

    async def resolve(self, uri: URI) -> list[FakeTarget]:
        return [FakeTarget("udp")]

    def resolve_now(self, uri: URI) -> list[FakeTarget] | None:
        return None


class LiteralResolver(FakeResolver):
    """A registrar by IP literal: drives run without a task (``start_request``)."""

    def resolve_now(self, uri: URI) -> list[FakeTarget] | None:
        return [FakeTarget("udp")]


@pytest.fixture(autouse=True, params=["by-name", "by-ip-literal"])
def resolver_kind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every keeper test runs both ways: drives in tasks, and task-less drives."""
    global RESOLVER
    RESOLVER = FakeResolver if request.param == "by-name" else LiteralResolver
    yield
    RESOLVER = FakeResolver


RESOLVER: type[FakeResolver] = FakeResolver


class FakeStatusStore:
    def __init__(self) -> None:
        self.statuses: dict[str, RegistrationStatus] = {}
        self.known: set[str] = set()
        self.batches: list[int] = []

    async def set_registrations(self, items: list[tuple[str, RegistrationStatus]]) -> int:
        self.batches.append(len(items))
        stored = 0
        for instance_id, status in items:
            if instance_id in self.known:
                self.statuses[instance_id] = status
                stored += 1
        return stored


def record(n: int, password: str = "pw") -> InstanceRecord:
    return InstanceRecord(
        id=f"inst{n:06d}", secret_verifier=b"v", app="com.example", aor="sip:alice@sip.test",
        username="alice", password=password, registrar=None, outbound_proxy=None, expires=600,
        push_provider="apns", push_token="t", push_environment="production",
        contact_token=f"tok{n}", instance_urn=f"urn:uuid:{n}", lifetime=3600, created_at=0.0,
        last_heard_at=0.0, expires_at=3600.0, registration=RegistrationStatus(),
    )


CONFIG = KeeperConfig(
    policy=BindingPolicy(refresh_ratio=0.8, backoff_base=5.0, backoff_cap=40.0),
    register_rate=50.0,
    register_burst=5,
)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def start_keeper(nursery: trio.Nursery, registrar: FakeRegistrar,
                       store: FakeStatusStore | None = None,
                       config: KeeperConfig = CONFIG) -> RegistrationKeeper:
    keeper = RegistrationKeeper(endpoint=registrar, resolver=RESOLVER(),
                                store=store or FakeStatusStore(), config=config,
                                rng=random.Random(3))
    await nursery.start(keeper.run)
    return keeper


def record_drives(keeper: RegistrationKeeper, method: str) -> list[str]:
    """Wrap the keeper's task coroutine ``method``: the instance ids it was started for."""
    started: list[str] = []
    inner = getattr(keeper, method)

    async def counted(entry: Any, *args: Any) -> None:
        started.append(entry.record.id)
        await inner(entry, *args)

    setattr(keeper, method, counted)
    return started


def assert_paced(times: list[float], config: KeeperConfig) -> None:
    """In any window of one second: at most rate + burst REGISTERs."""
    times = sorted(times)
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0:
            j += 1
        assert i - j + 1 <= config.register_rate + config.register_burst


async def test_register_first_waits_for_the_authenticated_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """register_first returns once the 401 → REGISTER → 200 exchange is done."""
    registrar = FakeRegistrar()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        outcome = await keeper.register_first(record(1))
        assert outcome.registered and outcome.status == 200
        assert registrar.bindings.keys() == {"tok1"}
        status = keeper.status("inst000001")
        assert status is not None and status.state == "registered"
        assert status.granted_expires == 60
        nursery.cancel_scope.cancel()


async def test_a_registrar_by_ip_literal_is_kept_without_a_task_per_registration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With nothing to look up and tokens at hand, adopted bindings register and refresh
    from the answers' path: the task that drives a registration never starts."""
    registrar = FakeRegistrar()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        drives = record_drives(keeper, "_drive")
        for n in range(3):
            keeper.adopt(record(n))
        await trio.sleep(130)  # registered, then refreshed twice (grant 60, ratio 0.8)
        assert registrar.bindings.keys() == {"tok0", "tok1", "tok2"}
        assert len(registrar.seen) >= 3 * 4
        if RESOLVER is LiteralResolver:
            assert drives == []
        else:
            assert len(drives) >= 9  # 3 first registrations, 2 refreshes each
        assert keeper._in_flight.value == MAX_IN_FLIGHT  # every drive gave its slot back
        assert not any(entry.busy for entry in keeper._entries.values())
        nursery.cancel_scope.cancel()


async def test_wrong_password_is_reported_and_not_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A refused first attempt comes back as a 401 outcome and the keeper forgets it."""
    registrar = FakeRegistrar()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        outcome = await keeper.register_first(record(1, password="wrong"))
        assert not outcome.registered and outcome.status == 401
        assert not keeper.is_kept("inst000001")
        nursery.cancel_scope.cancel()


async def test_binding_is_refreshed_before_every_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With a 60 s grant the binding never lapses over ten minutes."""
    registrar = FakeRegistrar(grant=60)
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        await keeper.register_first(record(1))
        for _ in range(60):
            await trio.sleep(10)
            assert registrar.bindings["tok1"] > trio.current_time()
        refreshes = [t for t, r in registrar.seen if r.headers.get("Authorization")]
        assert len(refreshes) >= 10
        nursery.cancel_scope.cancel()


async def test_many_adopted_instances_are_paced_by_the_rate_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A restart with 1,000 instances never sends more REGISTERs per second than allowed."""
    registrar = FakeRegistrar(grant=3600)
    store = FakeStatusStore()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar, store)
        for n in range(1000):
            store.known.add(f"inst{n:06d}")
            keeper.adopt(record(n))
        await trio.sleep(60)
        assert len(registrar.bindings) == 1000
        times = sorted(t for t, _ in registrar.seen)
        start = times[0]
        assert_paced(times, CONFIG)
        assert times[-1] - start >= (2000 - CONFIG.register_burst) / CONFIG.register_rate - 1
        assert store.statuses["inst000999"].state == "registered"
        # Statuses are written in batches, not one transaction per REGISTER.
        assert sum(store.batches) >= 1000 and len(store.batches) < 200
        nursery.cancel_scope.cancel()


async def test_drives_out_of_tokens_go_on_without_a_task_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At the rate limit the dispatcher spends each token as it comes, so a 401's
    authenticated REGISTER finds the bucket empty: it waits in the keeper's one queue,
    served in order, instead of in a task of its own; the rate limit still holds."""
    registrar = FakeRegistrar(grant=3600)
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        tasks = record_drives(keeper, "_drive_sends")
        waited = 0
        for n in range(300):
            keeper.adopt(record(n))
        while len(registrar.bindings) < 300:
            await trio.sleep(0.05)
            waited = max(waited, len(keeper._out_of_tokens))
        assert tasks == []
        if RESOLVER is LiteralResolver:
            assert waited > 0  # the queue was used: the bucket did run dry mid-drive
        assert_paced([t for t, _ in registrar.seen], CONFIG)
        await trio.sleep(1)
        assert keeper._in_flight.value == MAX_IN_FLIGHT
        assert not any(entry.busy for entry in keeper._entries.values())
        nursery.cancel_scope.cancel()


async def test_an_idle_dispatcher_goes_on_with_a_drive_out_of_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A create's first REGISTER takes the bucket's last token; its authenticated REGISTER
    then waits for the next one, and the idle dispatcher is woken to send it."""
    registrar = FakeRegistrar()
    config = attrs.evolve(CONFIG, register_rate=1.0, register_burst=1)
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar, config=config)
        with trio.fail_after(10):
            outcome = await keeper.register_first(record(1))
        assert outcome.registered
        assert [t for t, _ in registrar.seen][1] >= 0.99  # one token per second
        nursery.cancel_scope.cancel()


async def test_a_dispatcher_waiting_for_a_slot_goes_on_with_drives_out_of_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every in-flight slot is taken and the burst is spent: the drives holding the slots
    wait for tokens, so no slot frees until the dispatcher, waiting for one, serves them."""
    registrar = FakeRegistrar(grant=3600)
    registrar.delay = 0.5
    config = attrs.evolve(CONFIG, register_rate=1.0, register_burst=MAX_IN_FLIGHT)
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar, config=config)
        for n in range(MAX_IN_FLIGHT + 10):
            keeper.adopt(record(n))
        with trio.fail_after(400):  # 2 × 138 REGISTERs, the first 128 at once, then 1/s
            while len(registrar.bindings) < MAX_IN_FLIGHT + 10:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_drives_waiting_for_tokens_end_when_the_keeper_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Stopping the keeper ends the drives that wait for a token: nothing more is sent,
    and each gives its in-flight slot back."""
    registrar = FakeRegistrar(grant=3600)
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        for n in range(200):
            keeper.adopt(record(n))
        while not keeper._out_of_tokens and len(registrar.bindings) < 200:
            await trio.sleep(0.01)
        queued = len(keeper._out_of_tokens)
        nursery.cancel_scope.cancel()
    seen = len(registrar.seen)
    await trio.sleep(5)  # the REGISTERs in flight are answered; their drives end
    assert keeper._out_of_tokens == collections.deque()
    if RESOLVER is LiteralResolver:
        assert queued > 0
        assert len(registrar.seen) == seen  # the queued drives sent nothing more
    assert keeper._in_flight.value == MAX_IN_FLIGHT
    assert not any(entry.busy for entry in keeper._entries.values())


async def test_remove_sends_expires_zero_and_forgets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """remove() unREGISTERs (Expires: 0) and stops refreshing."""
    registrar = FakeRegistrar()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        await keeper.register_first(record(1))
        await keeper.remove("inst000001")
        assert registrar.bindings == {}
        assert registrar.seen[-1][1].headers.get("Expires") == "0"
        count = len(registrar.seen)
        await trio.sleep(300)
        assert len(registrar.seen) == count
        assert keeper.status("inst000001") is None
        nursery.cancel_scope.cancel()


async def test_provider_down_backs_off_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Timeouts move the binding to backoff with a next attempt; it re-registers when back."""
    registrar = FakeRegistrar(grant=60)
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        await keeper.register_first(record(1))
        registrar.down = True
        await trio.sleep(120)
        status = keeper.status("inst000001")
        assert status is not None and status.state == "backoff"
        assert status.last_error and "timeout" in status.last_error
        assert status.next_attempt_at is not None
        registrar.down = False
        registrar.bindings.clear()
        await trio.sleep(CONFIG.policy.backoff_cap + 40)
        status = keeper.status("inst000001")
        assert status is not None and status.state == "registered"
        assert "tok1" in registrar.bindings
        nursery.cancel_scope.cancel()


async def test_a_lost_flow_triggers_a_new_register(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the TCP flow a binding lives on closes, the keeper registers again at once."""
    registrar = FakeRegistrar(grant=3600)
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        await keeper.register_first(record(1))
        before = len(registrar.seen)
        await registrar.flow_send.send(registrar.flow)
        await trio.sleep(1)
        assert len(registrar.seen) > before
        status = keeper.status("inst000001")
        assert status is not None and status.state == "registered"
        nursery.cancel_scope.cancel()


async def test_cancelled_create_unregisters_what_may_have_been_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The API's timeout cancels register_first: nothing stays bound or kept."""
    registrar = FakeRegistrar()

    class SlowRegistrar(FakeRegistrar):
        async def request(self, request: SipRequest, targets: Sequence[object]) -> FakeResult:
            await trio.sleep(5)
            return await registrar.request(request, targets)

    slow = SlowRegistrar()
    slow.bindings = registrar.bindings
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, slow)
        with trio.move_on_after(7):
            await keeper.register_first(record(1))
        await trio.sleep(30)
        assert not keeper.is_kept("inst000001")
        assert registrar.bindings == {}
        nursery.cancel_scope.cancel()


async def test_token_bucket_allows_a_burst_then_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """burst tokens at once, then one every 1/rate seconds."""
    bucket = TokenBucket(rate=10, burst=3)
    start = trio.current_time()
    stamps = []
    for _ in range(13):
        await bucket.acquire()
        stamps.append(trio.current_time() - start)
    assert stamps[:3] == [0, 0, 0]
    assert stamps[-1] == pytest.approx(1.0, abs=0.01)


def test_state_values_match_the_api_vocabulary() -> None:
    """The states the API shows are the ones SPEC.md and the store know."""
    from sipis.store.models import REGISTRATION_STATES

    for state in (RegState.REGISTERING, RegState.REGISTERED, RegState.BACKOFF,
                  RegState.AUTH_FAILED, RegState.UNREGISTERED):
        assert state.value in REGISTRATION_STATES


async def test_queued_statuses_are_written_when_the_keeper_stops(
        autojump_clock: trio.testing.MockClock) -> None:
    """SIGTERM persists everything: a status queued for the batch writer when the keeper is
    cancelled is still written (shielded), in one batch."""
    registrar = FakeRegistrar(grant=3600)
    store = FakeStatusStore()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar, store)
        store.known.add("inst000001")
        keeper.adopt(record(1))
        with trio.fail_after(5):
            while "tok1" not in registrar.bindings:
                await trio.sleep(0.01)
        await trio.sleep(0.05)  # registered, status queued, batch delay still running
        assert "inst000001" not in store.statuses
        nursery.cancel_scope.cancel()
    assert store.statuses["inst000001"].state == "registered"


async def test_registered_since_tells_the_sweeper_state_and_last_success_cheaply(
        autojump_clock: trio.testing.MockClock) -> None:
    registrar = FakeRegistrar(grant=3600)
    store = FakeStatusStore()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar, store)
        assert keeper.registered_since("inst000001") is None
        store.known.add("inst000001")
        keeper.adopt(record(1))
        with trio.fail_after(5):
            while "tok1" not in registrar.bindings:
                await trio.sleep(0.01)
        answer = keeper.registered_since("inst000001")
        status = keeper.status("inst000001")
        assert answer is not None and status is not None
        assert answer == (True, status.last_registered_at)
        nursery.cancel_scope.cancel()


async def test_after_the_keeper_stops_a_remove_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shutdown unregisters nothing: a wipe arriving after the keeper stopped forgets the
    instance without a REGISTER and without an error."""
    registrar = FakeRegistrar()
    async with trio.open_nursery() as nursery:
        keeper = await start_keeper(nursery, registrar)
        assert (await keeper.register_first(record(1))).registered
        nursery.cancel_scope.cancel()
    seen = len(registrar.seen)
    await keeper.remove("inst000001", wait=False)
    await trio.sleep(5)
    assert len(registrar.seen) == seen
    assert not keeper.is_kept("inst000001")
    assert registrar.bindings.keys() == {"tok1"}
