"""The APNs client: pure builders and mapping, the provider token, and the real client
against the local APNs (``tests/peers/apns_server.py``) over HTTP/2 and TLS on 127.0.0.1."""

from __future__ import annotations

import base64
import collections
import functools
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.settings
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sipis.push.apns import (
    MAX_ALERT_PAYLOAD,
    ApnsClient,
    ApnsSettings,
    ApnsTokenProvider,
    _Connection,
    _Endpoint,
    _Exchange,
    _TlsStream,
    build_payload,
    build_request,
    collapse_id,
    make_ssl_context,
    parse_response,
)
from sipis.push.base import (
    InvalidToken,
    PushAuthError,
    PushConfigError,
    PushError,
    PushKind,
    PushRequest,
    PushRetryable,
    PushTarget,
)
from sipis.push.dispatcher import PushDispatcher
from tests.peers.apns_server import BUNDLE, KEY_ID, TEAM_ID, ApnsServer, Reply, TestKey
from tests.peers.ports import free_port

KEY = TestKey.generate()
TOKEN = "a1" * 32
NOW = 1_800_000_000.0


def make_request(kind: PushKind = PushKind.CALL, *, token: str = TOKEN, app: str = BUNDLE,
                 environment: str | None = "production", **fields: Any) -> PushRequest:
    defaults: dict[str, Any] = {"instance": "inst-0001", "sent_at": int(NOW),
                                "from_uri": "sip:bob@example.net", "from_name": "Bob"}
    if kind is PushKind.CALL:
        defaults["call"] = "call-1"
    defaults.update(fields)
    return PushRequest(kind=kind, target=PushTarget("apns", token, app, environment), **defaults)


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- builders --------------------------------------------------------------------------------

def test_voip_push_goes_to_the_voip_topic_at_priority_10_expiring_at_once() -> None:
    """A call is a VoIP push on {bundle}.voip, priority 10, apns-expiration 0."""
    path, headers, _ = build_request(make_request(), now=NOW, apns_id="id-1")
    assert path == f"/3/device/{TOKEN}"
    assert headers == {"apns-push-type": "voip", "apns-topic": f"{BUNDLE}.voip",
                       "apns-priority": "10", "apns-expiration": "0", "apns-id": "id-1"}


@pytest.mark.parametrize(("kind", "priority", "ttl"), [
    (PushKind.CALL_ENDED, "10", 3600),
    (PushKind.MESSAGE, "10", 86400),
    (PushKind.INSTANCE_EXPIRING, "5", 3600),
])
def test_alert_pushes_go_to_the_bundle_topic_and_expire_later(
        kind: PushKind, priority: str, ttl: int) -> None:
    """Alerts use the bundle topic, are kept by Apple for a while, and have an aps alert."""
    _, headers, body = build_request(make_request(kind), now=NOW)
    assert headers == {"apns-push-type": "alert", "apns-topic": BUNDLE,
                       "apns-priority": priority, "apns-expiration": str(int(NOW) + ttl)}
    payload = json.loads(body)
    assert payload["aps"]["alert"]["title"]
    assert payload["sipis"]["type"] == kind.value


def test_topic_bundle_overrides_the_targets_app() -> None:
    """An explicit topic bundle wins over the target's app id."""
    _, headers, _ = build_request(make_request(), now=NOW, topic_bundle="org.other")
    assert headers["apns-topic"] == "org.other.voip"


def test_payload_carries_the_spec_keys_in_a_sipis_object() -> None:
    """The SPEC.md keys, as strings, in ``sipis``; a VoIP push has no ``aps``."""
    request = make_request(to_uri="sip:alice@example.net", sip_call_id="abc@host")
    _, _, body = build_request(request, now=NOW)
    assert json.loads(body) == {"sipis": {
        "type": "call", "instance": "inst-0001", "call": "call-1",
        "from_uri": "sip:bob@example.net", "from_name": "Bob", "to_uri": "sip:alice@example.net",
        "sip_call_id": "abc@host", "sent_at": str(int(NOW))}}


def test_call_ended_alert_says_missed_or_answered_elsewhere() -> None:
    """The alert title follows the call-ended reason; the reason is in the payload too."""
    missed = build_payload(make_request(PushKind.CALL_ENDED, reason="cancelled"))
    elsewhere = build_payload(make_request(PushKind.CALL_ENDED, reason="answered-elsewhere"))
    assert missed["aps"]["alert"] == {"title": "Missed call", "body": "Bob"}
    assert elsewhere["aps"]["alert"]["title"] == "Answered elsewhere"
    assert elsewhere["sipis"]["reason"] == "answered-elsewhere"


def test_collapse_id_is_kept_up_to_64_bytes_and_hashed_beyond() -> None:
    """apns-collapse-id is at most 64 bytes; longer ids stay distinct (hashed)."""
    assert collapse_id("x" * 64) == "x" * 64
    long_a, long_b = collapse_id("é" * 40), collapse_id("é" * 41)
    assert len(long_a.encode()) == 64 and long_a != long_b
    assert len(collapse_id("a\r\nb")) == 64  # nothing that could break the header
    _, headers, _ = build_request(make_request(collapse_id="y" * 100), now=NOW)
    assert len(headers["apns-collapse-id"].encode()) == 64


