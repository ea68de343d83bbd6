"""FCM HTTP v1 client: pure builders, then the real client against the local HTTP/2 server."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import h2.errors
import h2.events
import httpcore
import httpx
import pytest
import trio

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
from sipis.push.fcm import (
    FCM_SCOPE,
    FcmClient,
    FcmSettings,
    _StreamTrace,
    build_message,
    classify_error,
    encode_body,
    format_duration,
    load_service_account,
    parse_retry_after,
    provably_unprocessed,
)
from tests.integration.harness import SENSITIVE
from tests.peers.fcm_server import Answer, FcmServer, ServiceAccountKey
from tests.peers.ports import free_port

TOKEN = "fcm-registration-token-" + "x" * 140
TARGET = PushTarget(provider="fcm", token=TOKEN, app="com.example.phone")
SENSITIVE.add(TOKEN)


def _request(kind: PushKind = PushKind.CALL, *, call: str | None = "call-1",
             token: str = TOKEN, **fields: Any) -> PushRequest:
    return PushRequest(kind=kind, target=attrs.evolve(TARGET, token=token), instance="inst-1",
                       call=call, from_uri="sip:bob@example.net", from_name="Bob",
                       sent_at=1_700_000_000, **fields)


def _fcm_error(status: int, *, code: str | None = None, grpc: str = "X", message: str = "",
               violations: list[str] | None = None) -> bytes:
    details: list[dict[str, Any]] = []
    if code:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": code})
    if violations:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": f} for f in violations]})
    return json.dumps({"error": {"code": status, "message": message, "status": grpc,
                                 "details": details}}).encode()


# --- pure builders -----------------------------------------------------------------------


def test_call_push_is_a_high_priority_data_message_with_the_short_call_ttl() -> None:
    """A call is a data message (all values strings), android.priority high, ttl call_ttl."""
    message = build_message(_request(), call_ttl=30, ttl=None)
    assert message == {"message": {
        "token": TOKEN,
        "data": {"type": "call", "instance": "inst-1", "call": "call-1",
                 "from_uri": "sip:bob@example.net", "from_name": "Bob",
                 "sent_at": "1700000000"},
        "android": {"priority": "high", "ttl": "30s"}}}
    assert all(isinstance(v, str) for v in message["message"]["data"].values())


def test_other_kinds_get_the_ordinary_ttl_and_their_collapse_key() -> None:
    """call-ended/message/instance-expiring: high priority, the ordinary ttl (or none)."""
    ended = _request(PushKind.CALL_ENDED, reason="answered-elsewhere", collapse_id="call-1")
    android = build_message(ended, call_ttl=30, ttl=3600)["message"]["android"]
    assert android == {"priority": "high", "ttl": "3600s", "collapse_key": "call-1"}
    message = build_message(_request(PushKind.MESSAGE, call=None), call_ttl=30, ttl=None)
    assert message["message"]["android"] == {"priority": "high"}
    assert message["message"]["data"]["type"] == "message"


def test_encoded_body_is_compact_utf8_json() -> None:
    """The wire body round-trips and keeps non-ASCII display names as UTF-8."""
    body = encode_body(attrs.evolve(_request(), from_name="Zoë"), call_ttl=1.5)
    assert b"Zo\xc3\xab" in body
    assert json.loads(body)["message"]["android"]["ttl"] == "1.5s"


@pytest.mark.parametrize(("seconds", "text"), [(30, "30s"), (0, "0s"), (1.5, "1.5s"),
                                                (0.000000001, "0.000000001s")])
def test_ttl_is_a_protobuf_duration_string(seconds: float, text: str) -> None:
    """Durations are "<seconds>s" with at most nanosecond fractions."""
    assert format_duration(seconds) == text


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After: delta-seconds or an HTTP-date relative to now; junk is None."""
    now = 1_700_000_000.0
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after(None, now=now) is None
    assert parse_retry_after("soon", now=now) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 12))
    assert parse_retry_after(date, now=now) == pytest.approx(12)
    assert parse_retry_after(date, now=now + 60) == 0.0


