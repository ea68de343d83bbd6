"""The HTTPS API as a Starlette app: routing, bearer auth, limits, and error mapping.

Strategy: the app is a thin edge over ``InstanceServiceAPI``. Each endpoint reads and checks the
request (rate limit, content type, body size, JSON, schema, allow-lists, bearer secret), calls
one or two service methods and serialises the answer with ``api.schemas``. Every failure ends as
an RFC 9457 problem: endpoints raise ``ProblemError`` or let a service error escape, and one
wrapper (``_guarded``) maps those, Starlette's own HTTPExceptions and anything unexpected (500,
logged, no details) to ``api.problems``. Nothing here is asyncio-specific: Starlette runs on
anyio, and the only timeout is a trio cancel scope, so the app runs under hypercorn's trio
worker and under ``httpx.ASGITransport`` in trio tests.

Order of checks (cheap first, and nothing about an instance is revealed before its secret is):

    POST /v1/instances:  rate limit → content type → body size → JSON → schema → allow-lists
                         → service.create within api.create_timeout
    /v1/instances/{id}…: Authorization header present → service.authenticate → (body checks)
                         → the service call; every authenticated call counts as heard from
                         the device (GET touches; update/foreground/background do it inside).
    GET …/calls:         the same auth → ``CallControl.call_records`` → touch; 200.
    …/calls/{call}/progress|decline: the same auth → ``CallControl`` → touch; 204 if the
                         call rings for this instance, else 404 (one answer for an unknown
                         call and another instance's call, so nothing about it leaks).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Final, Protocol

import attrs
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sipis.api import problems
from sipis.api.openapi import openapi_document
from sipis.api.problems import ProblemResponse, problem_response
from sipis.api.schemas import (
    ExpiresPolicy,
    FieldError,
    Invalid,
    MalformedBody,
    aor_domain,
    call_record_body,
    created_body,
    decode_json,
    instance_body,
    validate_new_instance,
    validate_update,
)
from sipis.instances import (
    InstanceServiceAPI,
    InvalidInstance,
    NotAllowed,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnreachable,
    Unauthorized,
    WipeReason,
    allowed,
)
from sipis.store.errors import NotFound
from sipis.store.models import CallRecord, InstanceRecord

log = logging.getLogger(__name__)

INSTANCES_PATH: Final = "/v1/instances"
# Instance ids are server-made URL-safe tokens; anything else cannot exist (404 without a
# store lookup).
_INSTANCE_ID_RE: Final = re.compile(r"[A-Za-z0-9._~-]{1,128}")
# Call refs (the push payload's ``call`` key) are server-made tokens of the same alphabet.
_CALL_REF_RE: Final = _INSTANCE_ID_RE
# A bearer secret longer than this is not one of ours; refuse it without hashing it.
MAX_SECRET_LENGTH: Final = 512
# Rate-limit buckets kept per client before full (idle) ones are dropped.
MAX_RATE_BUCKETS: Final = 10_000
# IPv6 clients are limited per /64: one host usually holds the whole prefix.
IPV6_RATE_PREFIX: Final = 64
# Before an early answer, up to this much unread body is read and dropped, for this long
# at most (see _discard_body).
DISCARD_LIMIT: Final = 1 << 20
DISCARD_TIMEOUT: Final = 5.0
# request.state flag: the body has been read to its end (or the client left).
_BODY_DONE: Final = "sipis_body_done"

Endpoint = Callable[[Request], Awaitable[Response]]


class _RateConfig(Protocol):
    @property
    def per_minute(self) -> float: ...
    @property
    def burst(self) -> int: ...


class ApiSettings(Protocol):
    """The part of ``sipis.config.ApiConfig`` the app reads (structural, so tests may pass
    any object with these attributes)."""

    @property
    def allowed_domains(self) -> Sequence[str]: ...
    @property
    def allowed_apps(self) -> Sequence[str]: ...
    @property
    def max_body_bytes(self) -> int: ...
    @property
    def create_rate(self) -> _RateConfig: ...
    @property
    def create_timeout(self) -> float: ...


class CallControl(Protocol):
    """The fast channel into the call layer (``sipis.calls.driver.CallDriver`` fits).

    Both return False when no call with that ref rings for that instance (unknown, finished,
    or another instance's call); they must not block.
    """

    def progress(self, instance_id: str, call_ref: str) -> bool: ...
    def decline(self, instance_id: str, call_ref: str) -> bool: ...
    async def call_records(self, instance_id: str) -> list[CallRecord]:
        """The instance's finished calls, newest first, within the retention."""
        ...


class ProblemError(Exception):
    """Raised inside an endpoint to answer with a problem response."""

    def __init__(self, response: ProblemResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


# --- rate limiting -------------------------------------------------------------------------


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class TokenBucketLimiter:
    """Per-key token buckets: ``burst`` tokens, refilled at ``per_minute``/60 per second.

    The clock is passed in so tests can drive it; the app uses ``trio.current_time``.
    """

    def __init__(
        self, *, per_minute: float, burst: int, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str) -> float | None:
        """Take one token for ``key``: None if granted, else seconds until one is available."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_RATE_BUCKETS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        if self.rate <= 0:
            return math.inf
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely: they behave like new ones."""
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * self.rate >= self.burst:
                del self._buckets[key]
        if len(self._buckets) >= MAX_RATE_BUCKETS:
            # Every bucket is busy (a flood from many addresses): drop the stalest half.
            stale = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for key in stale[: len(stale) // 2]:
                del self._buckets[key]


def client_key(host: str | None) -> str:
    """The rate-limit key of a client address (IPv6 grouped per /64)."""
    if host is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, IPV6_RATE_PREFIX), strict=False))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# --- request helpers -----------------------------------------------------------------------


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    all_headers = {"Cache-Control": "no-store"}
    all_headers.update(headers or {})
    return JSONResponse(body, status_code=status, headers=all_headers)