def test_long_message_body_is_shortened_to_fit_the_alert_limit() -> None:
    """A MESSAGE body too large for 4096 bytes is cut (with "…"), not refused."""
    request = make_request(PushKind.MESSAGE, body="ü" * 5000)
    _, _, body = build_request(request, now=NOW)
    assert MAX_ALERT_PAYLOAD - 8 < len(body) <= MAX_ALERT_PAYLOAD  # cut no more than needed
    payload = json.loads(body)
    assert payload["sipis"]["body"].endswith("…")
    assert payload["aps"]["alert"]["body"] == payload["sipis"]["body"]


def test_payload_too_large_without_a_body_to_shorten_is_refused() -> None:
    """Nothing to cut: PushError PayloadTooLarge (status 413), before any I/O."""
    with pytest.raises(PushError) as caught:
        build_request(make_request(from_name="x" * 6000), now=NOW)
    assert caught.value.reason == "PayloadTooLarge" and caught.value.status == 413


@pytest.mark.parametrize("app", ["", "com.example\r\nx: y", "com example"])
def test_bundle_that_cannot_be_a_topic_is_refused(app: str) -> None:
    """A bundle id that would break the apns-topic header: PushError BadTopic, no I/O."""
    with pytest.raises(PushError, match="BadTopic"):
        build_request(make_request(app=app), now=NOW)


@pytest.mark.parametrize("token", ["", "ab/../cd", "ab cd", "ab?x=1"])
def test_token_that_cannot_be_a_path_is_a_dead_token(token: str) -> None:
    """A token that would break the request path is refused as BadDeviceToken."""
    with pytest.raises(InvalidToken, match="BadDeviceToken"):
        build_request(make_request(token=token), now=NOW)


# --- response mapping ------------------------------------------------------------------------

def reason(text: str, **extra: Any) -> bytes:
    return json.dumps({"reason": text, **extra}).encode()


def test_200_is_a_result_with_the_apns_id() -> None:
    """200: accepted; the result carries apns-id."""
    result = parse_response(200, {"apns-id": "abc"}, b"")
    assert (result.provider, result.id, result.attempts) == ("apns", "abc", 1)


@pytest.mark.parametrize(("status", "body"), [
    (410, reason("Unregistered", timestamp=1)),
    (410, b""),
    (400, reason("BadDeviceToken")),
])
def test_dead_token_answers_raise_invalid_token(status: int, body: bytes) -> None:
    """410, BadDeviceToken and Unregistered mean the token is dead."""
    with pytest.raises(InvalidToken) as caught:
        parse_response(status, {}, body)
    assert caught.value.status == status


@pytest.mark.parametrize(("status", "headers", "retry_after"), [
    (429, {"retry-after": "7"}, 7.0),
    (429, {}, None),
    (500, {}, None),
    (503, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
])
def test_429_and_5xx_are_retryable(status: int, headers: dict[str, str],
                                   retry_after: float | None) -> None:
    """Too many requests and server errors: retry, after Retry-After seconds if given."""
    with pytest.raises(PushRetryable) as caught:
        parse_response(status, headers, reason("ServiceUnavailable"))
    assert caught.value.retry_after == retry_after
    assert caught.value.status == status


def test_403_is_an_auth_error() -> None:
    """Provider token refused: the operator's problem."""
    with pytest.raises(PushAuthError, match="InvalidProviderToken"):
        parse_response(403, {}, reason("InvalidProviderToken"))


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, reason("BadTopic"), "BadTopic"),
    (400, reason("TopicDisallowed"), "TopicDisallowed"),
    (413, reason("PayloadTooLarge"), "PayloadTooLarge"),
    (400, b"<html>oops</html>", "HTTP 400"),
])
def test_other_answers_fail_the_push_with_the_reason_kept(status: int, body: bytes,
                                                          expected: str) -> None:
    """Anything else is a plain PushError carrying Apple's reason."""
    with pytest.raises(PushError) as caught:
        parse_response(status, {}, body)
    assert type(caught.value) is PushError
    assert (caught.value.reason, caught.value.status) == (expected, status)


# --- provider token --------------------------------------------------------------------------

class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verify_jwt(token: str, public_key: ec.EllipticCurvePublicKey) -> tuple[dict[str, Any],
                                                                           dict[str, Any]]:
    header, claims, signature = token.split(".")
    raw = b64decode(signature)
    assert len(raw) == 64  # JOSE r || s, not DER
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public_key.verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    return json.loads(b64decode(header)), json.loads(b64decode(claims))


def test_provider_token_is_an_es256_jwt_that_verifies() -> None:
    """Header {alg: ES256, kid}, claims {iss: team, iat}; the r||s signature verifies."""
    provider = ApnsTokenProvider(TEAM_ID, KEY_ID, KEY.pem, clock=FakeClock())
    header, claims = verify_jwt(provider.token(), KEY.public_key)
    assert header == {"alg": "ES256", "kid": KEY_ID}
    assert claims == {"iss": TEAM_ID, "iat": int(NOW)}


def test_provider_token_is_cached_then_refreshed_after_refresh_after() -> None:
    """The same token until refresh_after has passed, then a new one with a new iat."""
    clock = FakeClock()
    provider = ApnsTokenProvider(TEAM_ID, KEY_ID, KEY.pem, refresh_after=2400, clock=clock)
    first = provider.token()
    clock.now += 2399
    assert provider.token() == first
    clock.now += 1
    second = provider.token()
    assert second != first
    assert verify_jwt(second, KEY.public_key)[1]["iat"] == int(NOW) + 2400
    assert provider.refreshes == 2