@pytest.mark.parametrize(("status", "body", "kind", "reason"), [
    (404, _fcm_error(404, code="UNREGISTERED", grpc="NOT_FOUND"), InvalidToken, "UNREGISTERED"),
    (400, _fcm_error(400, code="INVALID_ARGUMENT", grpc="INVALID_ARGUMENT",
                     message="The registration token is not a valid FCM registration token"),
     InvalidToken, "INVALID_ARGUMENT"),
    (400, _fcm_error(400, grpc="INVALID_ARGUMENT", violations=["message.token"]),
     InvalidToken, "INVALID_ARGUMENT"),
    (400, _fcm_error(400, code="INVALID_ARGUMENT", grpc="INVALID_ARGUMENT",
                     message="Invalid value at 'message.android.ttl'"),
     PushError, "INVALID_ARGUMENT"),
    (404, b"<html>not found</html>", PushError, "HTTP 404"),
    (429, _fcm_error(429, code="QUOTA_EXCEEDED"), PushRetryable, "QUOTA_EXCEEDED"),
    (503, _fcm_error(503, code="UNAVAILABLE"), PushRetryable, "UNAVAILABLE"),
    (500, _fcm_error(500, code="INTERNAL"), PushRetryable, "INTERNAL"),
    (502, b"bad gateway", PushRetryable, "HTTP 502"),
    (401, _fcm_error(401, grpc="UNAUTHENTICATED"), PushAuthError, "UNAUTHENTICATED"),
    (403, _fcm_error(403, code="SENDER_ID_MISMATCH"), PushAuthError, "SENDER_ID_MISMATCH"),
    (401, _fcm_error(401, code="THIRD_PARTY_AUTH_ERROR"), PushAuthError,
     "THIRD_PARTY_AUTH_ERROR"),
])
def test_fcm_errors_map_onto_the_push_error_hierarchy(
        status: int, body: bytes, kind: type[PushError], reason: str) -> None:
    """Each FCM answer becomes exactly one push error type; a bare 404 wipes nothing."""
    error = classify_error(status, body, retry_after=3.0)
    assert type(error) is kind
    assert error.reason == reason
    assert error.status == status
    if isinstance(error, PushRetryable):
        assert error.retry_after == 3.0


def test_error_reason_never_quotes_the_message_text() -> None:
    """FCM messages could echo the token; the reason is only the code."""
    body = _fcm_error(400, code="INVALID_ARGUMENT", message=f"bad token {TOKEN}")
    error = classify_error(400, body)
    assert TOKEN not in str(error) and TOKEN not in error.reason


