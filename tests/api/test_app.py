"""api.app: the HTTPS API routes over a fake instance service, through httpx's ASGI transport."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
from starlette.routing import Route

from sipis.api.app import TokenBucketLimiter, build_app, client_key
from sipis.api.openapi import openapi_document
from sipis.api.problems import ALL_KINDS, PROBLEM_MEDIA_TYPE
from sipis.api.schemas import ExpiresPolicy, rfc3339_ms
from sipis.config import ApiConfig
from sipis.instances import ProviderRejected
from sipis.store.models import CallRecord
from tests.api.fakes import (
    START_TIME,
    FakeCallControl,
    FakeInstanceService,
    api_config,
    rejected,
    timed_out,
)

PASSWORD = "correct horse battery staple"
TOKEN = "f00dfeed" * 8
BASE = "https://sipis.test"


def create_body(**sip: Any) -> dict[str, Any]:
    return {
        "app": "com.example.phone",
        "sip": {"aor": "sip:alice@sip.example.net", "password": PASSWORD, **sip},
        "push": {"provider": "apns", "token": TOKEN},
        "lifetime": "3d",
    }


@attrs.define
class Harness:
    """The app under test, its fake service and a client; `seen` keeps every response text."""

    service: FakeInstanceService
    client: httpx.AsyncClient
    ready: list[bool]
    seen: list[str] = attrs.Factory(list)
    calls: FakeCallControl = attrs.Factory(FakeCallControl)

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = await self.client.request(method, url, **kwargs)
        self.seen.append(json.dumps(dict(response.headers)) + response.text)
        return response

    async def create(self, body: object | None = None, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", "/v1/instances", json=body or create_body(), **kwargs)

    async def created(self) -> tuple[str, str]:
        response = await self.create()
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["secret"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def harness(
    config: ApiConfig | None = None, *, with_calls: bool = True, **service: Any
) -> AsyncIterator[Harness]:
    fake = FakeInstanceService(**service)
    calls = FakeCallControl()
    ready = [True]
    app = build_app(
        service=fake,
        config=config or api_config(),
        ready=lambda: ready[0],
        expires=ExpiresPolicy(default=600, minimum=60, maximum=7200),
        calls=calls if with_calls else None,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        yield Harness(service=fake, client=client, ready=ready, calls=calls)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async for item in harness():
        yield item


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"https://sipis.dev/problems/{slug}"
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    return problem


# --- create ---------------------------------------------------------------------------------


async def test_create_answers_201_with_id_secret_registration_and_device(h: Harness) -> None:
    """SPEC.md's 201 body, a Location header, and no caching of the secret."""
    response = await h.create()
    assert response.status_code == 201
    body = response.json()
    assert body == {
        "id": "inst0001",
        "secret": h.service.secrets["inst0001"],
        "expires_at": "2026-09-24T14:13:20Z",
        "registration": {"state": "registered", "expires": 600},
        "device": {"registrar": "sip:127.0.0.1:5060;transport=tcp", "username": "inst0001",
                   "realm": "127.0.0.1"},
    }
    assert response.headers["location"] == "/v1/instances/inst0001"
    assert response.headers["cache-control"] == "no-store"
    stored = h.service.records["inst0001"]
    assert (stored.password, stored.push_token, stored.lifetime) == (PASSWORD, TOKEN, 3 * 86400)


async def test_create_refused_by_the_provider_is_422_naming_its_status(h: Harness) -> None:
    """The provider's status is in the detail and in provider_status; nothing is stored."""
    h.service.create_error = rejected(403, "Forbidden")
    problem = assert_problem(await h.create(), 422, "provider-rejected")
    assert problem["provider_status"] == 403
    assert "403" in problem["detail"]
    assert h.service.records == {}


async def test_a_provider_error_wrapped_in_an_exception_group_is_still_422(h: Harness) -> None:
    """A service that fails inside a nursery still maps to the right problem."""
    h.service.create_error = ExceptionGroup("in nursery", [ProviderRejected(404, "Not Found")])
    assert assert_problem(await h.create(), 422, "provider-rejected")["provider_status"] == 404