def test_invalidating_the_current_token_signs_a_new_one_but_a_stale_one_does_not() -> None:
    """Many streams refused with the same old token cause one refresh, not one each."""
    provider = ApnsTokenProvider(TEAM_ID, KEY_ID, KEY.pem, clock=FakeClock())
    first = provider.token()
    provider.invalidate(first)
    second = provider.token()
    provider.invalidate(first)
    assert second != first and provider.token() == second
    assert provider.refreshes == 2


def test_provider_token_is_renewed_when_the_clock_steps_back() -> None:
    """A wall clock set back makes the token's age unknowable: sign afresh."""
    clock = FakeClock()
    provider = ApnsTokenProvider(TEAM_ID, KEY_ID, KEY.pem, clock=clock)
    first = provider.token()
    clock.now -= 600
    assert provider.token() != first


@pytest.mark.parametrize("pem", [
    b"not a key",
    rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()),
    ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()),
])
def test_unusable_key_is_a_config_error(pem: bytes) -> None:
    """Only an EC P-256 PEM key can sign ES256."""
    with pytest.raises(PushConfigError):
        ApnsTokenProvider(TEAM_ID, KEY_ID, pem)


# --- client set-up ---------------------------------------------------------------------------

def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    """A key file that cannot be read is named in a PushConfigError."""
    settings = ApnsSettings(team_id=TEAM_ID, key_id=KEY_ID, key_file=tmp_path / "none.p8")
    with pytest.raises(PushConfigError, match=r"none\.p8"):
        ApnsClient(settings)


@pytest.mark.parametrize("changes", [
    {"production_url": "http://127.0.0.1:1"},
    {"sandbox_url": "https://127.0.0.1:1/path"},
    {"production_url": "https://127.0.0.1:99999"},
    {"default_environment": "staging"},
])
def test_bad_endpoint_settings_are_config_errors(tmp_path: Path, changes: dict[str, str]) -> None:
    """Endpoints must be https://host[:port]; environments production or sandbox."""
    settings = ApnsSettings(team_id=TEAM_ID, key_id=KEY_ID, key_file=KEY.write(tmp_path),
                            **changes)  # type: ignore[arg-type]
    with pytest.raises(PushConfigError):
        ApnsClient(settings)


async def test_send_before_run_is_a_programming_error(tmp_path: Path) -> None:
    """The client must be started in a nursery first."""
    client = ApnsClient(ApnsSettings(team_id=TEAM_ID, key_id=KEY_ID,
                                     key_file=KEY.write(tmp_path)))
    with pytest.raises(RuntimeError):
        await client.send(make_request())


# --- against the local APNs ------------------------------------------------------------------

StartClient = Callable[..., Awaitable[ApnsClient]]
StartServer = Callable[..., Awaitable[ApnsServer]]


@pytest.fixture
def start_server(nursery: trio.Nursery) -> StartServer:
    async def start(**kwargs: Any) -> ApnsServer:
        server = ApnsServer(public_key=KEY.public_key, **kwargs)
        await nursery.start(server.run)
        return server
    return start


@pytest.fixture
async def server(start_server: StartServer) -> ApnsServer:
    return await start_server()


@pytest.fixture
def start_client(nursery: trio.Nursery, tmp_path: Path) -> StartClient:
    async def start(server: ApnsServer, *, clock: Callable[[], float] = time.time,
                    **changes: Any) -> ApnsClient:
        settings = ApnsSettings(team_id=TEAM_ID, key_id=KEY_ID, key_file=KEY.write(tmp_path),
                                production_url=server.url, sandbox_url=server.url,
                                ca_file=server.write_ca(tmp_path), connect_timeout=2.0,
                                request_timeout=2.0)
        client = ApnsClient(attrs.evolve(settings, **changes), clock=clock)
        await nursery.start(client.run)
        return client
    return start


@pytest.fixture
async def client(start_client: StartClient, server: ApnsServer) -> ApnsClient:
    return await start_client(server)


async def send_all(client: ApnsClient, requests: list[PushRequest]
                   ) -> list[Any]:
    """Send concurrently; each slot holds the result or the PushError raised."""
    outcomes: list[Any] = [None] * len(requests)

    async def one(i: int) -> None:
        try:
            outcomes[i] = await client.send(requests[i])
        except PushError as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(requests)):
            nursery.start_soon(one, i)
    return outcomes


async def test_a_started_push_holds_off_a_sighup_retire_until_it_is_answered(
        client: ApnsClient, server: ApnsServer) -> None:
    """Between ``start`` and ``send`` the push counts as in use: a SIGHUP that replaces the
    clients right then waits for its answer before closing the old client, instead of
    closing the connection the push is on."""
    await client.send(make_request(call="warm-up"))
    dispatcher = PushDispatcher({"apns": client})
    unclaimed = dispatcher.start(make_request(call="abandoned"))
    assert unclaimed is not None and dispatcher._in_use
    unclaimed.abandon()
    assert dispatcher._in_use == {}
    request = make_request(call="started")
    started = dispatcher.start(request)
    assert started is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(dispatcher.retire, [client], timeout=5.0))
        await trio.testing.wait_all_tasks_blocked()  # the retire has looked, and waits
        result = await dispatcher.send(request, deadline=trio.current_time() + 5,
                                       started=started)
    assert result.attempts == 1 and server.pushes[-1].sipis["call"] == "started"
    assert dispatcher._in_use == {}


def calls(n: int) -> list[PushRequest]:
    return [make_request(call=f"call-{i}") for i in range(n)]