def _require_json_content_type(request: Request) -> None:
    media_type, *params = request.headers.get("content-type", "").split(";")
    charset_ok = all(
        param.strip().lower() in ("charset=utf-8", 'charset="utf-8"')
        for param in params
        if param.strip().lower().startswith("charset")
    )
    if media_type.strip().lower() != "application/json" or not charset_ok:
        raise ProblemError(
            problem_response(
                problems.UNSUPPORTED_MEDIA_TYPE,
                "Send the body as application/json (UTF-8).",
                headers={"Accept-Post": "application/json"}
                if request.method == "POST"
                else {"Accept-Patch": "application/json"},
            )
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    Content-Length is checked first (cheap), but the stream is counted too: a chunked or
    lying request is cut off at limit + 1 bytes, never buffered whole.
    """
    too_large = ProblemError(
        problem_response(
            problems.BODY_TOO_LARGE, f"The request body must be at most {limit} bytes."
        )
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in _body_chunks(request):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body straight from ASGI ``receive``, remembering when it has ended.

    Not Starlette's ``Request.stream()``: that cannot be resumed after we stop early (413),
    and ``_discard_body`` must be able to go on reading where ``_read_body`` stopped.
    """
    while not getattr(request.state, _BODY_DONE, False):
        message = await request.receive()
        if message["type"] == "http.request":
            if not message.get("more_body", False):
                setattr(request.state, _BODY_DONE, True)
            yield bytes(message.get("body", b""))
        elif message["type"] == "http.disconnect":
            setattr(request.state, _BODY_DONE, True)
            raise ClientDisconnect()


async def _discard_body(request: Request) -> None:
    """Read and drop what is left of the body (bounded in size and time) before answering.

    An answer sent while the client is still sending would, over HTTP/2, make hypercorn
    drop the whole connection (and every other stream on it) when the rest arrives; see
    server._ContainedTCPServer. Draining first lets early answers (401, 413, 429, …) reach
    the client cleanly; past DISCARD_LIMIT or DISCARD_TIMEOUT the connection may be lost.
    """
    if getattr(request.state, _BODY_DONE, False):
        return
    size = 0
    with trio.move_on_after(DISCARD_TIMEOUT):
        try:
            async for chunk in _body_chunks(request):
                size += len(chunk)
                if size > DISCARD_LIMIT:
                    return
        except ClientDisconnect:
            return


def _decode(raw: bytes) -> object:
    try:
        return decode_json(raw)
    except MalformedBody as exc:
        raise ProblemError(problem_response(problems.MALFORMED, str(exc))) from None


def _bearer_secret(request: Request) -> str:
    """The secret from ``Authorization: Bearer …`` (RFC 6750 §2.1), or a 401."""
    header = request.headers.get("authorization")
    if header is None:
        raise ProblemError(
            problems.unauthorized("Send Authorization: Bearer <secret>.", invalid_token=False)
        )
    scheme, _, secret = header.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise ProblemError(
            problems.unauthorized(
                "The Authorization header must use the Bearer scheme.", invalid_token=False
            )
        )
    if len(secret) > MAX_SECRET_LENGTH:
        raise ProblemError(problems.unauthorized("Invalid secret.", invalid_token=True))
    return secret


def _not_found() -> ProblemResponse:
    return problem_response(problems.NOT_FOUND, "No such instance.")


def _instance_id(request: Request) -> str:
    instance_id = str(request.path_params["id"])
    if not _INSTANCE_ID_RE.fullmatch(instance_id):
        raise ProblemError(_not_found())
    return instance_id


# --- error mapping -------------------------------------------------------------------------


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _problem_for(exc: Exception) -> ProblemResponse | None:
    """The response for an expected error, or None if it is a bug (→ 500)."""
    if isinstance(exc, ExceptionGroup):
        # A service that runs a nursery may wrap its one error in a group.
        leaves = list(_leaves(exc))
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            return _problem_for(leaves[0])
        return None
    if isinstance(exc, ProblemError):
        return exc.response
    if isinstance(exc, NotFound):
        return _not_found()
    if isinstance(exc, Unauthorized):
        return problems.unauthorized("Invalid secret for this instance.", invalid_token=True)
    if isinstance(exc, NotAllowed):
        return problem_response(
            problems.FORBIDDEN, str(exc), errors=[FieldError(exc.field, str(exc))]
        )
    if isinstance(exc, InvalidInstance):
        return problems.validation_failed([FieldError(exc.field, str(exc))])
    if isinstance(exc, ProviderRejected):
        return problem_response(
            problems.PROVIDER_REJECTED,
            f"The SIP provider answered {exc.status} {exc.reason}; nothing was stored.",
            extra={"provider_status": exc.status},
        )
    if isinstance(exc, ProviderUnreachable):
        return problem_response(
            problems.PROVIDER_UNREACHABLE,
            "The registrar could not be found (RFC 3263); nothing was stored.",
        )
    if isinstance(exc, ProviderTimeout):
        return _provider_timeout()
    if isinstance(exc, ClientDisconnect):
        return problem_response(problems.MALFORMED, "The client went away.")
    return None


def _provider_timeout() -> ProblemResponse:
    return problem_response(
        problems.PROVIDER_TIMEOUT,
        "The SIP provider did not answer the REGISTER in time; nothing was stored.",
    )


def _guarded(endpoint: Endpoint) -> Endpoint:
    """Run an endpoint and turn every exception into a problem response (never a trace)."""

    async def guarded(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except Exception as exc:
            problem = _problem_for(exc)
            if problem is None:
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                problem = problem_response(problems.INTERNAL, "The server hit an unexpected error.")
            response = problem
        await _discard_body(request)
        return response

    return guarded


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route → 404, wrong method → 405) as problems."""
    if not isinstance(exc, HTTPException):  # pragma: no cover - registered for HTTPException
        return await _server_error(request, exc)
    await _discard_body(request)
    kind = problems.kind_for_status(exc.status_code)
    detail = {404: "No such resource.", 405: f"{request.method} is not allowed here."}.get(
        exc.status_code, exc.detail
    )
    return problem_response(kind, detail, status=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    # ServerErrorMiddleware logs nothing itself and re-raises after this response is sent.
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(problems.INTERNAL, "The server hit an unexpected error.")


# --- endpoints -----------------------------------------------------------------------------


@attrs.define
class _Api:
    service: InstanceServiceAPI
    config: ApiSettings
    ready: Callable[[], bool]
    expires: ExpiresPolicy
    limiter: TokenBucketLimiter
    calls: CallControl | None = None

    def reconfigure(self, config: ApiSettings, expires: ExpiresPolicy) -> None:
        """New allow-lists, limits and expiry bounds for the requests that follow; the
        create-rate buckets start afresh only if the rate itself changed."""
        old = self.config.create_rate
        self.config = config
        self.expires = expires
        rate = config.create_rate
        if (rate.per_minute, rate.burst) != (old.per_minute, old.burst):
            self.limiter = TokenBucketLimiter(per_minute=rate.per_minute, burst=rate.burst,
                                              clock=self.limiter.clock)

    async def create(self, request: Request) -> Response:
        client = request.client.host if request.client else None
        retry_after = self.limiter.acquire(client_key(client))
        if retry_after is not None:
            seconds = max(1, math.ceil(min(retry_after, 86400.0)))
            return problem_response(
                problems.RATE_LIMITED,
                f"Too many new instances from this address; retry in {seconds} s.",
                headers={"Retry-After": str(seconds)},
            )
        _require_json_content_type(request)
        body = _decode(await _read_body(request, self.config.max_body_bytes))
        new = validate_new_instance(body, expires=self.expires)
        if isinstance(new, Invalid):
            return problems.validation_failed(new.errors)
        # The service checks again (it is the policy's owner); checking here first spares the
        # provider a REGISTER and uses the very same matching rule.
        domain = aor_domain(new.aor)
        if not allowed(domain, tuple(self.config.allowed_domains)):
            raise NotAllowed("sip.aor", f"The AOR domain {domain} is not allowed here.")
        if not allowed(new.app, tuple(self.config.allowed_apps)):
            raise NotAllowed("app", f"The app {new.app} is not allowed here.")
        with trio.move_on_after(self.config.create_timeout):
            created = await self.service.create(new)
            record = created.record
            body_out = created_body(
                created,
                self.service.registration_status(record),
                self.service.device_info(record),
            )
            return _json(body_out, 201, {"Location": f"{INSTANCES_PATH}/{record.id}"})
        return _provider_timeout()

    async def _authenticate(self, request: Request) -> InstanceRecord:
        secret = _bearer_secret(request)
        return await self.service.authenticate(_instance_id(request), secret)

    def _state(self, record: InstanceRecord) -> Response:
        return _json(instance_body(record, self.service.registration_status(record)))

    async def get(self, request: Request) -> Response:
        record = await self._authenticate(request)
        return self._state(await self.service.touch(record.id))

    async def patch(self, request: Request) -> Response:
        record = await self._authenticate(request)
        _require_json_content_type(request)
        body = _decode(await _read_body(request, self.config.max_body_bytes))
        update = validate_update(body, push_provider=record.push_provider)
        if isinstance(update, Invalid):
            return problems.validation_failed(update.errors)
        return self._state(await self.service.update(record.id, update))

    async def delete(self, request: Request) -> Response:
        record = await self._authenticate(request)
        if not await self.service.wipe(record.id, WipeReason.DELETED):
            return _not_found()
        return Response(status_code=204, headers={"Cache-Control": "no-store"})

    # foreground/background count as heard from inside the service (one store write).
    async def foreground(self, request: Request) -> Response:
        record = await self._authenticate(request)
        return self._state(await self.service.foreground(record.id))

    async def background(self, request: Request) -> Response:
        record = await self._authenticate(request)
        return self._state(await self.service.background(record.id))

    async def progress(self, request: Request) -> Response:
        return await self._call_event(request, decline=False)

    async def decline(self, request: Request) -> Response:
        return await self._call_event(request, decline=True)

    async def _call_event(self, request: Request, *, decline: bool) -> Response:
        """Feed the call first (the caller hears it sooner), then count as heard from."""
        record = await self._authenticate(request)
        call_ref = str(request.path_params["call"])
        fed = False
        if self.calls is not None and _CALL_REF_RE.fullmatch(call_ref):
            control = self.calls.decline if decline else self.calls.progress
            fed = control(record.id, call_ref)
        await self.service.touch(record.id)
        if not fed:
            return problem_response(problems.NOT_FOUND, "No such ringing call.")
        return Response(status_code=204, headers={"Cache-Control": "no-store"})

    async def calls_list(self, request: Request) -> Response:
        """``GET …/calls``: recent calls with their outcome (counts as heard from)."""
        record = await self._authenticate(request)
        records = await self.calls.call_records(record.id) if self.calls is not None else []
        await self.service.touch(record.id)
        return _json({"calls": [call_record_body(r) for r in records]})

    async def instance(self, request: Request) -> Response:
        handlers = {"GET": self.get, "HEAD": self.get, "PATCH": self.patch, "DELETE": self.delete}
        return await handlers[request.method](request)

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self.ready():
            return _json({"status": "ready"})
        return problem_response(
            problems.NOT_READY, "Starting or stopping: the store or SIP sockets are not ready."
        )

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


class RequestMetrics(Protocol):
    """Where answered requests are counted (``sipis.metrics.Metrics`` fits)."""

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None: ...


#: The ``route`` of a request that matched no route (a bounded label, unlike its path).
UNMATCHED_ROUTE: Final = "unmatched"


class _RequestMetricsMiddleware:
    """Counts every HTTP request by route *template* (``/v1/instances/{id}``, never the id)
    and status. Sits inside Starlette's ServerErrorMiddleware, so an escaping exception is
    counted as the 500 that middleware answers."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.monotonic()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router stores the matched (or, for a 405, the partly matched) route here.
            route = getattr(scope.get("route"), "path", None)
            self.metrics.http_request(route if isinstance(route, str) else UNMATCHED_ROUTE,
                                      str(scope.get("method", "")), status,
                                      time.monotonic() - started)


def instrument_app(app: Starlette, metrics: RequestMetrics) -> None:
    """Count the app's requests in ``metrics``; before the app serves its first request."""
    app.add_middleware(_RequestMetricsMiddleware, metrics=metrics)


def build_app(
    *,
    service: InstanceServiceAPI,
    config: ApiSettings,
    ready: Callable[[], bool],
    expires: ExpiresPolicy | None = None,
    clock: Callable[[], float] = trio.current_time,
    calls: CallControl | None = None,
    metrics: RequestMetrics | None = None,
) -> Starlette:
    """The HTTPS API app.

    Args:
        service: the instance service every endpoint delegates to.
        config: ``sipis.config.ApiConfig`` (allow-lists, body limit, create rate and timeout).
        ready: answers /readyz (store open, SIP sockets bound).
        expires: REGISTER expiry bounds for ``sip.expires`` (config ``registrar.*``);
            the documented defaults (600 within 60..7200) when None.
        clock: the rate limiter's clock (seconds, monotonic).
        calls: the call layer behind …/calls/{call}/progress and …/decline; when None those
            answer 404 (no call is known).
        metrics: counts requests by route template and status (``instrument_app``).
    """
    api = _Api(
        service=service,
        config=config,
        ready=ready,
        expires=expires or ExpiresPolicy(),
        limiter=TokenBucketLimiter(
            per_minute=config.create_rate.per_minute,
            burst=config.create_rate.burst,
            clock=clock,
        ),
        calls=calls,
    )
    routes = [
        Route(INSTANCES_PATH, _guarded(api.create), methods=["POST"]),
        Route(
            INSTANCES_PATH + "/{id}",
            _guarded(api.instance),
            methods=["GET", "PATCH", "DELETE"],
        ),
        Route(
            INSTANCES_PATH + "/{id}/foreground",
            _guarded(api.foreground),
            methods=["POST"],
        ),
        Route(
            INSTANCES_PATH + "/{id}/background",
            _guarded(api.background),
            methods=["POST"],
        ),
        Route(
            INSTANCES_PATH + "/{id}/calls",
            _guarded(api.calls_list),
            methods=["GET"],
        ),
        Route(
            INSTANCES_PATH + "/{id}/calls/{call}/progress",
            _guarded(api.progress),
            methods=["POST"],
        ),
        Route(
            INSTANCES_PATH + "/{id}/calls/{call}/decline",
            _guarded(api.decline),
            methods=["POST"],
        ),
        Route("/healthz", _guarded(api.healthz), methods=["GET"]),
        Route("/readyz", _guarded(api.readyz), methods=["GET"]),
        Route("/v1/openapi.json", _guarded(api.openapi), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_exception, Exception: _server_error},
    )
    app.router.redirect_slashes = False
    app.state.api = api  # ApiServer.reconfigure (SIGHUP) swaps its settings
    if metrics is not None:
        instrument_app(app, metrics)
    return app