def test_unusable_key_files_are_config_errors_naming_the_field(tmp_path: Path) -> None:
    """Missing file, non-JSON, missing field: PushConfigError, never the key in the text."""
    with pytest.raises(PushConfigError, match="cannot read"):
        load_service_account(tmp_path / "absent.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PushConfigError, match="not JSON"):
        load_service_account(tmp_path / "junk.json")
    info = _account().info(token_uri="https://127.0.0.1/token")
    del info["client_email"]
    (tmp_path / "partial.json").write_text(json.dumps(info))
    with pytest.raises(PushConfigError, match="client_email") as caught:
        load_service_account(tmp_path / "partial.json")
    assert "PRIVATE KEY" not in str(caught.value)


def test_a_client_without_any_project_id_is_a_config_error(tmp_path: Path) -> None:
    """No project_id in settings or key file: refused at construction."""
    path = _account().write(tmp_path / "sa.json", token_uri="https://127.0.0.1/token",
                            project_id="")
    with pytest.raises(PushConfigError, match="project_id"):
        FcmClient(FcmSettings(service_account_file=path))


def test_default_url_is_googles_v1_endpoint_for_the_key_files_project(tmp_path: Path) -> None:
    """Without url/project_id settings the key file's project names Google's endpoint."""
    path = _account().write(tmp_path / "sa.json", token_uri="https://127.0.0.1/token")
    client = FcmClient(FcmSettings(service_account_file=path))
    assert client.url == "https://fcm.googleapis.com/v1/projects/sipis-test/messages:send"


def _failure(event: object) -> httpx.RemoteProtocolError:
    try:
        try:
            raise httpcore.RemoteProtocolError(event)
        except httpcore.RemoteProtocolError as inner:
            raise httpx.RemoteProtocolError(str(inner)) from inner
    except httpx.RemoteProtocolError as outer:
        return outer


def _goaway(last_stream_id: int) -> h2.events.ConnectionTerminated:
    event = h2.events.ConnectionTerminated()
    event.last_stream_id = last_stream_id
    event.error_code = h2.errors.ErrorCodes.NO_ERROR
    return event


def _reset(stream_id: int, code: h2.errors.ErrorCodes) -> h2.events.StreamReset:
    return h2.events.StreamReset(stream_id=stream_id, error_code=code)


@pytest.mark.parametrize(("exc", "sent", "stream_id", "unprocessed"), [
    (_failure(_goaway(5)), True, 7, True),  # above last-stream-id: never seen
    (_failure(_goaway(0)), True, 1, True),  # GOAWAY before any stream
    (_failure(_goaway(7)), True, 7, False),  # at/below: may have been processed
    (_failure(_goaway(2**31 - 1)), True, 7, False),  # graceful first GOAWAY
    (_failure(_reset(7, h2.errors.ErrorCodes.REFUSED_STREAM)), True, 7, True),
    (_failure(_reset(7, h2.errors.ErrorCodes.CANCEL)), True, 7, False),
    (httpx.ReadError("connection reset"), True, 7, False),  # dropped mid-push
    (httpx.RemoteProtocolError("Server disconnected"), True, 7, False),
    (httpx.ConnectError("refused"), False, None, True),  # nothing was sent
    (httpx.WriteError("broken pipe"), False, None, True),
])
def test_only_provably_unprocessed_requests_count_as_retryable(
        exc: BaseException, sent: bool, stream_id: int | None, unprocessed: bool) -> None:
    """GOAWAY below our stream, REFUSED_STREAM or nothing sent: safe; anything else: not."""
    trace = _StreamTrace(sent=sent, stream_id=stream_id)
    assert provably_unprocessed(exc, trace) is unprocessed


# --- against the local FCM server ----------------------------------------------------------


@functools.cache
def _account() -> ServiceAccountKey:
    return ServiceAccountKey.generate()


@attrs.define
class Fcm:
    server: FcmServer
    settings: FcmSettings
    tmp: Path


StartFcm = Callable[..., Awaitable[Fcm]]


@pytest.fixture
def start_fcm(nursery: trio.Nursery, tmp_path: Path) -> Iterator[StartFcm]:
    """Start a local FCM server (kwargs → FcmServer) and settings pointing at it; the
    servers' connection handlers must not have crashed by the end of the test."""
    servers: list[FcmServer] = []

    async def start(**kwargs: Any) -> Fcm:
        server = FcmServer(_account(), **kwargs)
        servers.append(server)
        await nursery.start(server.run)
        key = server.account.write(tmp_path / f"sa-{server.port}.json",
                                   token_uri=server.token_uri)
        settings = FcmSettings(service_account_file=key, url=server.url,
                               ca_file=server.write_ca(tmp_path / f"ca-{server.port}.pem"),
                               request_timeout=5.0)
        return Fcm(server, settings, tmp_path)

    yield start
    for server in servers:  # the session-wide log check must find none of these
        SENSITIVE.update(server.issued_tokens)
    assert [error for server in servers for error in server.errors] == []


@pytest.fixture
async def fcm(start_fcm: StartFcm) -> Fcm:
    return await start_fcm()


@pytest.fixture
async def client(fcm: Fcm) -> AsyncIterator[FcmClient]:
    client = FcmClient(fcm.settings)
    yield client
    await client.aclose()


async def test_accepted_push_is_recorded_and_named(fcm: Fcm, client: FcmClient) -> None:
    """A push accepted by FCM returns the message name; the server saw the v1 body."""
    result = await client.send(_request())
    (accepted,) = fcm.server.accepted
    assert result.provider == "fcm" and result.id == accepted.name and result.attempts == 1
    assert accepted.token == TOKEN
    assert accepted.data["type"] == "call" and accepted.data["call"] == "call-1"
    assert accepted.android == {"priority": "high", "ttl": "30s"}
    assert fcm.server.rejections == [] and fcm.server.errors == []


async def test_assertion_is_a_signed_jwt_for_the_fcm_scope(fcm: Fcm, client: FcmClient) -> None:
    """The JWT-bearer assertion names our account, the token_uri as aud, the FCM scope."""
    await client.send(_request())
    (claims,) = fcm.server.assertions
    assert claims["iss"] == _account().client_email
    assert claims["aud"] == fcm.server.token_uri
    assert claims["scope"] == FCM_SCOPE
    assert claims["exp"] - claims["iat"] == 3600


async def test_access_token_is_fetched_once_and_cached(fcm: Fcm, client: FcmClient) -> None:
    """Concurrent and later sends share one access token."""
    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(client.send, _request(call=f"call-{n}"))
    await client.send(_request(call="later"))
    assert fcm.server.token_requests == 1
    assert client.statistics().token_fetches == 1
    assert len(fcm.server.accepted) == 9


async def test_access_token_is_refreshed_near_expiry(fcm: Fcm) -> None:
    """Within refresh_margin of expires_in a new token is fetched (injected clock)."""
    now = [1000.0]
    client = FcmClient(attrs.evolve(fcm.settings, refresh_margin=300), clock=lambda: now[0])
    try:
        await client.send(_request())
        now[0] += 3600 - 301  # still outside the margin
        await client.send(_request())
        assert fcm.server.token_requests == 1
        now[0] += 2  # inside the margin: refresh
        await client.send(_request())
        assert fcm.server.token_requests == 2
        now[0] += 3600  # long expired
        await client.send(_request())
        assert fcm.server.token_requests == 3
    finally:
        await client.aclose()


async def test_short_lived_tokens_are_refreshed_before_the_server_refuses_them(
        start_fcm: StartFcm) -> None:
    """With expires_in shorter than the margin, each send fetches a fresh token; no 401."""
    fcm = await start_fcm(token_lifetime=1)
    client = FcmClient(attrs.evolve(fcm.settings, refresh_margin=5))
    try:
        for n in range(3):
            await client.send(_request(call=f"call-{n}"))
    finally:
        await client.aclose()
    assert fcm.server.token_requests == 3
    assert client.statistics().auth_retries == 0


async def test_a_slow_token_fetch_does_not_block_the_trio_loop(
        fcm: Fcm, client: FcmClient) -> None:
    """While the token endpoint takes 0.3 s, other tasks keep running."""
    fcm.server.token_delay = 0.3
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await client.send(_request())
        nursery.cancel_scope.cancel()
    assert ticks >= 5  # a blocked loop would not tick at all


async def test_a_still_valid_token_is_used_while_another_task_refreshes_it(fcm: Fcm) -> None:
    """In the refresh margin, only one task waits for the new token; the others go on."""
    now = [0.0]
    client = FcmClient(fcm.settings, clock=lambda: now[0])
    try:
        await client.send(_request())
        now[0] += 3500  # inside the 300 s margin, not expired
        fcm.server.token_delay = 0.5
        done: list[str] = []

        async def send(name: str) -> None:
            await client.send(_request(call=name))
            done.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "refresher")
            await trio.sleep(0.05)
            nursery.start_soon(send, "bystander")
        assert done == ["bystander", "refresher"]
        assert fcm.server.token_requests == 2
    finally:
        await client.aclose()