async def test_create_timing_out_in_the_service_is_504(h: Harness) -> None:
    """The service's own ProviderTimeout."""
    h.service.create_error = timed_out()
    assert_problem(await h.create(), 504, "provider-timeout")


async def test_create_that_outlasts_create_timeout_is_cancelled_with_504() -> None:
    """The API's own deadline (api.create_timeout) cancels a hanging create."""
    async for h in harness(api_config(create_timeout=0.05), create_hangs=True):
        assert_problem(await h.create(), 504, "provider-timeout")
        assert h.service.records == {}


async def test_create_for_a_domain_outside_the_allow_list_is_403() -> None:
    """The AOR domain is checked before anything is sent upstream."""
    async for h in harness(api_config(allowed_domains=("*.example.com",))):
        problem = assert_problem(await h.create(), 403, "not-allowed")
        assert problem["errors"] == [{"field": "sip.aor", "message": problem["detail"]}]
        assert "sip.example.net" in problem["detail"]
        assert h.service.calls == []
        body = create_body(aor="sip:alice@pbx.example.com")
        assert (await h.create(body)).status_code == 201


async def test_create_for_an_app_outside_the_allow_list_is_403() -> None:
    """The app is matched against api.allowed_apps."""
    async for h in harness(api_config(allowed_apps=("com.other.app",))):
        problem = assert_problem(await h.create(), 403, "not-allowed")
        assert problem["errors"][0]["field"] == "app"


async def test_create_with_a_body_over_max_body_bytes_is_413() -> None:
    """A declared Content-Length over the limit is refused."""
    async for h in harness(api_config(max_body_bytes=200)):
        body = create_body(password="x" * 250)
        assert_problem(await h.create(body), 413, "body-too-large")
        assert h.service.calls == []


async def test_a_chunked_body_is_cut_off_at_the_limit_without_content_length() -> None:
    """The limit is enforced while reading, not only from Content-Length."""
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            sent.append(1)
            yield b" " * 100

    async for h in harness(api_config(max_body_bytes=1000)):
        response = await h.request(
            "POST", "/v1/instances", content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert_problem(response, 413, "body-too-large")


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                     "application/json; charset=latin-1", "application/jsonx"]
)
async def test_create_without_a_json_content_type_is_415(
    h: Harness, content_type: str | None
) -> None:
    """Only application/json (UTF-8) bodies are read."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await h.request(
        "POST", "/v1/instances", content=json.dumps(create_body()).encode(), headers=headers
    )
    assert_problem(response, 415, "unsupported-media-type")


async def test_create_accepts_json_with_a_utf8_charset(h: Harness) -> None:
    """application/json; charset=utf-8 is fine."""
    response = await h.request(
        "POST", "/v1/instances", content=json.dumps(create_body()).encode(),
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert response.status_code == 201


async def test_create_with_malformed_json_is_400_malformed_body(h: Harness) -> None:
    """Not JSON at all is its own problem type."""
    response = await h.request(
        "POST", "/v1/instances", content=b'{"app": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400, "malformed-body")


async def test_create_with_invalid_fields_is_400_listing_every_error(h: Harness) -> None:
    """The validation problem carries errors: [{field, message}]."""
    body = create_body(password="", expires=5)
    body["push"]["provider"] = "webpush"
    problem = assert_problem(await h.create(body), 400, "validation")
    assert {e["field"] for e in problem["errors"]} == {
        "sip.password", "sip.expires", "push.provider"
    }
    assert h.service.calls == []


async def test_an_unknown_key_that_is_a_lone_surrogate_is_still_a_400(h: Harness) -> None:
    """Errors that quote the client's key are escaped, never a 500 while rendering."""
    response = await h.request(
        "POST", "/v1/instances", content=b'{"\\ud800": 1}',
        headers={"Content-Type": "application/json"},
    )
    problem = assert_problem(response, 400, "validation")
    assert {"field": "\ud800", "message": "unknown field"} in problem["errors"]


