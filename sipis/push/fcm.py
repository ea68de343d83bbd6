"""FCM HTTP v1 sender: service-account OAuth, data messages, provider errors → push errors.

Strategy:

- *Pure builders* (:func:`build_message`, :func:`encode_body`, :func:`classify_error`,
  :func:`parse_retry_after`, :func:`format_duration`) turn a ``PushRequest`` into the v1 JSON body
  and an FCM answer into a ``PushError``; they are tested without a network.
- *OAuth*: :class:`OAuthTokenProvider` signs the RFC 7523 JWT assertion with google-auth's
  signer (CPU only, about a millisecond) and POSTs it to the key's ``token_uri`` with the same
  ``httpx`` client, so a refresh never blocks the trio loop. The access token is cached and
  refreshed ``refresh_margin`` seconds before it expires; while a still-valid token is being
  refreshed, other senders keep using it instead of waiting.
- *No double ring*: a request is retried only when the server provably did not process it.
  httpcore already re-sends, on a new connection, a stream above a GOAWAY's last-stream-id
  (it raises ``ConnectionNotAvailable`` to its pool). Every other transport failure reaches us
  as an ``httpx`` error; a per-request ``trace`` hook records which HTTP/2 stream carried the
  request, and only these are retryable: nothing of the request reached the wire; a GOAWAY
  whose last-stream-id is below our stream (RFC 9113 §6.8); ``RST_STREAM(REFUSED_STREAM)``
  (RFC 9113 §8.7). A dropped connection or a timeout after the request left is "outcome
  unknown": a plain ``PushError``, never retried.

Known limit: httpcore fails *every* in-flight stream as soon as any GOAWAY arrives, even one
(like Google's graceful first GOAWAY, last-stream-id 2^31-1) after which the server would
still have answered. Those pushes end as "outcome unknown" rather than be risked twice.
"""

from __future__ import annotations

import email.utils
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import h2.errors
import h2.events
import h2.exceptions
import httpcore
import httpx
import trio
from google.auth import crypt, jwt

from sipis.push.base import (
    InvalidToken,
    PushAuthError,
    PushConfigError,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
    PushRetryable,
    compact_json,
)

logger = logging.getLogger(__name__)

PROVIDER: Final = "fcm"
DEFAULT_URL: Final = "https://fcm.googleapis.com/v1/projects/{project_id}/messages:send"
FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE: Final = "type.googleapis.com/google.rpc.BadRequest"

# Google accepts assertions valid for at most one hour (RFC 7523 ``exp``).
ASSERTION_LIFETIME: Final = 3600
# Streams a GOAWAY/REFUSED_STREAM proved unprocessed are re-sent at once this many times
# before the caller gets PushRetryable (and its own backoff).
MAX_UNPROCESSED_RESENDS: Final = 2
# Tries of one token fetch when the transport fails (the fetch itself is idempotent).
TOKEN_FETCH_TRIES: Final = 2

_INVALID_TOKEN_CODES = frozenset({"UNREGISTERED"})
_RETRYABLE_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
_AUTH_CODES = frozenset({"THIRD_PARTY_AUTH_ERROR", "SENDER_ID_MISMATCH"})


# --- configuration and key file -----------------------------------------------------------


@attrs.frozen(kw_only=True)
class FcmSettings:
    """Where and how to send (``push.fcm`` in the config).

    Attributes:
        service_account_file: the Google service-account JSON key.
        project_id: Firebase project; None takes the key file's ``project_id``.
        url: send endpoint, ``{project_id}`` is filled in; None is Google's v1 endpoint.
        token_uri: OAuth token endpoint; None takes the key file's ``token_uri``.
        ca_file: CA bundle trusted for both endpoints; None is the system store.
        call_ttl: seconds FCM keeps a ``call`` push for an offline phone (a late ring is wrong).
        ttl: the same for every other kind; None leaves FCM's default (four weeks).
        request_timeout: bound on one HTTP exchange (token fetch or send).
        refresh_margin: refresh the access token this long before it expires.
    """

    service_account_file: Path
    project_id: str | None = None
    url: str | None = None
    token_uri: str | None = None
    ca_file: Path | None = None
    call_ttl: float = 30.0
    ttl: float | None = None
    request_timeout: float = 10.0
    refresh_margin: float = 300.0


