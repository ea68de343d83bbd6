"""The call driver with fakes: the SIP endpoint, the server transaction, store, push, service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing

from sipis.calls.call import CallConfig
from sipis.calls.device import device_ha1s
from sipis.calls.driver import CallDriver, DriverSettings
from sipis.push.base import InvalidToken, PushKind, PushRequest, PushResult
from sipis.sip.digest import DigestClient, choose_challenge, parse_challenge
from sipis.sip.endpoint import ClientResult, ServerInviteHandle
from sipis.sip.errors import TransportError
from sipis.sip.headers import URI
from sipis.sip.message import Headers, SipRequest, SipResponse, make_response
from sipis.sip.transport import Destination, Source
from sipis.store.memory import MemoryStore
from sipis.store.models import InstanceRecord, RegistrationStatus

REALM = "127.0.0.1"
SECRET = "device-secret-0123456789"
RECORD = InstanceRecord(
    id="inst-0001", secret_verifier=b"v", app="com.example.phone", aor="sip:alice@sip.test",
    username="alice", password="pw", registrar=None, outbound_proxy=None, expires=600,
    push_provider="apns", push_token="ab" * 32, push_environment="production",
    contact_token="tok1", instance_urn="urn:uuid:1", lifetime=3600, created_at=0.0,
    last_heard_at=0.0, expires_at=3600.0, registration=RegistrationStatus(),
)
CALLER = Source("udp", "127.0.0.1", 5070)
PHONE = Source("udp", "127.0.0.1", 40000)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class FakeStore(MemoryStore):
    """The in-memory store holding RECORD."""

    def __init__(self) -> None:
        super().__init__([RECORD])


@attrs.define
class FakePolicy:
    realm: str = REALM


class FakeService:
    def __init__(self) -> None:
        self.policy = FakePolicy()
        self.touched: list[str] = []
        self.wiped: list[tuple[str, str]] = []
        self.ha1 = device_ha1s(SECRET, RECORD.id, REALM)

    def device_ha1_cached(self, instance_id: str, algorithm: str) -> str | None:
        return self.ha1.get(algorithm) if instance_id == RECORD.id else None

    def kept_record_by_contact_token(self, token: str) -> InstanceRecord | None:
        return None  # the driver falls back to the store

    async def touch(self, instance_id: str) -> InstanceRecord:
        self.touched.append(instance_id)
        return RECORD

    async def wipe(self, instance_id: str, reason: str) -> bool:
        self.wiped.append((instance_id, reason))
        return True


class FakePush:
    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[PushRequest] = []
        self.error = error

    def start(self, request: PushRequest) -> None:
        return None  # nothing at once: send does all of it

    async def send(self, request: PushRequest, *, deadline: float,
                   started: object = None) -> PushResult:
        self.sent.append(request)
        await trio.sleep(0.05)
        if self.error is not None and request.kind is PushKind.CALL:
            raise self.error
        return PushResult("apns")


class FakeEndpoint:
    def __init__(self) -> None:
        self.invites: list[tuple[SipRequest, Destination]] = []
        self.requests: list[tuple[SipRequest, Destination]] = []
        self.answers: list[int] = []  # statuses for request(); empty → TransportError

    def contact_host_port(self, transport: str) -> tuple[str, int]:
        return "127.0.0.1", 5060

    async def invite(self, request: SipRequest, destination: Destination, *,
                     replace_top_via: bool = False) -> Any:
        self.invites.append((request, destination))
        raise TransportError("flow closed")

    async def request(self, request: SipRequest, targets: list[Destination], *,
                      replace_top_via: bool = False) -> Any:
        self.requests.append((request, targets[0]))
        if not self.answers:
            raise TransportError("not in this test")
        return ClientResult(make_response(request, self.answers.pop(0), to_tag="dev"),
                            targets[0], None)

    async def send_request_stateless(self, request: SipRequest, destination: Destination, *,
                                     add_via: bool = False) -> None:
        return None

    def flow_closed_channel(self) -> trio.MemoryReceiveChannel[Any]:
        return trio.open_memory_channel[Any](1)[1]


class FakeTx:
    """Records what a ServerInviteHandle would send."""

    def __init__(self, request: SipRequest) -> None:
        self.request = request
        self.sent: list[SipResponse] = []
        self.cancelled = trio.Event()
        self.cancel_reason: str | None = None
        self.on_cancel: Callable[[str | None], None] | None = None
        self.destination = Destination("udp", CALLER.host, CALLER.port)

    def make_response(self, status: int, reason: str | None = None) -> SipResponse:
        return make_response(self.request, status, reason, to_tag="our-tag")

    async def send_provisional(self, response: SipResponse) -> bool:
        self.sent.append(response)
        return True

    async def send_final(self, response: SipResponse) -> bool:
        self.sent.append(response)
        return True

    async def send_2xx(self, response: SipResponse) -> bool:
        self.sent.append(response)
        return True

    async def wait_cancelled(self) -> str | None:
        await self.cancelled.wait()
        return self.cancel_reason

    def when_cancelled(self, callback: Callable[[str | None], None]) -> None:
        if self.cancelled.is_set():
            callback(self.cancel_reason)
        else:
            self.on_cancel = callback

    def cancel(self, reason: str | None) -> None:
        """What the endpoint does when a CANCEL comes."""
        self.cancel_reason = reason
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(reason)

    def summary(self) -> list[tuple[int, str | None, str | None]]:
        return [(r.status, r.headers.get("X-Sipis-Push-Status"), r.headers.get("X-Sipis-Reason"))
                for r in self.sent]


def request(method: str, uri: str = "sip:tok1@127.0.0.1", **extra: str) -> SipRequest:
    headers = Headers([
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKc1;rport=5070"),
        ("From", '"Bob" <sip:bob@sip.test>;tag=caller'),
        ("To", "<sip:alice@sip.test>"),
        ("Call-ID", f"{method.lower()}-1@test"),
        ("CSeq", f"1 {method}"),
        ("Max-Forwards", "69"),
    ])
    for name, value in extra.items():
        headers.add(name.replace("_", "-"), value)
    return SipRequest(method, URI.parse(uri), headers)


def driver(push: FakePush | None = None, store: MemoryStore | None = None,
           **settings: Any) -> tuple[CallDriver, FakeService, FakeEndpoint, FakePush]:
    push = push or FakePush()
    d = CallDriver(store=store or FakeStore(), push=push, settings=DriverSettings(
        public_host="127.0.0.1", local_hosts=frozenset({"127.0.0.1"}),
        call=CallConfig(ring_timeout=2.0, progress_timeout=2.0), **settings))
    service, endpoint = FakeService(), FakeEndpoint()
    d.attach(endpoint=endpoint, service=service)
    return d, service, endpoint, push


async def invite(d: CallDriver, req: SipRequest | None = None) -> FakeTx:
    req = req or request("INVITE")
    tx = FakeTx(req)
    await d.handle_invite(req, CALLER, cast(ServerInviteHandle, tx))
    return tx


async def device_register(d: CallDriver, cseq: int = 1) -> SipResponse:
    client = DigestClient(RECORD.id, SECRET)
    headers = Headers([
        ("Via", "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKr1;rport=40000;received=127.0.0.1"),
        ("From", f"<sip:{RECORD.id}@127.0.0.1>;tag=d1"),
        ("To", f"<sip:{RECORD.id}@127.0.0.1>"),
        ("Call-ID", "reg-1"), ("CSeq", f"{cseq} REGISTER"),
        ("Contact", "<sip:phone@10.0.0.2:5060>"), ("Expires", "600"),
    ])
    first = SipRequest("REGISTER", URI.parse("sip:127.0.0.1"), headers)
    challenge = await d.handle_request(first, PHONE)
    assert challenge is not None and challenge.status == 401
    chosen = choose_challenge([parse_challenge(v)
                               for v in challenge.headers.get_all("WWW-Authenticate")])
    second = SipRequest("REGISTER", first.uri, headers.copy())
    second.headers.set("CSeq", f"{cseq + 1} REGISTER")
    second.headers.add("Authorization", client.authorize(chosen, method="REGISTER",
                                                         uri="sip:127.0.0.1"))
    response = await d.handle_request(second, PHONE)
    assert response is not None
    return response


async def test_options_is_200_and_foreign_request_uri_is_refused_403() -> None:
    d, *_ = driver()
    ok = await d.handle_request(request("OPTIONS"), CALLER)
    assert ok is not None and ok.status == 200 and "INVITE" in (ok.headers.get("Allow") or "")
    refused = await d.handle_request(request("MESSAGE", "sip:tok1@evil.example"), CALLER)
    assert refused is not None and refused.status == 403
    bye = await d.handle_request(request("BYE"), CALLER)
    assert bye is not None and bye.status == 481
    assert await d.handle_request(request("ACK"), CALLER) is None


async def test_invite_to_unknown_contact_token_is_404() -> None:
    d, *_ = driver()
    tx = await invite(d, request("INVITE", "sip:nobody@127.0.0.1"))
    assert tx.summary() == [(404, None, None)]


async def test_forged_route_through_us_is_refused_403() -> None:
    d, *_ = driver()
    req = request("BYE", "sip:someone@203.0.113.9",
                  Route="<sip:127.0.0.1:5060;lr;r=00.tok1;sipis>")
    response = await d.handle_request(req, CALLER)
    assert response is not None and response.status == 403


async def test_unanswered_call_pushes_rings_twice_and_ends_480_after_t1(
        autojump_clock: trio.testing.MockClock) -> None:
    d, _, _, push = driver()
    start = trio.current_time()
    tx = await invite(d)
    assert tx.summary() == [
        (180, "Alerting-Device", None),
        (180, "Push-Notification-Sent", None),
        (480, None, "No-Response-From-Device"),
    ]
    assert 2.0 <= trio.current_time() - start < 2.5
    call, ended = push.sent
    assert call.kind is PushKind.CALL and call.target.token == RECORD.push_token
    assert call.instance == RECORD.id and call.from_name == "Bob"
    assert call.from_uri == "sip:bob@sip.test" and call.sip_call_id == "invite-1@test"
    assert ended.kind is PushKind.CALL_ENDED and ended.reason == "timeout"
    assert ended.call == call.call
    assert d.outcomes["missed"] == 1


async def test_dead_push_token_is_480_and_wipes_the_instance(
        autojump_clock: trio.testing.MockClock) -> None:
    d, service, _, _ = driver(FakePush(InvalidToken("BadDeviceToken")))
    tx = await invite(d)
    assert tx.summary() == [(180, "Alerting-Device", None), (480, None, "Push-Token-Invalid")]
    assert service.wiped == [(RECORD.id, "push-token-invalid")]


async def test_upstream_cancel_is_487_and_a_call_ended_push(
        autojump_clock: trio.testing.MockClock) -> None:
    d, _, _, push = driver()
    req = request("INVITE")
    tx = FakeTx(req)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.handle_invite, req, CALLER, cast(ServerInviteHandle, tx))
        await trio.sleep(0.5)
        tx.cancel('SIP;cause=200;text="Call completed elsewhere"')
    assert [s for s, *_ in tx.summary()] == [180, 180, 487]
    assert push.sent[-1].kind is PushKind.CALL_ENDED
    assert push.sent[-1].reason == "answered-elsewhere"
    assert d._waiting == {}  # the ended call no longer waits for its device


class StartingPush(FakePush):
    """Sends a call push at once (``start``): the call's task writes it before it yields."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[PushRequest] = []
        self.handed: list[tuple[PushKind, object]] = []

    def start(self, request: PushRequest) -> Any:
        self.started.append(request)
        return ("started", request.call)

    async def send(self, request: PushRequest, *, deadline: float,
                   started: object = None) -> PushResult:
        self.handed.append((request.kind, started))
        return await super().send(request, deadline=deadline)