async def test_create_is_rate_limited_per_client_with_retry_after() -> None:
    """After `burst` creates from one address the next is 429 with Retry-After."""
    config = api_config(per_minute=1, burst=2)
    async for h in harness(config):
        assert (await h.create()).status_code == 201
        assert (await h.create({"not": "valid"})).status_code == 400  # counts too
        response = await h.create()
        assert_problem(response, 429, "rate-limited")
        assert 1 <= int(response.headers["retry-after"]) <= 60


# --- authenticated endpoints ----------------------------------------------------------------


async def test_get_without_authorization_is_401_with_a_bearer_challenge(h: Harness) -> None:
    """RFC 6750: WWW-Authenticate: Bearer, before anything about the instance is looked up."""
    instance_id, _ = await h.created()
    response = await h.request("GET", f"/v1/instances/{instance_id}")
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="sipis"'
    assert ("authenticate", instance_id) not in h.service.calls


@pytest.mark.parametrize(
    "authorization", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer ", "secret-0001"]
)
async def test_a_non_bearer_authorization_is_401(h: Harness, authorization: str) -> None:
    """Only the Bearer scheme with a value is accepted."""
    instance_id, _ = await h.created()
    response = await h.request(
        "GET", f"/v1/instances/{instance_id}", headers={"Authorization": authorization}
    )
    assert_problem(response, 401, "unauthorized")