async def test_senders_queued_behind_a_failed_token_fetch_share_its_error(
        fcm: Fcm) -> None:
    """The token endpoint times out: five waiting sends fail together, after one timeout."""
    fcm.server.token_delay = 5
    client = FcmClient(attrs.evolve(fcm.settings, request_timeout=0.5))
    errors: list[PushError] = []

    async def send() -> None:
        try:
            await client.send(_request())
        except PushError as exc:
            errors.append(exc)

    start = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(send)
    finally:
        await client.aclose()
    assert trio.current_time() - start < 2.0  # one at a time would take 2.5 s
    assert len(errors) == 5 and all(isinstance(e, PushRetryable) for e in errors)
    assert fcm.server.token_requests == 1 and fcm.server.send_requests == 0


async def test_unregistered_token_is_an_invalid_token(fcm: Fcm, client: FcmClient) -> None:
    """FCM UNREGISTERED (404) → InvalidToken: the caller wipes the instance."""
    fcm.server.dead_tokens.add(TOKEN)
    with pytest.raises(InvalidToken) as caught:
        await client.send(_request())
    assert caught.value.status == 404 and caught.value.reason == "UNREGISTERED"
    assert fcm.server.accepted == []


async def test_malformed_registration_token_is_an_invalid_token(
        fcm: Fcm, client: FcmClient) -> None:
    """INVALID_ARGUMENT naming the registration token → InvalidToken."""
    fcm.server.answer(Answer.invalid_token())
    with pytest.raises(InvalidToken):
        await client.send(_request())