async def test_the_call_push_is_started_before_the_calls_task_yields(
        autojump_clock: trio.testing.MockClock) -> None:
    """The call push is begun from the call's own task (``start``), and what ``start``
    gave is handed to ``send``, which only waits for the answer; alert pushes just send."""
    push = StartingPush()
    d, _, _, _ = driver(push)
    req = request("INVITE")
    tx = FakeTx(req)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.handle_invite, req, CALLER, cast(ServerInviteHandle, tx))
        await trio.testing.wait_all_tasks_blocked()
        [call_push] = push.started
        assert call_push.kind is PushKind.CALL
        tx.cancel(None)
    assert push.handed == [(PushKind.CALL, ("started", call_push.call)),
                           (PushKind.CALL_ENDED, None)]


async def test_device_register_wakes_the_held_call_and_forwards_to_its_source(
        autojump_clock: trio.testing.MockClock) -> None:
    d, service, endpoint, _ = driver()
    req = request("INVITE")
    tx = FakeTx(req)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.handle_invite, req, CALLER, cast(ServerInviteHandle, tx))
        await trio.sleep(0.5)
        response = await device_register(d)
        assert response.status == 200
        assert service.touched == [RECORD.id]
        await trio.sleep(0.1)
        [(forwarded, dest)] = endpoint.invites
        assert str(forwarded.uri) == "sip:phone@10.0.0.2:5060"
        assert (dest.host, dest.port) == ("127.0.0.1", 40000)
        record_route = forwarded.headers.get_list("Record-Route")
        assert record_route and ";sipis" in record_route[0]
        assert RECORD.id not in record_route[0]  # the token names the contact token
    # The forward failed (flow closed) after a push: wait for a new REGISTER under T2.
    assert tx.summary()[-1] == (480, None, "No-Response-From-Device")
    assert d._waiting == {}