@attrs.frozen
class ServiceAccount:
    """The fields of a service-account key file that we use (the key itself hidden)."""

    client_email: str
    private_key: str = attrs.field(repr=False)
    private_key_id: str | None
    token_uri: str
    project_id: str | None


def load_service_account(path: Path) -> ServiceAccount:
    """Read a service-account JSON key.

    Raises:
        PushConfigError: the file is missing, not JSON, or lacks a needed field (the message
            names the file and the field, never the key).
    """
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PushConfigError(f"cannot read FCM service account {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PushConfigError(f"FCM service account {path} is not JSON") from exc
    if not isinstance(info, dict) or info.get("type", "service_account") != "service_account":
        raise PushConfigError(f"FCM service account {path} is not a service_account key")
    fields: dict[str, str | None] = {}
    for name in ("client_email", "private_key", "token_uri"):
        value = info.get(name)
        if not isinstance(value, str) or not value:
            raise PushConfigError(f"FCM service account {path} has no {name}")
        fields[name] = value
    for name in ("private_key_id", "project_id"):
        value = info.get(name)
        fields[name] = value if isinstance(value, str) and value else None
    return ServiceAccount(**fields)  # type: ignore[arg-type]


# --- pure builders ------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """A protobuf ``Duration`` in JSON form: ``30`` → ``"30s"``, ``1.5`` → ``"1.5s"``."""
    if seconds < 0:
        raise ValueError("a ttl cannot be negative")
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def build_message(request: PushRequest, *, call_ttl: float,
                  ttl: float | None = None) -> dict[str, Any]:
    """The v1 ``messages:send`` body for one push.

    Always a *data* message (the app builds its own notification or CallKit-like UI) with
    ``android.priority: high`` so that FCM wakes a dozing phone. A ``call`` gets the short
    ``call_ttl``: a ring delivered after the caller gave up is worse than none.
    """
    android: dict[str, str] = {"priority": "high"}
    kind_ttl = call_ttl if request.kind is PushKind.CALL else ttl
    if kind_ttl is not None:
        android["ttl"] = format_duration(kind_ttl)
    if request.collapse_id:
        android["collapse_key"] = request.collapse_id
    return {"message": {"token": request.target.token, "data": request.payload(),
                        "android": android}}


def encode_body(request: PushRequest, *, call_ttl: float, ttl: float | None = None) -> bytes:
    """:func:`build_message` as compact UTF-8 JSON."""
    message = build_message(request, call_ttl=call_ttl, ttl=ttl)
    return compact_json(message)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date, RFC 9110).

    ``now`` is the wall clock (unix seconds) used for the HTTP-date form. None when absent
    or unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


@attrs.frozen
class FcmErrorBody:
    """What we read from a v1 error body (``google.rpc.Status`` plus ``FcmError``)."""

    status: str | None = None  # e.g. "NOT_FOUND"
    error_code: str | None = None  # FcmError.errorCode, e.g. "UNREGISTERED"
    message: str = ""
    token_field_violation: bool = False  # a BadRequest fieldViolation names message.token


