"""The local APNs checks what Apple checks: hand-made requests from an independent HTTP/2
client (httpx) are refused with Apple's reasons, so the client tests can trust its verdicts."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sipis.push.apns import ApnsTokenProvider
from tests.peers.apns_server import BUNDLE, KEY_ID, TEAM_ID, ApnsServer, Reply, TestKey

KEY = TestKey.generate()
TOKEN = "0f" * 32
CALL = {"sipis": {"type": "call", "instance": "i-1", "call": "c-1", "sent_at": "1700000000"}}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(*, key: TestKey = KEY, header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None, der: bool = False) -> str:
    """A provider token, valid unless told otherwise (``der``: DER signature, not r||s)."""
    signing_input = (b64(json.dumps(header or {"alg": "ES256", "kid": KEY_ID}).encode()) + "."
                     + b64(json.dumps(claims or {"iss": TEAM_ID,
                                                 "iat": int(time.time())}).encode()))
    signer = serialization.load_pem_private_key(key.pem, None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    signature = signer.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    if not der:
        r, s = decode_dss_signature(signature)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{b64(signature)}"


def voip_headers(**changes: str) -> dict[str, str]:
    headers = {"authorization": f"bearer {jwt()}", "apns-push-type": "voip",
               "apns-topic": f"{BUNDLE}.voip", "apns-priority": "10", "apns-expiration": "0",
               "apns-id": str(uuid.uuid4())}
    headers.update(changes)
    return headers


@pytest.fixture
async def server(nursery: trio.Nursery) -> ApnsServer:
    server = ApnsServer(public_key=KEY.public_key)
    await nursery.start(server.run)
    return server


@pytest.fixture
async def http(server: ApnsServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(http2=True, verify=server.client_ssl_context(),
                                 base_url=server.url) as client:
        yield client


async def post(http: httpx.AsyncClient, payload: Any = CALL, *, token: str = TOKEN,
               **headers: str) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await http.post(f"/3/device/{token}", content=body, headers=voip_headers(**headers))


async def test_well_formed_voip_push_is_accepted_over_http2_and_recorded(
        http: httpx.AsyncClient, server: ApnsServer) -> None:
    """A correct request gets 200 with its apns-id echoed, and is recorded."""
    response = await post(http, **{"apns-id": "0c8e2b4e-8d5a-4f55-9c3c-4a5a3a7d1f00"})
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    assert response.headers["apns-id"] == "0c8e2b4e-8d5a-4f55-9c3c-4a5a3a7d1f00"
    [push] = server.pushes
    assert (push.token, push.topic, push.sipis["call"]) == (TOKEN, f"{BUNDLE}.voip", "c-1")
    assert "authorization" not in push.headers


@pytest.mark.parametrize(("token", "reason"), [
    (jwt(der=True), "InvalidProviderToken"),  # a DER signature, not JOSE r||s
    (jwt(key=TestKey.generate()), "InvalidProviderToken"),  # another key
    (jwt(header={"alg": "ES256", "kid": "OTHERKEYID"}), "InvalidProviderToken"),
    (jwt(header={"alg": "HS256", "kid": KEY_ID}), "InvalidProviderToken"),
    (jwt(claims={"iss": "OTHERTEAM0", "iat": int(time.time())}), "InvalidProviderToken"),
    ("eyJub3QiOiJqc29uIn0", "InvalidProviderToken"),
])
async def test_bad_provider_tokens_are_refused_with_403(http: httpx.AsyncClient,
                                                        server: ApnsServer, token: str,
                                                        reason: str) -> None:
    """Signature, its encoding, alg, kid and iss are checked: 403 InvalidProviderToken."""
    response = await post(http, authorization=f"bearer {token}")
    assert response.status_code == 403 and response.json() == {"reason": reason}
    assert server.pushes == []


async def test_old_provider_token_is_expired(http: httpx.AsyncClient,
                                             server: ApnsServer) -> None:
    """A correctly signed token issued over an hour ago: 403 ExpiredProviderToken."""
    old = ApnsTokenProvider(TEAM_ID, KEY_ID, KEY.pem, clock=lambda: time.time() - 3700)
    response = await post(http, authorization=f"bearer {old.token()}")
    assert response.status_code == 403
    assert response.json() == {"reason": "ExpiredProviderToken"}


@pytest.mark.parametrize(("headers", "payload", "status", "reason"), [
    ({"apns-topic": BUNDLE}, CALL, 400, "BadTopic"),
    ({"apns-expiration": "3600"}, CALL, 400, "BadExpirationDate"),
    ({"apns-priority": "5"}, CALL, 400, "BadPriority"),
    ({"apns-push-type": "background"}, CALL, 400, "InvalidPushType"),
    ({"apns-id": "not-a-uuid"}, CALL, 400, "BadMessageId"),
    ({"apns-collapse-id": "x" * 65}, CALL, 400, "BadCollapseId"),
    ({}, b"", 400, "PayloadEmpty"),
    ({}, {"sipis": {**CALL["sipis"], "from_name": "x" * 6000}}, 413, "PayloadTooLarge"),
    ({}, {"sipis": {"type": "call", "call": "c", "sent_at": "1"}}, 400, "BadPayload"),
    ({}, {"sipis": {**CALL["sipis"], "colour": "red"}}, 400, "BadPayload"),
    ({}, {"sipis": {**CALL["sipis"], "sent_at": 1}}, 400, "BadPayload"),
    ({}, {"sipis": {**CALL["sipis"], "type": "message"}}, 400, "BadPayload"),
    ({}, {**CALL, "aps": {"alert": "hi"}}, 400, "BadPayload"),
    ({"apns-push-type": "alert", "apns-topic": BUNDLE, "apns-expiration": "1"},
     {"sipis": {"type": "message", "instance": "i", "sent_at": "1"}}, 400, "BadPayload"),
])
async def test_malformed_pushes_are_refused_with_apples_reasons(
        http: httpx.AsyncClient, server: ApnsServer, headers: dict[str, str], payload: Any,
        status: int, reason: str) -> None:
    """Headers, topic and the SPEC.md payload schema are all checked."""
    response = await post(http, payload, **headers)
    assert (response.status_code, response.json()["reason"]) == (status, reason)
    assert [r.reason for r in server.rejections] == [reason]
    assert server.pushes == []


async def test_token_that_is_not_hex_is_a_bad_device_token(http: httpx.AsyncClient) -> None:
    """Device tokens are hex."""
    response = await post(http, token="not-a-token")
    assert (response.status_code, response.json()["reason"]) == (400, "BadDeviceToken")


async def test_scripted_410_carries_a_timestamp_and_429_a_retry_after(
        http: httpx.AsyncClient, server: ApnsServer) -> None:
    """Scripted answers look like Apple's: 410 with timestamp, 429 with Retry-After."""
    server.reply_next(Reply(410, "Unregistered"), Reply(429, "TooManyRequests", retry_after=3))
    gone = await post(http)
    busy = await post(http)
    assert gone.status_code == 410 and gone.json()["reason"] == "Unregistered"
    assert isinstance(gone.json()["timestamp"], int)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "3"
    assert [a.status for a in server.answers] == [410, 429] and server.pushes == []