async def test_voip_push_is_accepted_and_recorded_with_apples_headers(
        client: ApnsClient, server: ApnsServer) -> None:
    """A call push passes every check of the local APNs and is recorded as sent."""
    result = await client.send(make_request())
    assert server.rejections == []
    [push] = server.pushes
    assert result.id == push.apns_id and result.attempts == 1
    assert push.token == TOKEN
    assert (push.push_type, push.topic) == ("voip", f"{BUNDLE}.voip")
    assert (push.headers["apns-priority"], push.headers["apns-expiration"]) == ("10", "0")
    assert push.sipis["call"] == "call-1"
    header, claims = verify_jwt(push.jwt, KEY.public_key)
    assert header["kid"] == KEY_ID and claims["iss"] == TEAM_ID


def open_connection(client: ApnsClient) -> _Connection:
    [pool] = client._pools.values()
    [conn] = pool.conns
    return conn


async def test_start_puts_a_push_on_the_wire_from_the_callers_task(
        client: ApnsClient, server: ApnsServer) -> None:
    """On an open connection ``start`` hands the whole request to the socket before the
    caller yields; ``send`` then only waits for the answer: one push, one attempt."""
    await client.send(make_request(call="warm-up"))
    conn = open_connection(client)
    handed = conn._handed
    request = make_request(call="quick")
    started = client.start(request)
    assert started is not None and conn._handed > handed and conn.load == 1  # no checkpoint
    result = await client.send(request, started)
    assert [p.sipis["call"] for p in server.pushes] == ["warm-up", "quick"]
    assert result.id == server.pushes[1].apns_id and result.attempts == 1
    assert conn.load == 0


async def test_start_without_an_open_connection_leaves_it_all_to_send(
        client: ApnsClient, server: ApnsServer) -> None:
    request = make_request()
    assert client.start(request) is None  # no connection yet: nothing sent
    assert client.start(make_request(token="zz")) is None  # a bad token: send will say so
    await client.send(request)
    assert len(server.pushes) == 1


async def test_an_abandoned_start_frees_its_stream(
        client: ApnsClient, server: ApnsServer) -> None:
    """A started push nobody will wait for gives its stream back (the server may still have
    it: it is never sent again)."""
    await client.send(make_request(call="warm-up"))
    conn = open_connection(client)
    started = client.start(make_request(call="abandoned"))
    assert started is not None and conn.load == 1
    started.abandon()
    assert conn.load == 0
    await client.send(make_request(call="next"))
    assert [p.sipis["call"] for p in server.pushes][-1] == "next"


async def test_the_dispatcher_sends_a_started_push_once(
        client: ApnsClient, server: ApnsServer) -> None:
    """``PushDispatcher.start`` then ``send(started=...)``: the push goes once, from the
    client that started it; past its deadline it is abandoned, not leaked."""
    await client.send(make_request(call="warm-up"))
    dispatcher = PushDispatcher({"apns": client})
    request = make_request(call="dispatched")
    started = dispatcher.start(request)
    assert started is not None
    result = await dispatcher.send(request, deadline=trio.current_time() + 5, started=started)
    assert result.attempts == 1
    assert [p.sipis["call"] for p in server.pushes] == ["warm-up", "dispatched"]
    class Failing:
        def start(self, request: PushRequest) -> None:
            raise RuntimeError("boom")

        async def send(self, request: PushRequest, started: object = None) -> Any:
            raise AssertionError("not called here")

        async def aclose(self) -> None:
            pass

    assert PushDispatcher({"apns": Failing()}).start(request) is None  # logged, not raised
    late = dispatcher.start(make_request(call="late"))
    assert late is not None
    with pytest.raises(PushError, match="deadline"):
        await dispatcher.send(request, deadline=trio.current_time(), started=late)
    assert open_connection(client).load == 0


async def test_alert_pushes_are_accepted(client: ApnsClient, server: ApnsServer) -> None:
    """call-ended, message and instance-expiring pass the alert checks."""
    for request in (make_request(PushKind.CALL_ENDED, reason="timeout"),
                    make_request(PushKind.MESSAGE, body="hi", collapse_id="m1"),
                    make_request(PushKind.INSTANCE_EXPIRING)):
        await client.send(request)
    assert server.rejections == []
    assert [p.push_type for p in server.pushes] == ["alert"] * 3
    assert server.pushes[1].headers["apns-collapse-id"] == "m1"


async def test_environment_picks_the_endpoint(start_client: StartClient,
                                              server: ApnsServer) -> None:
    """sandbox targets go to sandbox_url, production ones to production_url."""
    client = await start_client(server, production_url=f"https://127.0.0.1:{free_port('tcp')}")
    await client.send(make_request(environment="sandbox"))
    with pytest.raises(PushRetryable, match="cannot connect"):
        await client.send(make_request(environment="production"))
    assert len(server.pushes) == 1


async def test_hundred_concurrent_pushes_share_one_connection(
        client: ApnsClient, server: ApnsServer) -> None:
    """100 pushes at once go out as concurrent streams of a single connection."""
    await client.send(make_request(call="warm-up"))
    server.delay = 0.05
    start = trio.current_time()
    outcomes = await send_all(client, calls(100))
    assert all(not isinstance(o, PushError) for o in outcomes)
    assert trio.current_time() - start < 1.5  # not 100 × 50 ms one after the other
    assert server.connections_opened == 1 and len(server.pushes) == 101
    assert server.max_in_flight >= 50
    assert client.statistics().connects == 1


async def test_client_keeps_to_the_servers_stream_limit(start_server: StartServer,
                                                        start_client: StartClient) -> None:
    """No more streams at once than the server's SETTINGS_MAX_CONCURRENT_STREAMS."""
    server = await start_server(max_concurrent_streams=5)
    server.delay = 0.01
    client = await start_client(server)
    outcomes = await send_all(client, calls(40))
    assert all(not isinstance(o, PushError) for o in outcomes)
    assert server.max_in_flight == 5 and server.connections_opened == 1