def parse_error_body(body: bytes) -> FcmErrorBody:
    """Read an error body leniently: a gateway may answer HTML or nothing."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return FcmErrorBody()
    if not isinstance(error, dict):
        return FcmErrorBody()
    status = error.get("status") if isinstance(error.get("status"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    error_code: str | None = None
    token_violation = False
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == FCM_ERROR_TYPE and isinstance(detail.get("errorCode"), str):
            error_code = detail["errorCode"]
        elif detail.get("@type") == BAD_REQUEST_TYPE:
            violations = detail.get("fieldViolations")
            for violation in violations if isinstance(violations, list) else ():
                if isinstance(violation, dict) and violation.get("field") == "message.token":
                    token_violation = True
    return FcmErrorBody(status=status, error_code=error_code, message=message or "",
                        token_field_violation=token_violation)


def classify_error(status: int, body: bytes, *, retry_after: float | None = None) -> PushError:
    """Map a non-200 FCM answer onto the push error hierarchy.

    - ``UNREGISTERED`` (404), or ``INVALID_ARGUMENT`` (400) about the registration token:
      :class:`InvalidToken`. A bare 404 is *not* (a wrong URL must not wipe instances).
    - ``QUOTA_EXCEEDED`` (429), ``UNAVAILABLE`` (503), ``INTERNAL`` (500), any 429/5xx:
      :class:`PushRetryable` with ``retry_after``.
    - ``THIRD_PARTY_AUTH_ERROR``, ``SENDER_ID_MISMATCH``, 401, 403: :class:`PushAuthError`.
    - anything else (another ``INVALID_ARGUMENT``: our bug): :class:`PushError`.

    The ``reason`` is the FCM error code or status, never the message text (which could
    quote the token).
    """
    parsed = parse_error_body(body)
    reason = parsed.error_code or parsed.status or f"HTTP {status}"
    if parsed.error_code in _INVALID_TOKEN_CODES:
        return InvalidToken(reason, status=status)
    if status == 400 or parsed.error_code == "INVALID_ARGUMENT":
        if parsed.token_field_violation or "registration token" in parsed.message.lower():
            return InvalidToken("INVALID_ARGUMENT", status=status)
        return PushError(reason, status=status)
    if parsed.error_code in _RETRYABLE_CODES or status == 429 or status >= 500:
        return PushRetryable(reason, status=status, retry_after=retry_after)
    if parsed.error_code in _AUTH_CODES or status in (401, 403):
        return PushAuthError(reason, status=status)
    return PushError(reason, status=status)


# --- unprocessed-stream evidence ----------------------------------------------------------


@attrs.define
class _StreamTrace:
    """httpcore ``trace`` hook: which stream of the current attempt carried our request.

    ``stream_id`` is set once request headers may have left (``None``: nothing of this
    attempt is on the wire); ``restarts`` counts attempts httpcore itself proved unprocessed
    (GOAWAY above last-stream-id → ``ConnectionNotAvailable``) and re-sent.
    """

    sent: bool = False
    stream_id: int | None = None
    restarts: int = 0

    async def __call__(self, name: str, info: Mapping[str, Any]) -> None:
        if name.endswith("send_request_headers.started"):
            self.sent = True
            stream_id = info.get("stream_id")
            self.stream_id = stream_id if isinstance(stream_id, int) else None
        elif name.endswith("send_request_headers.failed") and isinstance(
                info.get("exception"), h2.exceptions.ProtocolError):
            # h2 refused the HEADERS locally (connection already closed): nothing written.
            self.sent, self.stream_id = False, None
        elif name.endswith(".failed") and isinstance(
                info.get("exception"), httpcore.ConnectionNotAvailable):
            self.sent, self.stream_id = False, None
            self.restarts += 1


def _h2_event(exc: BaseException) -> object | None:
    """The h2 event an httpcore protocol error carries (GOAWAY or RST_STREAM), if any.

    Only the explicit ``raise … from`` chain is followed (httpx → httpcore), never an
    implicit ``__context__`` that might belong to another request.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for arg in current.args:
            if isinstance(arg, h2.events.ConnectionTerminated | h2.events.StreamReset):
                return arg
        current = current.__cause__
    return None


def provably_unprocessed(exc: BaseException, trace: _StreamTrace) -> bool:
    """True only when the server cannot have acted on the request (safe to re-send)."""
    if not trace.sent:
        return True
    event = _h2_event(exc)
    if isinstance(event, h2.events.ConnectionTerminated):
        last = event.last_stream_id
        return trace.stream_id is not None and last is not None and trace.stream_id > last
    if isinstance(event, h2.events.StreamReset):
        return (event.stream_id == trace.stream_id
                and event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM)
    return False