async def test_message_is_200_and_an_alert_push_without_the_body() -> None:
    d, _, _, push = driver()
    req = request("MESSAGE", Content_Type="text/plain")
    req.body = b"secret text"
    response = await d.handle_request(req, CALLER)
    assert response is not None and response.status == 200
    [sent] = push.sent
    assert sent.kind is PushKind.MESSAGE and sent.body is None and sent.from_name == "Bob"


# --- held messages, call records, wipes ------------------------------------------------------


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def message(body: bytes = b"Lunch at noon?", content_type: str = "text/plain") -> SipRequest:
    req = request("MESSAGE", Content_Type=content_type)
    req.body = body
    return req


async def test_message_is_held_pushed_and_delivered_in_order_when_the_device_registers(
) -> None:
    """MESSAGE → 200, held encrypted in the store and an alert push; the device REGISTERs →
    each held message goes to it as a MESSAGE (original From/To, Date, type, body) and, on
    200, is dropped from the store."""
    store = FakeStore()
    d, _, endpoint, push = driver(store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        for text in (b"first", b"second"):
            response = await d.handle_request(message(text), CALLER)
            assert response is not None and response.status == 200
        await settle()
        assert [p.kind for p in push.sent] == [PushKind.MESSAGE, PushKind.MESSAGE]
        assert [m.body for m in await store.held_messages(RECORD.id)] == [b"first", b"second"]
        endpoint.answers = [200, 200]
        assert (await device_register(d)).status == 200
        await settle()
        nursery.cancel_scope.cancel()
    assert [r.body for r, _ in endpoint.requests] == [b"first", b"second"]
    sent, dest = endpoint.requests[0]
    assert sent.method == "MESSAGE" and str(sent.uri) == "sip:phone@10.0.0.2:5060"
    assert (dest.host, dest.port) == (PHONE.host, PHONE.port)
    assert sent.from_.uri == URI.parse("sip:bob@sip.test") and sent.from_.tag
    assert sent.from_.display_name == "Bob" and sent.from_.tag != "caller"
    assert str(sent.to.uri) == "sip:alice@sip.test" and sent.to.tag is None
    assert sent.headers.get("Content-Type") == "text/plain"
    assert (sent.headers.get("Date") or "").endswith("GMT")
    assert sent.call_id != "message-1@test"
    assert await store.held_messages(RECORD.id) == []


async def test_a_temporary_refusal_keeps_the_message_for_the_next_register() -> None:
    """480 (or a timeout) from the device: kept, in order; delivered at the next REGISTER."""
    store = FakeStore()
    d, _, endpoint, _ = driver(store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        await d.handle_request(message(b"one"), CALLER)
        await d.handle_request(message(b"two"), CALLER)
        endpoint.answers = [480]
        await device_register(d)
        await settle()
        assert [m.body for m in await store.held_messages(RECORD.id)] == [b"one", b"two"]
        assert len(endpoint.requests) == 1  # stopped at the first failure: order is kept
        endpoint.answers = [200, 415]  # a permanent refusal drops the message too
        assert (await device_register(d, cseq=3)).status == 200
        await settle()
        nursery.cancel_scope.cancel()
    assert [r.body for r, _ in endpoint.requests] == [b"one", b"one", b"two"]
    assert await store.held_messages(RECORD.id) == []


async def test_message_for_a_live_binding_is_delivered_at_once_without_a_push() -> None:
    store = FakeStore()
    d, _, endpoint, push = driver(store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        await device_register(d)
        endpoint.answers = [200]
        response = await d.handle_request(message(b"hi"), CALLER)
        assert response is not None and response.status == 200
        await settle()
        nursery.cancel_scope.cancel()
    assert push.sent == []
    assert [r.body for r, _ in endpoint.requests] == [b"hi"]
    assert await store.held_messages(RECORD.id) == []


async def test_is_composing_is_answered_200_and_neither_held_nor_pushed() -> None:
    store = FakeStore()
    d, _, _, push = driver(store=store)
    body = b'<?xml version="1.0"?><isComposing><state>active</state></isComposing>'
    response = await d.handle_request(
        message(body, "application/im-iscomposing+xml"), CALLER)
    assert response is not None and response.status == 200
    assert push.sent == [] and await store.held_messages(RECORD.id) == []


async def test_past_the_held_maximum_a_message_is_486_and_not_pushed() -> None:
    store = FakeStore()
    d, _, _, push = driver(store=store, max_held_messages=2)
    statuses = []
    for n in range(3):
        response = await d.handle_request(message(b"m%d" % n), CALLER)
        assert response is not None
        statuses.append(response.status)
    assert statuses == [200, 200, 486]
    assert len(push.sent) == 2


async def test_held_messages_expire_with_the_retention(
        autojump_clock: trio.testing.MockClock) -> None:
    now = [1000.0]
    store = FakeStore()
    d = CallDriver(store=store, push=FakePush(), clock=lambda: now[0], settings=DriverSettings(
        public_host="127.0.0.1", local_hosts=frozenset({"127.0.0.1"}),
        message_retention=60.0, call_record_retention=600.0))
    d.attach(endpoint=FakeEndpoint(), service=FakeService())
    await d.handle_request(message(), CALLER)
    assert await d.purge() == (0, 0)
    now[0] += 61
    assert await d.purge() == (1, 0)
    assert await store.held_messages(RECORD.id) == []


async def test_every_finished_call_leaves_a_call_record_until_the_retention(
        autojump_clock: trio.testing.MockClock) -> None:
    """A call nobody answered is recorded as missed, with the caller and the call ref of its
    pushes; GET …/calls (call_records) stops showing it after the retention, purge drops it."""
    now = [5000.0]
    store = FakeStore()
    push = FakePush()
    d = CallDriver(store=store, push=push, clock=lambda: now[0], settings=DriverSettings(
        public_host="127.0.0.1", local_hosts=frozenset({"127.0.0.1"}),
        call=CallConfig(ring_timeout=2.0, progress_timeout=2.0), call_record_retention=600.0))
    d.attach(endpoint=FakeEndpoint(), service=FakeService())
    await invite(d)
    [record] = await d.call_records(RECORD.id)
    assert record.outcome == "missed" and record.call == push.sent[0].call
    assert record.from_uri == "sip:bob@sip.test" and record.from_name == "Bob"
    assert record.sip_call_id == "invite-1@test" and record.started_at == 5000.0
    now[0] += 601
    assert await d.call_records(RECORD.id) == []
    assert await d.purge() == (0, 1)


async def test_forget_instance_drops_its_device_bindings() -> None:
    """Any wipe (API, sweeper, CLI) tells the driver: the device binding goes with it."""
    d, *_ = driver()
    await device_register(d)
    assert d.registrar.bindings.live(RECORD.id, trio.current_time())
    d.forget_instance(RECORD.id, "deleted")
    assert not d.registrar.bindings.live(RECORD.id, trio.current_time())


async def test_message_body_goes_into_the_push_only_where_configured() -> None:
    d, _, _, push = driver(message_body=True)
    response = await d.handle_request(message(b"Lunch at noon?"), CALLER)
    assert response is not None and response.status == 200
    [sent] = push.sent
    assert sent.kind is PushKind.MESSAGE and sent.body == "Lunch at noon?"


class DeadTokenPush(FakePush):
    """Every push is refused: the token is dead (APNs 410 / FCM UNREGISTERED)."""

    async def send(self, request: PushRequest, *, deadline: float,
                   started: object = None) -> PushResult:
        self.sent.append(request)
        raise InvalidToken("Unregistered")


async def test_a_dead_token_on_an_alert_push_wipes_the_instance_too() -> None:
    """Not only call pushes: a message or instance-expiring push refused for a dead token
    wipes the instance through the one wipe path."""
    d, service, _, push = driver(push=DeadTokenPush())
    response = await d.handle_request(message(), CALLER)
    assert response is not None and response.status == 200
    await d.instance_expiring(RECORD)
    assert [p.kind for p in push.sent] == [PushKind.MESSAGE, PushKind.INSTANCE_EXPIRING]
    assert push.sent[1].to_uri == RECORD.aor and push.sent[1].target.token == RECORD.push_token
    assert service.wiped == [(RECORD.id, "push-token-invalid")] * 2