async def test_stream_limit_raised_by_the_server_is_used_at_once(
        start_server: StartServer, start_client: StartClient) -> None:
    """Like Apple: one stream until the first push is accepted, then many."""
    server = await start_server(max_concurrent_streams=1, streams_after_first_push=100)
    server.delay = 0.02
    client = await start_client(server)
    outcomes = await send_all(client, calls(30))
    assert all(not isinstance(o, PushError) for o in outcomes)
    assert server.max_in_flight > 10 and server.connections_opened == 1


@pytest.mark.parametrize("reply", [Reply(410, "Unregistered"), Reply(400, "BadDeviceToken")])
async def test_dead_token_answer_raises_invalid_token(client: ApnsClient, server: ApnsServer,
                                                      reply: Reply) -> None:
    """The server says the token is dead: InvalidToken with its status."""
    server.reply_to_token(TOKEN, reply)
    with pytest.raises(InvalidToken) as caught:
        await client.send(make_request())
    assert (caught.value.reason, caught.value.status) == (reply.reason, reply.status)


async def test_429_is_retryable_with_retry_after_and_not_resent(client: ApnsClient,
                                                                server: ApnsServer) -> None:
    """429 goes back to the caller with Retry-After; the client does not resend it."""
    server.reply_next(Reply(429, "TooManyRequests", retry_after=7))
    with pytest.raises(PushRetryable) as caught:
        await client.send(make_request())
    assert caught.value.retry_after == 7 and caught.value.reason == "TooManyRequests"
    assert len(server.answers) == 1


async def test_500_is_retryable(client: ApnsClient, server: ApnsServer) -> None:
    """Apple's server error: retryable, no retry_after, sent once."""
    server.reply_next(Reply(500, "InternalServerError"))
    with pytest.raises(PushRetryable) as caught:
        await client.send(make_request())
    assert caught.value.retry_after is None and caught.value.status == 500
    assert len(server.answers) == 1


async def test_bad_topic_fails_the_push_with_the_reason(client: ApnsClient,
                                                        server: ApnsServer) -> None:
    """A push for an app the key may not serve: PushError BadTopic, not retryable."""
    with pytest.raises(PushError) as caught:
        await client.send(make_request(app="org.unknown.app"))
    assert type(caught.value) is PushError
    assert caught.value.reason == "BadTopic" and caught.value.status == 400


async def test_expired_provider_token_is_refreshed_and_the_push_resent_once(
        client: ApnsClient, server: ApnsServer) -> None:
    """ExpiredProviderToken: sign a new token and send the push again, once."""
    server.reply_next(Reply(403, "ExpiredProviderToken"))
    result = await client.send(make_request())
    assert result.attempts == 2
    first, second = server.answers
    assert first.status == 403 and second.status == 200 and first.jwt != second.jwt
    assert len(server.pushes) == 1
    assert client.statistics().token_refreshes == 2


async def test_token_still_expired_after_refresh_is_an_auth_error(
        start_client: StartClient, server: ApnsServer) -> None:
    """With the clock two hours behind, every token is expired: PushAuthError after 2 tries."""
    client = await start_client(server, clock=lambda: time.time() - 7200)
    with pytest.raises(PushAuthError, match="ExpiredProviderToken"):
        await client.send(make_request())
    assert [r.reason for r in server.rejections] == ["ExpiredProviderToken"] * 2


async def test_token_signed_with_the_wrong_key_id_is_an_auth_error(
        start_client: StartClient, server: ApnsServer) -> None:
    """InvalidProviderToken is not retried."""
    client = await start_client(server, key_id="WRONGKEYID")
    with pytest.raises(PushAuthError, match="InvalidProviderToken"):
        await client.send(make_request())
    assert len(server.rejections) == 1


async def test_goaway_mid_burst_delivers_every_push_exactly_once(
        client: ApnsClient, server: ApnsServer) -> None:
    """GOAWAY after 20 of 50 streams: those 20 are answered, the rest go on a new connection."""
    await client.send(make_request(call="warm-up"))  # the burst then starts in one go
    server.delay = 0.05  # the GOAWAY arrives while the first 20 are still open
    server.goaway_after(21)  # the warm-up push was stream 1
    outcomes = await send_all(client, calls(50))
    assert all(not isinstance(o, PushError) for o in outcomes), outcomes
    delivered = collections.Counter(p.sipis["call"] for p in server.pushes)
    assert delivered == {"warm-up": 1} | {f"call-{i}": 1 for i in range(50)}
    assert len({p.apns_id for p in server.pushes}) == 51
    assert server.connections_opened == 2
    stats = client.statistics()
    assert stats.connects == 2 and stats.resent == 30
    assert sorted(o.attempts for o in outcomes) == [1] * 20 + [2] * 30


async def test_goaway_on_every_connection_never_delivers_a_push_twice(
        client: ApnsClient, server: ApnsServer) -> None:
    """Each push is delivered once or reported retryable, never delivered twice."""
    server.delay = 0.02
    server.goaway_after(5, connections=None)
    requests = calls(30)
    outcomes = await send_all(client, requests)
    delivered = collections.Counter(p.sipis["call"] for p in server.pushes)
    assert max(delivered.values()) == 1
    for request, outcome in zip(requests, outcomes, strict=True):
        if isinstance(outcome, PushError):
            assert isinstance(outcome, PushRetryable), outcome
            assert request.call not in delivered
        else:
            assert request.call in delivered
    assert any(isinstance(o, PushRetryable) for o in outcomes)