# --- OAuth ---------------------------------------------------------------------------------


@attrs.frozen
class _AccessToken:
    value: str = attrs.field(repr=False)
    expires_at: float  # on the provider's clock


class OAuthTokenProvider:
    """Fetches and caches the FCM access token (RFC 7523 JWT-bearer grant).

    Args:
        account: the service account whose key signs the assertion.
        http: the client used for the token endpoint (never closed here).
        token_uri: where to POST the assertion; also the assertion's ``aud``.
        request_timeout: bound on one fetch.
        refresh_margin: refresh this many seconds before expiry.
        clock: monotonic seconds for expiry bookkeeping (``trio.current_time``; tests inject).
    """

    def __init__(self, account: ServiceAccount, *, http: httpx.AsyncClient, token_uri: str,
                 request_timeout: float = 10.0, refresh_margin: float = 300.0,
                 clock: Callable[[], float] = trio.current_time) -> None:
        try:
            # google-auth's crypt/jwt functions carry no annotations.
            self._signer = crypt.RSASigner.from_string(  # type: ignore[no-untyped-call]
                account.private_key, account.private_key_id)
        except ValueError as exc:
            raise PushConfigError("FCM service account private_key is not an RSA key") from exc
        self._account = account
        self._http = http
        self._token_uri = token_uri
        self._timeout = request_timeout
        self._margin = refresh_margin
        self._clock = clock
        self._token: _AccessToken | None = None
        self._lock = trio.Lock()
        self._last_error: PushError | None = None
        self.fetches = 0

    def assertion(self, *, now: float) -> bytes:
        """The signed JWT (RS256) that buys an access token; ``now`` is unix seconds."""
        issued = int(now)
        payload = {"iss": self._account.client_email, "scope": FCM_SCOPE,
                   "aud": self._token_uri, "iat": issued, "exp": issued + ASSERTION_LIFETIME}
        encoded: bytes = jwt.encode(self._signer, payload)  # type: ignore[no-untyped-call]
        return encoded

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the server refused it); the next caller fetches a new one."""
        if self._token is not None and self._token.value == token:
            self._token = None

    async def get_token(self) -> str:
        """A valid access token, fetched only when the cached one is (nearly) expired.

        Raises:
            PushAuthError: the token endpoint refused our assertion.
            PushRetryable: the token endpoint failed or was unreachable.
            PushError: it answered something we cannot read.
        """
        current = self._token
        now = self._clock()
        if current is not None and now < current.expires_at - self._margin:
            return current.value
        if current is not None and now < current.expires_at:
            # Still valid: one task refreshes, the others use it meanwhile.
            if self._lock.locked():
                return current.value
            async with self._lock:
                if self._token is not current:
                    return self._token.value if self._token else await self._fetch()
                try:
                    return await self._fetch()
                except PushError as exc:
                    # The next send in the margin tries again; until expiry this one works.
                    logger.warning("fcm access token refresh failed (%s); using the old one",
                                   exc.reason)
                    return current.value
        seen = self.fetches
        async with self._lock:
            token = self._token
            if token is not None and self._clock() < token.expires_at:
                return token.value
            if self.fetches != seen and self._last_error is not None:
                # The fetch we queued behind just failed: share its verdict rather than
                # make every waiting push sit out another request_timeout in turn.
                raise _same_error(self._last_error)
            return await self._fetch()

    async def _fetch(self) -> str:
        """POST the assertion, remembering a failure for the tasks queued behind; caller
        holds the lock."""
        self.fetches += 1
        try:
            value = await self._fetch_once()
        except PushError as exc:
            self._last_error = exc
            raise
        self._last_error = None
        return value

    async def _fetch_once(self) -> str:
        started = self._clock()
        form = {"grant_type": JWT_BEARER_GRANT,
                "assertion": self.assertion(now=time.time()).decode()}
        response: httpx.Response | None = None
        # Asking for a token has no side effect: a transport failure (a GOAWAY, a stale
        # pooled connection) is retried at once, on a fresh connection.
        for attempt in range(1, TOKEN_FETCH_TRIES + 1):
            try:
                with trio.fail_after(self._timeout):
                    response = await self._http.post(self._token_uri, data=form,
                                                     headers={"accept": "application/json"})
                break
            except trio.TooSlowError as exc:
                raise PushRetryable("oauth token endpoint timed out") from exc
            except httpx.TransportError as exc:
                if attempt == TOKEN_FETCH_TRIES:
                    raise PushRetryable("oauth token endpoint unreachable: "
                                        f"{type(exc).__name__}") from exc
        assert response is not None
        if response.status_code != 200:
            retry_after = parse_retry_after(response.headers.get("retry-after"),
                                            now=time.time())
            raise _token_error(response.status_code, response.content, retry_after)
        try:
            answer = response.json()
            value = answer["access_token"]
            lifetime = float(answer.get("expires_in", ASSERTION_LIFETIME))
        except (ValueError, KeyError, TypeError) as exc:
            raise PushError("oauth token endpoint answered without access_token") from exc
        if not isinstance(value, str) or not value:
            raise PushError("oauth token endpoint answered without access_token")
        self._token = _AccessToken(value, started + lifetime)
        return value


def _same_error(error: PushError) -> PushError:
    """A fresh exception like ``error`` (one instance must not be raised in two tasks)."""
    if isinstance(error, PushRetryable):
        return PushRetryable(error.reason, status=error.status, retry_after=error.retry_after)
    return type(error)(error.reason, status=error.status)


def _token_error(status: int, body: bytes, retry_after: float | None) -> PushError:
    """RFC 6749 §5.2 error answer → push error (``error`` code as the reason)."""
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        code = None
    reason = f"oauth {code}" if isinstance(code, str) else f"oauth HTTP {status}"
    if status == 429 or status >= 500:
        return PushRetryable(reason, status=status, retry_after=retry_after)
    if status in (400, 401, 403):
        return PushAuthError(reason, status=status)
    return PushError(reason, status=status)


# --- the client ----------------------------------------------------------------------------


@attrs.frozen
class FcmStatistics:
    """Counters since start (read by metrics and ``/status``)."""

    accepted: int
    failed: int
    token_fetches: int
    auth_retries: int  # 401 → new access token → one more try
    unprocessed_resends: int  # streams re-sent because a GOAWAY/REFUSED_STREAM proved them unseen


class FcmClient:
    """Sends pushes through FCM HTTP v1 over one HTTP/2 connection pool (a ``PushClient``).

    Args:
        settings: endpoints, key file, ttls, timeouts.
        clock: monotonic clock for token expiry (tests inject one).
        http: a ready ``httpx.AsyncClient`` (closed by :meth:`aclose`); default builds an
            HTTP/2 client that trusts ``settings.ca_file`` or the system store.

    The key file and CA bundle are read here, once (blocking: build it at start-up).

    Raises:
        PushConfigError: the key file is unusable, names no project, or a URL is not http(s).
    """

    def __init__(self, settings: FcmSettings, *, clock: Callable[[], float] = trio.current_time,
                 http: httpx.AsyncClient | None = None) -> None:
        account = load_service_account(settings.service_account_file)
        project_id = settings.project_id or account.project_id
        if not project_id:
            raise PushConfigError("FCM project_id is neither configured nor in the key file")
        self._settings = settings
        self.project_id = project_id
        self.url = (settings.url or DEFAULT_URL).replace("{project_id}", project_id)
        for name, url in (("url", self.url),
                          ("token_uri", settings.token_uri or account.token_uri)):
            try:
                scheme = httpx.URL(url).scheme
            except httpx.InvalidURL as exc:
                raise PushConfigError(f"FCM {name} is not a URL") from exc
            if scheme not in ("https", "http"):
                raise PushConfigError(f"FCM {name} must be an https URL")
        if http is None:
            context = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None)
            http = httpx.AsyncClient(http2=True, verify=context,
                                     timeout=httpx.Timeout(settings.request_timeout))
        self._http = http
        self.tokens = OAuthTokenProvider(
            account, http=http, token_uri=settings.token_uri or account.token_uri,
            request_timeout=settings.request_timeout, refresh_margin=settings.refresh_margin,
            clock=clock)
        self._accepted = 0
        self._failed = 0
        self._auth_retries = 0
        self._resends = 0

    async def send(self, request: PushRequest) -> PushResult:
        """Send one push; return the FCM message name as ``PushResult.id``.

        A 401 gets one retry with a freshly fetched access token; a stream the server
        provably did not process is re-sent at once (up to ``MAX_UNPROCESSED_RESENDS``).

        Raises:
            InvalidToken: FCM says the registration token is dead.
            PushRetryable: 429/5xx, or the request provably never reached FCM.
            PushAuthError: our credentials are refused.
            PushError: anything else, including "connection lost, outcome unknown".
        """
        if request.target.provider != PROVIDER:
            raise PushConfigError(f"FcmClient cannot send to provider {request.target.provider}")
        body = encode_body(request, call_ttl=self._settings.call_ttl, ttl=self._settings.ttl)
        try:
            return await self._send(body)
        except PushError:
            self._failed += 1
            raise

    async def _send(self, body: bytes) -> PushResult:
        attempts = 0
        auth_retried = False
        resends = 0
        while True:
            attempts += 1
            token = await self.tokens.get_token()
            try:
                response = await self._post(body, token)
            except _Unprocessed as exc:
                if resends >= MAX_UNPROCESSED_RESENDS:
                    raise PushRetryable(exc.reason) from exc
                resends += 1
                self._resends += 1
                continue
            if response.status_code == 200:
                self._accepted += 1
                return PushResult(provider=PROVIDER, id=_message_name(response),
                                  attempts=attempts)
            if response.status_code == 401 and not auth_retried:
                # RFC 6750: the access token expired or was revoked; a 401 is never processed.
                auth_retried = True
                self._auth_retries += 1
                self.tokens.invalidate(token)
                continue
            retry_after = parse_retry_after(response.headers.get("retry-after"),
                                            now=time.time())
            raise classify_error(response.status_code, response.content,
                                 retry_after=retry_after)

    async def _post(self, body: bytes, token: str) -> httpx.Response:
        """One exchange; transport failures become ``_Unprocessed`` or a ``PushError``."""
        trace = _StreamTrace()
        headers = {"authorization": f"Bearer {token}",
                   "content-type": "application/json; charset=UTF-8"}
        try:
            with trio.fail_after(self._settings.request_timeout):
                response = await self._http.post(self.url, content=body, headers=headers,
                                                 extensions={"trace": trace})
        except trio.TooSlowError as exc:
            if trace.sent:
                raise PushError("fcm timed out: outcome unknown, not retried") from exc
            raise PushRetryable("fcm timed out before the request was sent") from exc
        except httpx.HTTPError as exc:
            name = type(exc).__name__
            if provably_unprocessed(exc, trace):
                raise _Unprocessed(f"fcm request not processed ({name})") from exc
            raise PushError(f"fcm connection lost ({name}): outcome unknown, not retried") \
                from exc
        finally:
            self._resends += trace.restarts
        return response

    async def aclose(self) -> None:
        """Close the HTTP/2 connections."""
        await self._http.aclose()

    def statistics(self) -> FcmStatistics:
        return FcmStatistics(accepted=self._accepted, failed=self._failed,
                             token_fetches=self.tokens.fetches,
                             auth_retries=self._auth_retries,
                             unprocessed_resends=self._resends)


class _Unprocessed(PushRetryable):
    """Internal: the request never reached FCM; re-send at once (a few times)."""


def _message_name(response: httpx.Response) -> str | None:
    try:
        name = response.json().get("name")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None