async def test_quota_exceeded_is_retryable_after_retry_after(
        fcm: Fcm, client: FcmClient) -> None:
    """429 QUOTA_EXCEEDED with Retry-After: 7 → PushRetryable(retry_after=7), not re-sent."""
    fcm.server.answer(Answer.quota_exceeded(retry_after="7"))
    with pytest.raises(PushRetryable) as caught:
        await client.send(_request())
    assert caught.value.retry_after == 7.0 and caught.value.status == 429
    assert fcm.server.send_requests == 1


async def test_unavailable_is_retryable(fcm: Fcm, client: FcmClient) -> None:
    """503 UNAVAILABLE without Retry-After → PushRetryable(retry_after=None)."""
    fcm.server.answer(Answer.unavailable())
    with pytest.raises(PushRetryable) as caught:
        await client.send(_request())
    assert caught.value.status == 503 and caught.value.retry_after is None


async def test_401_fetches_a_new_token_and_retries_once(fcm: Fcm, client: FcmClient) -> None:
    """A revoked access token: 401, one token refresh, one more try, delivered."""
    await client.send(_request(call="first"))
    fcm.server.revoke_tokens()
    result = await client.send(_request(call="second"))
    assert result.attempts == 2
    assert fcm.server.token_requests == 2
    assert [a.data["call"] for a in fcm.server.accepted] == ["first", "second"]
    assert client.statistics().auth_retries == 1


async def test_a_second_401_is_an_auth_error(fcm: Fcm, client: FcmClient) -> None:
    """401 again after the refresh: PushAuthError, no further tries."""
    fcm.server.answer(Answer.unauthenticated(), Answer.unauthenticated())
    with pytest.raises(PushAuthError):
        await client.send(_request())
    assert fcm.server.send_requests == 2


async def test_a_refused_assertion_is_an_auth_error(fcm: Fcm) -> None:
    """A key the token endpoint does not know (bad signature) → PushAuthError."""
    other = ServiceAccountKey.generate()
    info = other.info(token_uri=fcm.server.token_uri)
    info["client_email"] = _account().client_email
    path = fcm.tmp / "wrong-key.json"
    path.write_text(json.dumps(info))
    client = FcmClient(attrs.evolve(fcm.settings, service_account_file=path))
    try:
        with pytest.raises(PushAuthError, match="invalid_grant"):
            await client.send(_request())
    finally:
        await client.aclose()
    assert fcm.server.send_requests == 0


async def test_configured_token_uri_overrides_the_key_files(fcm: Fcm) -> None:
    """An on-prem gateway: token_uri from the settings, not Google's from the key file."""
    key = _account().write(fcm.tmp / "google.json", token_uri="https://oauth2.googleapis.com/token")
    client = FcmClient(attrs.evolve(fcm.settings, service_account_file=key,
                                    token_uri=fcm.server.token_uri))
    try:
        await client.send(_request())
    finally:
        await client.aclose()
    assert fcm.server.assertions[0]["aud"] == fcm.server.token_uri
    assert len(fcm.server.accepted) == 1


def test_a_non_https_url_is_a_config_error(tmp_path: Path) -> None:
    """A url that httpx could never send to is refused when the client is built."""
    path = _account().write(tmp_path / "sa.json", token_uri="https://127.0.0.1/token")
    with pytest.raises(PushConfigError, match="url"):
        FcmClient(FcmSettings(service_account_file=path, url="ftp://fcm.example/send"))