async def test_refused_stream_is_resent_once(client: ApnsClient, server: ApnsServer) -> None:
    """RST_STREAM REFUSED_STREAM means not processed: the client sends it again."""
    server.reply_next(Reply(reset=h2.errors.ErrorCodes.REFUSED_STREAM))
    result = await client.send(make_request())
    assert result.attempts == 2 and len(server.pushes) == 1


async def test_stream_reset_with_another_code_is_not_resent(client: ApnsClient,
                                                            server: ApnsServer) -> None:
    """Any other reset may follow processing: PushError, never a second send."""
    server.reply_next(Reply(reset=h2.errors.ErrorCodes.INTERNAL_ERROR))
    with pytest.raises(PushError) as caught:
        await client.send(make_request())
    assert not isinstance(caught.value, PushRetryable)
    assert len(server.answers) == 1


async def test_slow_answer_times_out_as_a_failed_push_not_a_retryable_one(
        start_client: StartClient, server: ApnsServer) -> None:
    """A push sent but unanswered in time may have been delivered (here: it was)."""
    client = await start_client(server, request_timeout=0.2)
    server.delay = 1.0
    with pytest.raises(PushError, match="no answer") as caught:
        await client.send(make_request())
    assert not isinstance(caught.value, PushRetryable)
    assert len(server.pushes) == 1


async def test_push_that_never_got_a_stream_times_out_as_retryable(
        start_server: StartServer, start_client: StartClient) -> None:
    """No free stream until the timeout (the server allows none): never sent, so retryable."""
    server = await start_server(max_concurrent_streams=0)
    client = await start_client(server, request_timeout=0.2)
    with pytest.raises(PushRetryable, match="not sent"):
        await client.send(make_request())
    assert server.answers == [] and server.rejections == []


async def test_connection_dropped_mid_stream_fails_the_push_without_hanging(
        client: ApnsClient, server: ApnsServer) -> None:
    """The server vanishes after taking the push: PushError at once; next push reconnects."""
    server.delay = 10.0
    outcome: list[BaseException] = []

    async def push() -> None:
        try:
            await client.send(make_request())
        except PushError as exc:
            outcome.append(exc)

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(push)
            await server.wait_received(1)
            server.drop_connections()
    [error] = outcome
    assert not isinstance(error, PushRetryable)
    server.delay = 0.0
    await client.send(make_request())
    assert client.statistics().connects == 2


async def test_stopped_server_fails_the_push_and_the_next_one_is_retryable(
        client: ApnsClient, server: ApnsServer) -> None:
    """Server gone for good: the in-flight push fails, later ones cannot connect."""
    server.delay = 10.0
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            async def push() -> None:
                with pytest.raises(PushError) as caught:
                    await client.send(make_request())
                assert not isinstance(caught.value, PushRetryable)
            nursery.start_soon(push)
            await server.wait_received(1)
            server.stop()
        with pytest.raises(PushRetryable, match="cannot connect"):
            await client.send(make_request())


async def test_hung_connection_is_dropped_when_pings_go_unanswered(
        start_client: StartClient, server: ApnsServer) -> None:
    """A peer that stops answering PINGs is dropped, so no call is pushed into it."""
    client = await start_client(server, ping_interval=0.05, request_timeout=0.2)
    await client.send(make_request())
    server.freeze()
    with trio.fail_after(2):
        while client.statistics().connections:
            await trio.sleep(0.02)
    server.thaw()
    await client.send(make_request())
    assert client.statistics().connects == 2


async def test_untrusted_server_certificate_is_retryable_with_the_reason(
        start_client: StartClient, server: ApnsServer) -> None:
    """Without our CA the test server is not trusted (system store only)."""
    client = await start_client(server, ca_file=None)
    with pytest.raises(PushRetryable, match="certificate"):
        await client.send(make_request())
    assert server.answers == []


async def test_aclose_closes_connections_and_later_sends_fail(client: ApnsClient) -> None:
    """After aclose nothing is open and send refuses."""
    await client.send(make_request())
    with trio.fail_after(2):
        await client.aclose()
    assert client.statistics().connections == 0
    with pytest.raises(PushError, match="closed"):
        await client.send(make_request())


async def test_logs_never_hold_the_device_token_or_the_provider_token(
        client: ApnsClient, server: ApnsServer, caplog: pytest.LogCaptureFixture) -> None:
    """Every log line, at DEBUG, names the token only in its redacted form."""
    caplog.set_level(logging.DEBUG)
    await client.send(make_request())
    server.reply_next(Reply(410, "Unregistered"))
    with pytest.raises(InvalidToken):
        await client.send(make_request())
    assert "a1a1a1…(64)" in caplog.text
    assert TOKEN not in caplog.text
    for push in server.pushes:
        assert push.jwt not in caplog.text
        assert push.jwt.split(".")[2] not in caplog.text


# --- the connection's writes ----------------------------------------------------------------