async def test_a_wrong_secret_is_401_invalid_token(h: Harness) -> None:
    """The challenge says error="invalid_token"."""
    instance_id, secret = await h.created()
    response = await h.request(
        "GET", f"/v1/instances/{instance_id}", headers=bearer(secret + "x")
    )
    assert_problem(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    long = await h.request("GET", f"/v1/instances/{instance_id}", headers=bearer("x" * 600))
    assert_problem(long, 401, "unauthorized")


@pytest.mark.parametrize("instance_id", ["nope", "inst9999", "a" * 129, "bad%20id"])
async def test_an_unknown_instance_is_404(h: Harness, instance_id: str) -> None:
    """Unknown or impossible ids."""
    response = await h.request("GET", f"/v1/instances/{instance_id}", headers=bearer("s"))
    assert_problem(response, 404, "not-found")


async def test_get_returns_state_and_counts_as_heard_from(h: Harness) -> None:
    """GET touches the instance: expires_at moves by the lifetime from now."""
    instance_id, secret = await h.created()
    h.service.now = START_TIME + 3600
    response = await h.request("GET", f"/v1/instances/{instance_id}", headers=bearer(secret))
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == instance_id
    assert body["push"] == {"provider": "apns", "environment": "production",
                            "token": TOKEN[:6] + "…(64)"}
    assert body["last_heard_at"] == "2026-09-21T15:13:20Z"
    assert body["expires_at"] == "2026-09-24T15:13:20Z"
    assert body["registration"]["state"] == "registered"
    assert ("touch", instance_id) in h.service.calls
    assert response.headers["cache-control"] == "no-store"


async def test_patch_changes_token_and_lifetime_and_extends_expiry(h: Harness) -> None:
    """PATCH answers with the new state; expiry counts from now with the new lifetime."""
    instance_id, secret = await h.created()
    h.service.now = START_TIME + 86400
    new_token = "c0ffee" * 10
    response = await h.request(
        "PATCH", f"/v1/instances/{instance_id}", headers=bearer(secret),
        json={"push": {"token": new_token}, "sip": {"password": "new pw"}, "lifetime": "5d"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["push"]["token"] == "c0ffee…(60)"
    assert body["lifetime"] == 5 * 86400
    assert body["expires_at"] == "2026-09-27T14:13:20Z"
    assert h.service.records[instance_id].password == "new pw"


async def test_an_empty_patch_only_extends_the_expiry(h: Harness) -> None:
    """{} is heard-from: same lifetime, later expiry."""
    instance_id, secret = await h.created()
    h.service.now = START_TIME + 7200
    response = await h.request(
        "PATCH", f"/v1/instances/{instance_id}", headers=bearer(secret), json={}
    )
    assert response.status_code == 200
    assert response.json()["expires_at"] == "2026-09-24T16:13:20Z"
    assert ("update", instance_id) in h.service.calls


async def test_patch_errors_are_problems_after_authentication(h: Harness) -> None:
    """Bad fields 400, bad media type 415, bad JSON 400; unauthenticated is 401 first."""
    instance_id, secret = await h.created()
    url = f"/v1/instances/{instance_id}"
    invalid = await h.request("PATCH", url, headers=bearer(secret),
                              json={"push": {"environment": "dev"}, "sip": {"aor": "x"}})
    problem = assert_problem(invalid, 400, "validation")
    assert {e["field"] for e in problem["errors"]} == {"push.environment", "sip.aor"}
    wrong_type = await h.request("PATCH", url, headers=bearer(secret), content=b"{}")
    assert_problem(wrong_type, 415, "unsupported-media-type")
    broken = await h.request("PATCH", url, content=b"{", headers={
        **bearer(secret), "Content-Type": "application/json"})
    assert_problem(broken, 400, "malformed-body")
    anonymous = await h.request("PATCH", url, content=b"{", headers={
        "Content-Type": "application/json"})
    assert_problem(anonymous, 401, "unauthorized")


async def test_delete_wipes_and_answers_204_then_the_instance_is_gone(h: Harness) -> None:
    """DELETE → 204 (reason "deleted"); afterwards the id is unknown."""
    instance_id, secret = await h.created()
    url = f"/v1/instances/{instance_id}"
    response = await h.request("DELETE", url, headers=bearer(secret))
    assert response.status_code == 204
    assert response.content == b""
    assert ("wipe:deleted", instance_id) in h.service.calls
    assert_problem(await h.request("GET", url, headers=bearer(secret)), 404, "not-found")
    assert_problem(await h.request("DELETE", url, headers=bearer(secret)), 404, "not-found")


async def test_foreground_and_background_hand_the_registration_over(h: Harness) -> None:
    """Both answer 200 with the state (the service counts them as heard from)."""
    instance_id, secret = await h.created()
    h.service.now = START_TIME + 60
    fg = await h.request("POST", f"/v1/instances/{instance_id}/foreground",
                         headers=bearer(secret))
    assert fg.status_code == 200
    assert fg.json()["registration"]["state"] == "unregistered"
    assert fg.json()["last_heard_at"] == "2026-09-21T14:14:20Z"
    bg = await h.request("POST", f"/v1/instances/{instance_id}/background",
                         headers=bearer(secret))
    assert bg.status_code == 200
    assert bg.json()["registration"]["state"] == "registered"
    assert [c for c in h.service.calls if c[0] in ("foreground", "background")] == [
        ("foreground", instance_id), ("background", instance_id),
    ]
    anonymous = await h.request("POST", f"/v1/instances/{instance_id}/foreground")
    assert_problem(anonymous, 401, "unauthorized")


async def test_no_response_ever_holds_the_password_or_the_full_token(h: Harness) -> None:
    """Across create, GET, PATCH, foreground, errors and DELETE."""
    instance_id, secret = await h.created()
    url = f"/v1/instances/{instance_id}"
    await h.request("GET", url, headers=bearer(secret))
    await h.request("PATCH", url, headers=bearer(secret), json={"lifetime": 3600})
    await h.request("PATCH", url, headers=bearer(secret), json={"sip": {"password": "a\nb"}})
    await h.request("POST", url + "/foreground", headers=bearer(secret))
    await h.create(create_body(expires=1))
    await h.request("DELETE", url, headers=bearer(secret))
    for text in h.seen:
        assert PASSWORD not in text
        assert TOKEN not in text
        assert "verifier" not in text
    # The secret appears exactly once: in the 201 body.
    assert sum(secret in text for text in h.seen) == 1


# --- fast channel: progress and decline -----------------------------------------------------


def call_url(instance_id: str, call_ref: str, action: str) -> str:
    return f"/v1/instances/{instance_id}/calls/{call_ref}/{action}"


@pytest.mark.parametrize("action", ["progress", "decline"])
async def test_a_ringing_call_answers_204_and_counts_as_heard_from(
    h: Harness, action: str
) -> None:
    """The call layer gets (instance id, call ref); the instance is touched; no body."""
    instance_id, secret = await h.created()
    h.calls.ringing.add((instance_id, "c0ffee01"))
    h.service.now = START_TIME + 600
    response = await h.request("POST", call_url(instance_id, "c0ffee01", action),
                               headers=bearer(secret))
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert response.headers["cache-control"] == "no-store"
    assert h.calls.events == [(action, instance_id, "c0ffee01")]
    assert ("touch", instance_id) in h.service.calls
    assert h.service.records[instance_id].last_heard_at == START_TIME + 600


@pytest.mark.parametrize("action", ["progress", "decline"])
async def test_an_unknown_call_is_404_and_still_counts_as_heard_from(
    h: Harness, action: str
) -> None:
    """Unknown (or already finished) call refs: 404 problem; the device was heard from."""
    instance_id, secret = await h.created()
    response = await h.request("POST", call_url(instance_id, "deadbeef", action),
                               headers=bearer(secret))
    assert_problem(response, 404, "not-found")
    assert ("touch", instance_id) in h.service.calls


async def test_a_declined_call_no_longer_rings_so_a_second_decline_is_404(h: Harness) -> None:
    """The fast channel only acts on calls still ringing."""
    instance_id, secret = await h.created()
    h.calls.ringing.add((instance_id, "c1"))
    url = call_url(instance_id, "c1", "decline")
    assert (await h.request("POST", url, headers=bearer(secret))).status_code == 204
    assert_problem(await h.request("POST", url, headers=bearer(secret)), 404, "not-found")


@pytest.mark.parametrize("action", ["progress", "decline"])
async def test_another_instances_call_is_404_like_an_unknown_one(
    h: Harness, action: str
) -> None:
    """Authenticated as A, B's ringing call is not found, not touched, and B is untouched."""
    first, first_secret = await h.created()
    second, _ = await h.created()
    h.calls.ringing.add((second, "b0b0"))
    response = await h.request("POST", call_url(first, "b0b0", action),
                               headers=bearer(first_secret))
    problem = assert_problem(response, 404, "not-found")
    unknown = await h.request("POST", call_url(first, "nope", action),
                              headers=bearer(first_secret))
    assert problem["detail"] == unknown.json()["detail"]
    assert (second, "b0b0") in h.calls.ringing
    assert ("touch", second) not in h.service.calls


@pytest.mark.parametrize("action", ["progress", "decline"])
async def test_call_routes_need_the_instance_secret(h: Harness, action: str) -> None:
    """No header or a wrong secret: 401 and the call layer is never asked."""
    instance_id, secret = await h.created()
    h.calls.ringing.add((instance_id, "c1"))
    url = call_url(instance_id, "c1", action)
    assert_problem(await h.request("POST", url), 401, "unauthorized")
    wrong = await h.request("POST", url, headers=bearer(secret + "x"))
    assert_problem(wrong, 401, "unauthorized")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert h.calls.events == []
    assert ("touch", instance_id) not in h.service.calls


@pytest.mark.parametrize("instance_id", ["inst9999", "a" * 129])
async def test_call_routes_for_an_unknown_instance_are_404(h: Harness, instance_id: str) -> None:
    """The instance is checked before the call layer is asked."""
    response = await h.request("POST", call_url(instance_id, "c1", "progress"),
                               headers=bearer("s"))
    assert_problem(response, 404, "not-found")
    assert h.calls.events == []


async def test_an_impossible_call_ref_is_404_without_asking_the_call_layer(h: Harness) -> None:
    """Refs outside the token alphabet or too long cannot exist."""
    instance_id, secret = await h.created()
    for ref in ("a" * 129, "bad%20ref"):
        response = await h.request("POST", call_url(instance_id, ref, "decline"),
                                   headers=bearer(secret))
        assert_problem(response, 404, "not-found")
    assert h.calls.events == []


async def test_without_a_call_layer_the_call_routes_answer_404() -> None:
    """build_app's default (calls=None): authenticated, heard from, but no call is known."""
    async for h in harness(with_calls=False):
        instance_id, secret = await h.created()
        for action in ("progress", "decline"):
            response = await h.request("POST", call_url(instance_id, "c1", action),
                                       headers=bearer(secret))
            assert_problem(response, 404, "not-found")
        assert ("touch", instance_id) in h.service.calls


async def test_call_routes_only_take_post(h: Harness) -> None:
    """GET on a fast-channel route is 405 with Allow: POST."""
    response = await h.request("GET", call_url("inst0001", "c1", "progress"))
    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "POST"


# --- call records ---------------------------------------------------------------------------


def call_record(instance_id: str, n: int, outcome: str) -> CallRecord:
    return CallRecord(instance_id=instance_id, call=f"c{n}", sip_call_id=f"id{n}@pbx",
                      from_uri=f"sip:10{n}@pbx.example", from_name=None if n else "Bob",
                      to_uri="sip:alice@pbx.example", started_at=START_TIME + 10 * n,
                      ended_at=START_TIME + 10 * n + 5.25, outcome=outcome)


async def test_calls_lists_this_instances_records_with_outcomes_and_counts_as_heard_from(
    h: Harness,
) -> None:
    """Only the authenticated instance's records, as the call layer gives them (newest first),
    every SPEC field, RFC 3339 times; the instance is touched; never cached."""
    instance_id, secret = await h.created()
    other, _ = await h.created()
    h.calls.records = [call_record(instance_id, 1, "answered-elsewhere"),
                       call_record(instance_id, 0, "missed"), call_record(other, 2, "declined")]
    h.service.now = START_TIME + 900
    response = await h.request("GET", f"/v1/instances/{instance_id}/calls",
                               headers=bearer(secret))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    calls = response.json()["calls"]
    assert [c["outcome"] for c in calls] == ["answered-elsewhere", "missed"]
    assert calls[1] == {
        "call": "c0", "sip_call_id": "id0@pbx", "from_uri": "sip:100@pbx.example",
        "from_name": "Bob", "to_uri": "sip:alice@pbx.example",
        "started_at": rfc3339_ms(START_TIME), "ended_at": rfc3339_ms(START_TIME + 5.25),
        "outcome": "missed",
    }
    assert ("touch", instance_id) in h.service.calls
    assert h.service.records[instance_id].last_heard_at == START_TIME + 900


async def test_calls_needs_the_secret_and_is_404_for_an_unknown_instance(h: Harness) -> None:
    instance_id, secret = await h.created()
    url = f"/v1/instances/{instance_id}/calls"
    assert_problem(await h.request("GET", url), 401, "unauthorized")
    assert_problem(await h.request("GET", url, headers=bearer(secret + "x")), 401,
                   "unauthorized")
    assert_problem(await h.request("GET", "/v1/instances/inst9999/calls",
                                   headers=bearer(secret)), 404, "not-found")
    assert h.calls.events == []


async def test_without_a_call_layer_calls_is_an_empty_list() -> None:
    async for h in harness(with_calls=False):
        instance_id, secret = await h.created()
        response = await h.request("GET", f"/v1/instances/{instance_id}/calls",
                                   headers=bearer(secret))
        assert response.json() == {"calls": []}


# --- errors from outside the endpoints ------------------------------------------------------


async def test_an_unknown_path_is_a_404_problem_not_starlette_text(h: Harness) -> None:
    """Routing errors are problems too."""
    assert_problem(await h.request("GET", "/nope"), 404, "not-found")
    assert_problem(await h.request("GET", "/v1/instances/"), 404, "not-found")


async def test_a_wrong_method_is_a_405_problem_with_allow(h: Harness) -> None:
    """Allow lists the methods of the route."""
    response = await h.request("PUT", "/v1/instances/abc")
    assert_problem(response, 405, "method-not-allowed")
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {
        "GET", "HEAD", "PATCH", "DELETE"
    }
    assert_problem(await h.request("GET", "/v1/instances"), 405, "method-not-allowed")


async def test_an_unexpected_error_is_a_generic_500_and_is_logged(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """No stack trace and no exception text in the body; the log has the traceback."""
    instance_id, secret = await h.created()
    h.service.fail_with = RuntimeError("internal detail xyzzy")
    with caplog.at_level(logging.ERROR, logger="sipis.api.app"):
        response = await h.request("GET", f"/v1/instances/{instance_id}", headers=bearer(secret))
    problem = assert_problem(response, 500, "internal")
    assert "xyzzy" not in response.text and "Traceback" not in response.text
    assert problem["detail"] == "The server hit an unexpected error."
    assert any(r.exc_info and "xyzzy" in str(r.exc_info[1]) for r in caplog.records)


# --- health, readiness, OpenAPI -------------------------------------------------------------


async def test_healthz_is_always_ok(h: Harness) -> None:
    """Liveness needs nothing."""
    response = await h.request("GET", "/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_readyz_follows_the_ready_callback(h: Harness) -> None:
    """200 when ready, 503 problem otherwise."""
    assert (await h.request("GET", "/readyz")).json() == {"status": "ready"}
    h.ready[0] = False
    assert_problem(await h.request("GET", "/readyz"), 503, "not-ready")


async def test_the_openapi_document_is_served(h: Harness) -> None:
    """GET /v1/openapi.json returns the hand-written document."""
    response = await h.request("GET", "/v1/openapi.json")
    assert response.status_code == 200
    assert response.json() == openapi_document()


def test_every_app_route_is_in_the_openapi_document_and_vice_versa() -> None:
    """The hand-written document and the routes cannot drift apart."""
    app = build_app(service=FakeInstanceService(), config=api_config(), ready=lambda: True)
    routes = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    document = openapi_document()
    described = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routes == described


def test_the_openapi_document_lists_every_problem_type_and_resolves_its_refs() -> None:
    """Each problem kind is a documented response; every $ref points at something."""
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    assert set(document["components"]["responses"]) == {kind.slug for kind in ALL_KINDS}

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        _, section, name = ref.rsplit("/", 2)
        assert name in document["components"][section], ref


# --- rate limiter ---------------------------------------------------------------------------


def test_the_token_bucket_refills_at_per_minute_and_says_when_to_retry() -> None:
    """burst tokens at once, then one per 60/per_minute seconds."""
    now = [0.0]
    limiter = TokenBucketLimiter(per_minute=6, burst=2, clock=lambda: now[0])
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") == pytest.approx(10.0)
    assert limiter.acquire("b") is None  # per key
    now[0] = 9.0
    assert limiter.acquire("a") == pytest.approx(1.0)
    now[0] = 10.0
    assert limiter.acquire("a") is None


def test_the_limiter_forgets_idle_buckets_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays bounded: refilled buckets are dropped first."""
    monkeypatch.setattr("sipis.api.app.MAX_RATE_BUCKETS", 4)
    now = [0.0]
    limiter = TokenBucketLimiter(per_minute=60, burst=1, clock=lambda: now[0])
    for key in "abcd":
        limiter.acquire(key)
    now[0] = 100.0
    limiter.acquire("e")
    assert len(limiter._buckets) == 1


@pytest.mark.parametrize(
    ("host", "key"),
    [("192.0.2.7", "192.0.2.7"), ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
     ("::ffff:192.0.2.7", "192.0.2.7"), ("testclient", "testclient"), (None, "unknown")],
)
def test_clients_are_limited_per_address_and_ipv6_per_64(host: str | None, key: str) -> None:
    """One IPv6 host usually has a whole /64."""
    assert client_key(host) == key