async def test_goaway_mid_burst_delivers_every_message_exactly_once(
        start_fcm: StartFcm) -> None:
    """GOAWAY after 3 streams on every connection: streams above last-stream-id are re-sent
    on a new connection, and each of 20 pushes reaches FCM exactly once."""
    fcm = await start_fcm(goaway_after=3)
    client = FcmClient(attrs.evolve(fcm.settings, request_timeout=15))
    calls = [f"call-{n}" for n in range(20)]
    try:
        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(client.send, _request(call=call))
    finally:
        await client.aclose()
    delivered = sorted(a.data["call"] for a in fcm.server.accepted)
    assert delivered == sorted(calls)
    assert fcm.server.goaways >= 1 and fcm.server.ignored_streams >= 1
    assert client.statistics().unprocessed_resends >= 1
    assert fcm.server.errors == []


async def test_goaway_before_any_stream_resends_on_a_new_connection(
        start_fcm: StartFcm) -> None:
    """GOAWAY(last_stream_id=0) on the first connection: the push goes out on the next."""
    fcm = await start_fcm(goaway_after=0, goaway_limit=1)
    client = FcmClient(fcm.settings)
    try:
        result = await client.send(_request())
    finally:
        await client.aclose()
    assert len(fcm.server.accepted) == 1 and result.id == fcm.server.accepted[0].name
    assert fcm.server.connections >= 2


async def test_a_refused_stream_is_resent_at_once(fcm: Fcm, client: FcmClient) -> None:
    """RST_STREAM(REFUSED_STREAM) proves the push unseen: re-sent, delivered once."""
    fcm.server.answer(Answer.refuse())
    result = await client.send(_request())
    assert result.attempts == 2 and len(fcm.server.accepted) == 1
    assert client.statistics().unprocessed_resends == 1


async def test_a_connection_dropped_after_processing_is_never_retried(
        fcm: Fcm, client: FcmClient) -> None:
    """FCM took the push, then the connection died: outcome unknown, so no retry, even
    through the dispatcher: the phone rings once."""
    fcm.server.answer(Answer.drop())
    dispatcher = PushDispatcher({"fcm": client})
    with pytest.raises(PushError) as caught:
        await dispatcher.send(_request(), deadline=trio.current_time() + 10)
    assert not isinstance(caught.value, PushRetryable)
    assert "outcome unknown" in caught.value.reason
    assert len(fcm.server.accepted) == 1 and fcm.server.send_requests == 1


async def test_a_timeout_after_sending_is_not_retried(fcm: Fcm) -> None:
    """No answer within request_timeout: PushError (outcome unknown), sent once."""
    client = FcmClient(attrs.evolve(fcm.settings, request_timeout=0.8))
    try:
        await client.send(_request(call="warm-up"))  # token + connection ready
        fcm.server.answer(Answer.slow(3.0))
        with pytest.raises(PushError) as caught:
            await client.send(_request())
    finally:
        await client.aclose()
    assert not isinstance(caught.value, PushRetryable)
    assert fcm.server.send_requests == 2


async def test_an_unreachable_endpoint_is_retryable(fcm: Fcm) -> None:
    """Nothing listens at the send URL: nothing was sent, so PushRetryable."""
    url = f"https://127.0.0.1:{free_port('tcp')}/v1/projects/{{project_id}}/messages:send"
    client = FcmClient(attrs.evolve(fcm.settings, url=url))
    try:
        with pytest.raises(PushRetryable):
            await client.send(_request())
    finally:
        await client.aclose()


async def test_dispatcher_retries_a_503_and_delivers(fcm: Fcm, client: FcmClient) -> None:
    """503 with Retry-After: 0, then accepted: one delivery, attempts counted."""
    fcm.server.answer(Answer.unavailable(retry_after="0"))
    dispatcher = PushDispatcher({"fcm": client}, backoff_base=0.05)
    result = await dispatcher.send(_request(), deadline=trio.current_time() + 5)
    assert result.attempts == 2 and len(fcm.server.accepted) == 1


async def test_a_push_for_another_provider_is_refused(client: FcmClient) -> None:
    """FcmClient only sends FCM targets."""
    request = attrs.evolve(_request(), target=attrs.evolve(TARGET, provider="apns"))
    with pytest.raises(PushConfigError):
        await client.send(request)