class RecordingTls:
    """Stands in for ``_TlsStream``: records what the connection hands it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.pending = 0

    def send_nowait(self, data: bytes) -> bool:
        self.writes.append(data)
        return True

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()


def quiet_connection() -> tuple[Any, RecordingTls]:
    conn = _Connection(_Endpoint.parse("https://127.0.0.1:1", "url"), make_ssl_context(),
                       conn_id=1, settings=ApnsSettings(
                           team_id=TEAM_ID, key_id=KEY_ID, key_file=Path("unused"),
                           production_url="https://127.0.0.1:1"),
                       on_closed=lambda _: None)
    tls = RecordingTls()
    conn._tls = tls
    return conn, tls


async def test_a_write_on_a_quiet_connection_goes_out_from_the_callers_task(
        autojump_clock: trio.testing.MockClock) -> None:
    """A push on a quiet connection reaches the socket before its task yields (no writer
    task in between); writes that follow within _COALESCE_AFTER wait for the writer and go
    out together, so a burst costs one TLS record, and a quiet one is direct again."""
    conn, tls = quiet_connection()
    conn._h2.initiate_connection()
    conn._flush_h2()
    assert len(tls.writes) == 1 and conn._handed == conn._queued
    assert not conn._wake_writer.is_set()
    for n in range(3):  # a burst: queued for the writer, in order
        conn._h2.ping(b"burst-%02d" % n)
        conn._flush_h2()
    assert len(tls.writes) == 1 and conn._wake_writer.is_set()
    assert len(conn._outbox) == conn._queued - conn._handed > 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._write_loop)
        await trio.sleep(0.01)
        assert len(tls.writes) == 2 and b"burst-02" in tls.writes[1]  # the burst, as one
        assert conn._handed == conn._queued and not conn._outbox
        conn._h2.ping(b"quiet-01")
        conn._flush_h2()
        assert len(tls.writes) == 3 and b"quiet-01" in tls.writes[2]
        nursery.cancel_scope.cancel()


async def test_a_push_on_a_quiet_connection_is_one_write(
        autojump_clock: trio.testing.MockClock) -> None:
    """HEADERS and the DATA that ends the stream leave together: one TLS record and one
    syscall per push, and the push is on the wire before its task yields (the DATA used to
    wait for the writer task, as a write right after the HEADERS)."""
    import h2.events

    conn, tls = quiet_connection()
    conn._h2.initiate_connection()
    conn._flush_h2()
    conn._ready.set()
    autojump_clock.jump(1.0)  # the preface is long gone: the connection is quiet
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(tls.writes[0])
    writes = len(tls.writes)
    headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"apns"),
               (b":path", b"/3/device/" + b"a" * 64)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.exchange, _Exchange(), headers, b'{"aps":{}}', math.inf)
        await trio.testing.wait_all_tasks_blocked()
        assert len(tls.writes) == writes + 1  # one write, from the pushing task
        events = server.receive_data(tls.writes[-1])
        kinds = [type(e) for e in events]
        assert h2.events.RequestReceived in kinds and h2.events.StreamEnded in kinds
        assert [e.data for e in events if isinstance(e, h2.events.DataReceived)] == [
            b'{"aps":{}}']
        nursery.cancel_scope.cancel()


async def test_tls_stream_sends_what_the_socket_takes_and_flushes_the_rest(
        tmp_path: Path) -> None:
    """``_TlsStream`` against a trio TLS server: a send larger than the socket buffers
    leaves bytes pending (send_nowait False) until the peer reads and ``flush`` finishes;
    the peer gets every byte in order; its close reads as b""."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    received = bytearray()
    may_read = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        await tls.do_handshake()
        await may_read.wait()
        while len(received) < len(payload):
            received.extend(await tls.receive_some(65536))
        await tls.aclose()

    payload = bytes(range(256)) * 40_000  # 10 MB: more than loopback buffers hold
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = _TlsStream(tcp.socket, client_ctx, "127.0.0.1")
        await tls.do_handshake()
        assert tls.send_nowait(payload) is False and tls.pending > 0
        may_read.set()
        with trio.fail_after(10):
            await tls.flush()
            assert tls.pending == 0
            assert await tls.receive_some(100) == b""
        assert bytes(received) == payload
        tls.close_now()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("status", [
    [(b":status", b"abc")],
    [(b":status", b"2000")],
    [(b":status", b"200"), (b":status", b"500")],
])
async def test_an_answer_with_an_invalid_status_fails_its_push_not_the_connection(
        autojump_clock: trio.testing.MockClock, status: list[tuple[bytes, bytes]]) -> None:
    """h2 does not check :status (and sipis skips its generic inbound checks): a malformed
    or repeated one fails that push with a PushError; it used to raise ValueError in the
    reader. The connection carries on."""
    conn, tls = quiet_connection()
    conn._h2.initiate_connection()
    conn._flush_h2()
    conn._ready.set()
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False))
    server.initiate_connection()
    server.receive_data(tls.writes[0])
    conn._receive(server.data_to_send())
    sent = len(tls.writes)  # the preface, read above
    headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"apns"),
               (b":path", b"/3/device/" + b"a" * 64)]
    ex = _Exchange()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._write_loop)
        failed = trio.Event()

        async def push() -> None:
            with pytest.raises(PushError, match="invalid :status"):
                await conn.exchange(ex, headers, b'{"aps":{}}', math.inf)
            failed.set()

        nursery.start_soon(push)
        await trio.testing.wait_all_tasks_blocked()
        for data in tls.writes[sent:]:
            server.receive_data(data)
        server.send_headers(1, status)
        server.send_data(1, b"", end_stream=True)
        conn._receive(server.data_to_send())
        with trio.fail_after(5):
            await failed.wait()
        nursery.cancel_scope.cancel()
    assert conn.usable


async def test_a_server_that_breaks_http2_ends_the_connection_with_goaway_protocol_error(
        autojump_clock: trio.testing.MockClock) -> None:
    """A frame no server may send (PUSH_PROMISE: push is disabled) ends the connection: the
    push in flight fails as possibly delivered (never resent), and the goodbye is a GOAWAY
    naming PROTOCOL_ERROR."""
    conn, tls = quiet_connection()
    inbound: trio.MemorySendChannel[bytes]
    inbound, reads = trio.open_memory_channel[bytes](10)
    closed: list[bool] = []

    async def receive_some(max_bytes: int) -> bytes:
        return await reads.receive()

    async def aclose() -> None:
        closed.append(True)

    tls.receive_some = receive_some  # type: ignore[attr-defined]
    tls.aclose = aclose  # type: ignore[attr-defined]
    tls.close_now = lambda: None  # type: ignore[attr-defined]
    conn._h2.initiate_connection()
    conn._flush_h2()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(tls.writes[0])
    await inbound.send(server.data_to_send())
    autojump_clock.jump(1.0)  # the preface is long gone: the push is written at once
    headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"apns"),
               (b":path", b"/3/device/" + b"a" * 64)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._read_loop)
        nursery.start_soon(conn._write_loop)
        await trio.testing.wait_all_tasks_blocked()
        assert conn._ready.is_set()
        failed = trio.Event()

        async def push() -> None:
            with pytest.raises(PushError, match="lost after sending") as info:
                await conn.exchange(_Exchange(), headers, b'{"aps":{}}', math.inf)
            assert not isinstance(info.value, PushRetryable)
            failed.set()

        nursery.start_soon(push)
        await trio.testing.wait_all_tasks_blocked()
        # PUSH_PROMISE on stream 1, promising stream 2.
        await inbound.send(b"\x00\x00\x05\x05\x04\x00\x00\x00\x01\x00\x00\x00\x02\x88")
        await trio.testing.wait_all_tasks_blocked()
        assert conn._close_reason is not None and "PROTOCOL_ERROR" in conn._close_reason
        conn._fail_streams()
        with trio.fail_after(5):
            await failed.wait()
        written = len(tls.writes)
        await conn._shutdown_transport()
        assert closed
        goaway = tls.writes[written]
        assert goaway[3] == 0x7 and goaway[-4:] == b"\x00\x00\x00\x01"  # PROTOCOL_ERROR
        nursery.cancel_scope.cancel()


def _served_connection(**server_settings: int) -> tuple[Any, RecordingTls]:
    """A quiet connection past an h2 server's preface (with these settings)."""
    conn, tls = quiet_connection()
    conn._h2.initiate_connection()
    conn._flush_h2()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    if server_settings:
        server.local_settings = h2.settings.Settings(client=False, initial_values={
            getattr(h2.settings.SettingCodes, name.upper()): value
            for name, value in server_settings.items()})
    server.initiate_connection()
    server.receive_data(tls.writes[0])
    conn._receive(server.data_to_send())
    return conn, tls


HEADERS = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"apns"),
           (b":path", b"/3/device/" + b"a" * 64)]


@pytest.mark.parametrize(("window", "sent"), [(65_535, True), (0, False)])
async def test_an_unanswered_push_times_out_at_its_deadline_without_a_scope_of_its_own(
        autojump_clock: trio.testing.MockClock, window: int, sent: bool) -> None:
    """The connection's deadline loop fails a stream whose deadline passed, at most
    _DEADLINE_SLACK of the timeout late: sent and unanswered, or still waiting for
    flow-control window (then its END_STREAM never left: not processed). With nothing in
    flight the loop sleeps until the next answer is awaited."""
    import sipis.push.apns as apns

    conn, _ = _served_connection(initial_window_size=window)
    assert conn._settings.request_timeout == 10.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._write_loop)
        nursery.start_soon(conn._deadline_loop)
        await trio.testing.wait_all_tasks_blocked()
        assert conn._deadlines_idle
        ex = _Exchange()
        start = trio.current_time()
        with trio.fail_after(30), pytest.raises(apns._TimedOut):  # a mutant fails, not hangs
            await conn.exchange(ex, HEADERS, b'{"aps":{}}', start + 10.0)
        waited = trio.current_time() - start
        assert 10.0 <= waited <= 10.0 * (1 + apns._DEADLINE_SLACK)
        assert ex.stream is not None and (ex.stream.end_offset is not None) is sent
        assert conn.load == 0  # released
        await trio.testing.wait_all_tasks_blocked()
        assert conn._deadlines_idle
        nursery.cancel_scope.cancel()


async def test_a_push_answered_in_time_is_not_timed_out_and_the_loop_goes_idle(
        autojump_clock: trio.testing.MockClock) -> None:
    conn, tls = _served_connection()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    for data in tls.writes:
        server.receive_data(data)
    sent = len(tls.writes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._write_loop)
        nursery.start_soon(conn._deadline_loop)
        ex = _Exchange()
        done = trio.Event()

        async def push() -> None:
            await conn.exchange(ex, HEADERS, b'{"aps":{}}', trio.current_time() + 10.0)
            done.set()

        nursery.start_soon(push)
        await trio.testing.wait_all_tasks_blocked()
        assert not conn._deadlines_idle
        await trio.sleep(9.0)
        for data in tls.writes[sent:]:
            server.receive_data(data)
        server.send_headers(1, [(b":status", b"200")], end_stream=True)
        conn._receive(server.data_to_send())
        await done.wait()
        assert ex.stream is not None and ex.stream.status == 200
        await trio.sleep(5.0)  # past the old deadline: the loop scanned, found nothing
        assert conn._deadlines_idle
        nursery.cancel_scope.cancel()
