"""APNs sender: token-authenticated HTTP/2 pushes to Apple (or a gateway speaking its protocol).

Strategy:

- Pure parts first. :func:`build_request` turns a ``PushRequest`` into the path, ``apns-*``
  headers and JSON body; :func:`parse_response` turns Apple's answer into a ``PushResult`` or
  one of the ``sipis.push.base`` errors. Neither does I/O, so the whole mapping is tested with
  plain synchronous tests.
- :class:`ApnsTokenProvider` signs the ES256 provider token (JWT) and keeps it for
  ``refresh_after`` (40 min): Apple refuses tokens older than 60 min and tokens renewed more
  often than every 20 min, so the middle of that window is the safe place.
- :class:`ApnsClient` is a thin HTTP/2 client of our own over trio TLS: the HTTP/2 state is
  ``sipis.push.http2`` (sans-IO, client requests only). httpx cost about 1.9 ms of CPU per
  push where the target is aioapns' ~0.6 ms, and h2's general state machine was then the
  largest part of ours: a client that only ever POSTs small bodies to one host needs little
  of either. One connection per endpoint (``max_connections``) carries as many concurrent
  streams as the server's ``SETTINGS_MAX_CONCURRENT_STREAMS`` allows.
- Each connection runs three tasks: a reader (all HTTP/2 events), a writer (the only task
  that writes to the socket, so a push cancelled by its caller can never break the
  connection in the middle of a write), and a pinger that drops a connection that stopped
  answering PINGs, so that a call is not pushed into a dead socket.
- A GOAWAY stops new streams; the streams the server still finishes are read to their end
  (RFC 9113 §6.8), and streams above ``last_stream_id`` are known not to have been processed.

Was a push possibly delivered? (a call must never ring twice because we sent it twice):

- not sent at all, its END_STREAM never handed to the socket, refused with REFUSED_STREAM, or
  above a GOAWAY's ``last_stream_id``: **not** processed → sent once more on another
  connection by ``send`` itself, then ``PushRetryable``;
- anything else without an answer (timeout after sending, connection lost, stream reset with
  another code): **maybe** processed → ``PushError``, never resent.

Errors (only ``sipis.push.base`` types leave this module; no trio, HTTP/2 or ssl exception):

    InvalidToken     410, BadDeviceToken, Unregistered; a token that cannot form a path
    PushRetryable    429, 5xx (``retry_after`` from Retry-After); cannot connect; provably
                     unprocessed twice in a row; timed out before the push was sent
    PushAuthError    403 (InvalidProviderToken, ExpiredProviderToken after one refresh, ...)
    PushConfigError  unreadable or unusable key file, bad endpoint URL, bad CA file
    PushError        anything else, with Apple's reason; timeouts and lost connections after
                     the push was sent (it may have been delivered)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hpack import NeverIndexedHeaderTuple

from sipis import randomness
from sipis.logs import redacted_token
from sipis.push import http2
from sipis.push.base import (
    InvalidToken,
    PushAuthError,
    PushConfigError,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
    PushRetryable,
    PushStart,
    PushTarget,
    compact_json,
)

__all__ = [
    "PRODUCTION_URL",
    "SANDBOX_URL",
    "ApnsClient",
    "ApnsSettings",
    "ApnsStatistics",
    "ApnsTokenProvider",
    "build_payload",
    "build_request",
    "collapse_id",
    "make_ssl_context",
    "open_apns_client",
    "parse_response",
]

log = logging.getLogger(__name__)
# hpack logs every header block it decodes at DEBUG (and, were it used to encode, device
# and provider tokens): keep it at INFO whatever the root level is.
logging.getLogger("hpack").setLevel(logging.INFO)

PRODUCTION_URL: Final = "https://api.push.apple.com"
SANDBOX_URL: Final = "https://api.sandbox.push.apple.com"
ENVIRONMENTS: Final = ("production", "sandbox")

# Apple: a provider token older than 60 min is refused, one renewed more often than every
# 20 min gets TooManyProviderTokenUpdates. 40 min sits well inside that window.
TOKEN_REFRESH_AFTER: Final = 40 * 60.0

MAX_COLLAPSE_ID_BYTES: Final = 64
MAX_VOIP_PAYLOAD: Final = 5120
MAX_ALERT_PAYLOAD: Final = 4096

# apns-priority: 10 = send at once; 5 = when it suits the device's power state.
_PRIORITY: Final[Mapping[PushKind, int]] = {
    PushKind.CALL: 10,
    PushKind.CALL_ENDED: 10,
    PushKind.MESSAGE: 10,
    PushKind.INSTANCE_EXPIRING: 5,  # sent hours ahead; no need to wake the radio
}
# How long Apple keeps an alert for a device that is offline (apns-expiration = now + ttl).
# VoIP pushes use 0 ("now or never"): a call rung an hour late is worse than none.
_ALERT_TTL: Final[Mapping[PushKind, int]] = {
    PushKind.CALL_ENDED: 3600,  # a missed-call note is still useful for a while
    PushKind.MESSAGE: 86400,
    PushKind.INSTANCE_EXPIRING: 3600,  # sent 12 h and 1 h before: the next one follows
}
# Device tokens become part of the request path: only URL-unreserved characters.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~-]{1,512}")
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,200}")  # bundle ids: reverse DNS
_VISIBLE_ASCII_RE: Final = re.compile(r"[\x21-\x7e]+")

_INVALID_TOKEN_REASONS: Final = frozenset({"BadDeviceToken", "Unregistered"})
_EXPIRED_TOKEN: Final = "ExpiredProviderToken"  # noqa: S105 (a reason, not a secret)

_READ_SIZE: Final = 65536
_MAX_RESPONSE_BODY: Final = 65536  # Apple's error bodies are a few dozen bytes
#: A write within this long of the previous direct one waits for the writer task and goes
#: out with whatever else is queued by then (a burst); a quieter one is sent at once.
_COALESCE_AFTER: Final = 0.0005
_CLOSE_TIMEOUT: Final = 1.0
#: The deadline loop scans at most once per this share of ``request_timeout``: a push times
#: out at most that much late.
_DEADLINE_SLACK: Final = 0.125  # bounded, shielded goodbye (GOAWAY + TLS close) per connection


# --- settings --------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class ApnsSettings:
    """What the APNs client needs from the configuration (``push.apns``).

    ``production_url``/``sandbox_url`` are ``https://host[:port]``; a push goes to the one
    named by its target's ``environment`` (``default_environment`` when it has none).
    ``ca_file`` replaces the system trust store (for gateways and tests).
    ``request_timeout`` bounds one attempt (and a PING's answer), to within an eighth of
    itself (one timer per connection, not one per push); ``ping_interval`` 0 disables the
    connection health PINGs.
    """

    team_id: str
    key_id: str
    key_file: Path
    production_url: str = PRODUCTION_URL
    sandbox_url: str = SANDBOX_URL
    default_environment: str = "production"
    ca_file: Path | None = None
    connect_timeout: float = 10.0
    request_timeout: float = 10.0
    max_connections: int = 1
    max_concurrent_streams: int = 1000  # our own cap, below the server's if that is higher
    token_refresh: float = TOKEN_REFRESH_AFTER
    ping_interval: float = 60.0


@attrs.frozen
class ApnsStatistics:
    """Counters since start (STYLE.md item 7); read by metrics and ``/status``."""

    connections: int  # open now
    streams: int  # pushes in flight now
    connects: int  # connections opened
    accepted: int  # pushes Apple accepted
    failed: int  # pushes that ended in a PushError of any kind
    resent: int  # pushes sent again after a provably unprocessed attempt
    token_refreshes: int  # provider tokens signed


# --- pure builders ---------------------------------------------------------------------------

def collapse_id(value: str) -> str:
    """``value`` as an ``apns-collapse-id``: at most 64 bytes of visible ASCII.

    Longer ids (or ids with other characters, which could break the header) are replaced by
    their SHA-256 in hex (64 bytes), so that distinct ids stay distinct, where cutting them
    short could merge two of them.
    """
    if len(value) <= MAX_COLLAPSE_ID_BYTES and _VISIBLE_ASCII_RE.fullmatch(value):
        return value
    return hashlib.sha256(value.encode()).hexdigest()


def _alert(req: PushRequest) -> dict[str, str]:
    """Plain-English alert text; an app's notification service extension may localise it."""
    caller = req.from_name or req.from_uri or "Unknown caller"
    if req.kind is PushKind.CALL_ENDED:
        title = "Answered elsewhere" if req.reason == "answered-elsewhere" else "Missed call"
        return {"title": title, "body": caller}
    if req.kind is PushKind.MESSAGE:
        return {"title": req.from_name or req.from_uri or "New message",
                "body": req.body or "New message"}
    return {"title": "Calls will stop soon",
            "body": "Open the app to keep receiving calls."}


def build_payload(req: PushRequest) -> dict[str, Any]:
    """The JSON payload: the SPEC.md keys in a ``sipis`` object, plus ``aps`` for alerts.

    VoIP pushes carry no ``aps``: PushKit hands the whole payload to the app, which must
    report the call to CallKit itself.
    """
    payload: dict[str, Any] = {"sipis": req.payload()}
    if req.kind is not PushKind.CALL:
        payload["aps"] = {"alert": _alert(req), "mutable-content": 1}
    return payload


def _encode(payload: Mapping[str, Any]) -> bytes:
    return compact_json(payload)


def _fitting_body(req: PushRequest, limit: int) -> bytes:
    """The encoded payload, with a MESSAGE body shortened (with "…") to fit ``limit`` bytes."""
    body = _encode(build_payload(req))
    if len(body) <= limit or not req.body:
        return body
    text = req.body

    def shortened(keep: int) -> bytes:
        return _encode(build_payload(attrs.evolve(req, body=text[:keep] + "…")))

    # Binary search for the longest prefix that fits (characters vary in encoded size).
    low, high = 0, len(text) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if len(shortened(middle)) <= limit:
            low = middle
        else:
            high = middle - 1
    return shortened(low)


def build_request(req: PushRequest, *, now: float, topic_bundle: str | None = None,
                  apns_id: str | None = None) -> tuple[str, dict[str, str], bytes]:
    """The HTTP/2 request for ``req``, without the ``authorization`` header.

    Args:
        req: the push.
        now: unix time, for an alert's ``apns-expiration``.
        topic_bundle: the app's bundle id; ``req.target.app`` when None. VoIP pushes go to
            ``{bundle}.voip``, alerts to the bundle itself.
        apns_id: the ``apns-id`` (a UUID) to send, so that a resent push keeps its id.

    Returns:
        ``(path, headers, body)``: ``/3/device/{token}``, the ``apns-*`` headers (lower-case
        names), the UTF-8 JSON body.

    Raises:
        InvalidToken: the token cannot be a device token (``BadDeviceToken``).
        PushError: ``BadTopic`` for a bundle id that cannot be a topic; ``PayloadTooLarge``
            (5120 bytes for VoIP, 4096 for alerts) after shortening a message body.
    """
    token = req.target.token
    if not _TOKEN_RE.fullmatch(token):
        raise InvalidToken("BadDeviceToken")
    bundle = topic_bundle or req.target.app
    if not _TOPIC_RE.fullmatch(bundle):
        raise PushError("BadTopic")
    voip = req.kind is PushKind.CALL
    headers = {
        "apns-push-type": "voip" if voip else "alert",
        "apns-topic": f"{bundle}.voip" if voip else bundle,
        "apns-priority": str(_PRIORITY[req.kind]),
        "apns-expiration": "0" if voip else str(int(now) + _ALERT_TTL[req.kind]),
    }
    if apns_id is not None:
        headers["apns-id"] = apns_id
    if req.collapse_id:
        headers["apns-collapse-id"] = collapse_id(req.collapse_id)
    limit = MAX_VOIP_PAYLOAD if voip else MAX_ALERT_PAYLOAD
    body = _fitting_body(req, limit)
    if len(body) > limit:
        raise PushError("PayloadTooLarge", status=413)
    return f"/3/device/{token}", headers, body


def _retry_after(value: str | None) -> float | None:
    """Delta-seconds from a Retry-After header; None for dates and garbage."""
    if value is None or not value.strip().isdigit():
        return None
    return float(int(value.strip()))


def parse_response(status: int, headers: Mapping[str, str], body: bytes) -> PushResult:
    """Apple's answer as a result, or the error the caller should act on.

    Args:
        status: the ``:status``.
        headers: response headers, lower-case names.
        body: the body: ``{"reason": "...", "timestamp": ...}`` on errors.

    Returns:
        ``PushResult(provider="apns", id=apns-id)`` for 200.

    Raises:
        InvalidToken: 410, or reason BadDeviceToken/Unregistered: wipe the instance.
        PushRetryable: 429 and 5xx, ``retry_after`` from a Retry-After header.
        PushAuthError: 403: our provider token was refused (the client refreshes once on
            ``ExpiredProviderToken`` before this reaches its caller).
        PushError: anything else, with Apple's reason (e.g. BadTopic, PayloadTooLarge).
    """
    if status == 200:
        return PushResult(provider="apns", id=headers.get("apns-id"))
    reason = f"HTTP {status}"
    try:
        decoded = json.loads(body) if body else None
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("reason"), str):
        reason = decoded["reason"][:100]
    if status == 410 or reason in _INVALID_TOKEN_REASONS:
        raise InvalidToken(reason, status=status)
    if status == 429 or 500 <= status <= 599:
        raise PushRetryable(reason, status=status,
                            retry_after=_retry_after(headers.get("retry-after")))
    if status == 403:
        raise PushAuthError(reason, status=status)
    raise PushError(reason, status=status)


# --- provider token --------------------------------------------------------------------------

def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class ApnsTokenProvider:
    """Signs and caches the ES256 provider token (JWT) Apple wants in ``authorization``.

    The token is ``{"alg": "ES256", "kid": key_id}.{"iss": team_id, "iat": now}`` signed with
    the ``.p8`` key (PKCS#8 EC P-256); the signature is JOSE's raw ``r || s``, not DER.
    ``clock`` returns unix seconds (injectable for tests).
    """

    def __init__(self, team_id: str, key_id: str, key_pem: bytes, *,
                 refresh_after: float = TOKEN_REFRESH_AFTER,
                 clock: Callable[[], float] = time.time) -> None:
        if not team_id or not key_id:
            raise PushConfigError("APNs team_id and key_id must not be empty")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            # cryptography's messages never contain the key material.
            raise PushConfigError(f"APNs key is not a usable PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise PushConfigError("APNs key must be an EC P-256 (prime256v1) key")
        self._key = key
        self._header = _b64url(json.dumps({"alg": "ES256", "kid": key_id},
                                          separators=(",", ":")).encode())
        self._team_id = team_id
        self._refresh_after = refresh_after
        self._clock = clock
        self._token: str | None = None
        self._issued_at = 0.0
        self.refreshes = 0

    @property
    def issued_at(self) -> float:
        """Unix time the current token was signed (0 before the first)."""
        return self._issued_at

    def token(self) -> str:
        """The current token, signing a new one when it is ``refresh_after`` old."""
        now = self._clock()
        if self._token is None or now - self._issued_at >= self._refresh_after \
                or now < self._issued_at:  # the wall clock stepped back: do not trust age
            self._token = self._sign(now)
            self._issued_at = now
            self.refreshes += 1
        return self._token

    def invalidate(self, rejected: str) -> None:
        """Apple said ``rejected`` expired: the next :meth:`token` signs a new one.

        A token other than the current one is ignored, so that many streams refused at once
        cause a single refresh (Apple punishes frequent ones).
        """
        if rejected == self._token:
            self._token = None

    def _sign(self, now: float) -> str:
        claims = _b64url(json.dumps({"iss": self._team_id, "iat": int(now)},
                                    separators=(",", ":")).encode())
        signing_input = self._header + b"." + claims
        der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return (signing_input + b"." + _b64url(signature)).decode()


# --- HTTP/2 connection -----------------------------------------------------------------------

class _ConnectFailed(Exception):
    """The connection could not be set up (nothing was sent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unprocessed(Exception):
    """The server provably did not process the stream: it is safe to send it again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TimedOut(Exception):
    """The attempt's ``request_timeout`` passed (the caller tells sent from not sent)."""


class _Stream:
    """One request's state, shared by the requesting task and the reader."""

    __slots__ = ("body", "closed_by_peer", "deadline", "done", "end_offset", "error",
                 "headers", "id", "status")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.done = trio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.error: Exception | None = None
        # Output offset just past our END_STREAM frame; None until it is queued.
        self.end_offset: int | None = None
        self.closed_by_peer = False
        self.deadline = math.inf  # set when its answer is awaited (``answer``)

    def fail(self, error: Exception) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _Exchange:
    """What became of one attempt, readable after a timeout cancelled it."""

    __slots__ = ("stream",)

    def __init__(self) -> None:
        self.stream: _Stream | None = None


# An answer's :status: three digits (RFC 9113 §8.3.2, RFC 9110 §15).
_STATUS_RE = re.compile(r"[1-9][0-9][0-9]")


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _describe(exc: BaseException) -> str:
    """A short, secret-free reason for a transport failure."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({cause.verify_message})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS error ({cause.reason or type(cause).__name__})"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(cause).__name__


@attrs.frozen
class _Endpoint:
    url: str
    host: str
    port: int
    authority: bytes

    @classmethod
    def parse(cls, url: str, setting: str) -> _Endpoint:
        try:
            parts = urlsplit(url)
            port = parts.port or 443
        except ValueError:
            raise PushConfigError(f"APNs {setting} is not a URL") from None
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.username:
            raise PushConfigError(f"APNs {setting} must be https://host[:port]")
        return cls(url=url, host=parts.hostname, port=port, authority=parts.netloc.encode())


class _TlsStream:
    """TLS over a trio TCP socket (``ssl.SSLObject`` on memory BIOs) whose sends need no task.

    ``send_nowait`` encrypts at once, in the caller's task, and hands the socket what it
    takes now; the rest waits for ``flush`` (the connection's writer). With trio's
    ``SSLStream`` a push reached the socket two scheduler passes after it was encoded (the
    writer task's wake-up, then the stream's send lock), each one the length of every other
    ready task's turn under load. Records stay whole: a send never yields half-way.
    Renegotiation (TLS 1.2) is refused: it would need reads in the middle of a send.
    """

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext,
                 server_hostname: str) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=False,
                                     server_hostname=server_hostname)
        self._pending = bytearray()  # ciphertext the socket has not taken yet
        self._broken: BaseException | None = None

    @property
    def pending(self) -> int:
        """Bytes encrypted and not yet taken by the socket."""
        return len(self._pending)

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    async def do_handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._queue_outgoing()
                await self.flush()
                await self._receive_into_bio()
                continue
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError("TLS handshake failed") from exc
            self._queue_outgoing()
            await self.flush()
            return

    def send_nowait(self, data: bytes) -> bool:
        """Encrypt ``data`` and send what the socket takes now; True if nothing waits.

        Raises:
            trio.BrokenResourceError: the connection is broken (TLS or socket error).
        """
        if self._broken is not None:
            raise trio.BrokenResourceError("TLS stream broken") from self._broken
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:  # SSLWantReadError: the peer wants to renegotiate
            self._broken = exc
            raise trio.BrokenResourceError("TLS write failed") from exc
        self._queue_outgoing()
        return self._send_pending()

    async def flush(self) -> None:
        """Wait until the socket has taken every pending byte."""
        while not self._send_pending():
            await trio.lowlevel.wait_writable(self._sock)

    async def receive_some(self, max_bytes: int) -> bytes:
        """Decrypted bytes (b"" at the end of the stream)."""
        while True:
            try:
                return self._ssl.read(max_bytes)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                self._broken = exc
                raise trio.BrokenResourceError("TLS read failed") from exc
            # What reading produced to send (a TLS 1.3 KeyUpdate answer) goes out first.
            self._queue_outgoing()
            self._send_pending()
            if not await self._receive_into_bio():
                return b""  # the peer closed without close_notify: an end all the same

    async def aclose(self) -> None:
        """Say close_notify (best effort, bounded by the caller) and close the socket."""
        try:
            if self._broken is None:
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                self._queue_outgoing()
                await self.flush()
        finally:
            self.close_now()

    def close_now(self) -> None:
        self._sock.close()

    def _queue_outgoing(self) -> None:
        if self._outgoing.pending:
            self._pending += self._outgoing.read()

    def _send_pending(self) -> bool:
        while self._pending:
            try:
                sent = os.write(self._sock.fileno(), self._pending)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._broken = exc
                raise trio.BrokenResourceError("connection lost") from exc
            del self._pending[:sent]
        return True

    async def _receive_into_bio(self) -> bool:
        try:
            data = await self._sock.recv(_READ_SIZE)
        except OSError as exc:
            self._broken = exc
            raise trio.BrokenResourceError("connection lost") from exc
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True


class _Connection:
    """One HTTP/2 connection to one endpoint; runs in the client's nursery."""

    def __init__(self, endpoint: _Endpoint, ssl_context: ssl.SSLContext, *, conn_id: int,
                 settings: ApnsSettings, on_closed: Callable[[_Connection], None]) -> None:
        self.id = conn_id
        self._endpoint = endpoint
        self._ssl_context = ssl_context
        self._settings = settings
        self._on_closed = on_closed
        self._h2 = http2.Http2ClientConnection()
        self._protocol_error = http2.ErrorCode.NO_ERROR  # the GOAWAY we end with
        self._tls: _TlsStream | None = None
        self._scope: trio.CancelScope | None = None
        self._streams: dict[int, _Stream] = {}
        self._outbox = bytearray()  # HTTP/2 bytes the writer sends next (a burst, coalesced)
        self._last_direct = -math.inf  # when _flush_h2 last sent from its caller's task
        self._queued = 0  # bytes ever queued for the socket
        self._handed = 0  # bytes ever handed to the TLS stream (encrypted, sent or pending)
        self._wake_writer = trio.Event()
        self._slots = trio.lowlevel.ParkingLot()
        self._window = trio.lowlevel.ParkingLot()
        self._ready = trio.Event()
        self._deadline_set = trio.Event()  # woke the idle deadline loop
        self._deadlines_idle = False
        self._ping_ack: trio.Event | None = None
        self._ping_data = b""
        self._goaway_last: int | None = None
        self._close_reason: str | None = None
        self._transport_ok = True

    # -- state for the pool

    @property
    def usable(self) -> bool:
        """Open, set up, and not told to go away: new streams may start here."""
        return self._ready.is_set() and self._close_reason is None and self._goaway_last is None

    @property
    def load(self) -> int:
        return len(self._streams)

    @property
    def has_capacity(self) -> bool:
        return len(self._streams) < self._limit()

    def _limit(self) -> int:
        return min(self._h2.max_concurrent_streams,
                   self._settings.max_concurrent_streams)

    # -- life cycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Connect, start reader/writer/pinger, and end when the connection does.

        Raises ``_ConnectFailed`` (before ``started``) when no HTTP/2 connection came up.
        """
        self._tls = await self._connect()
        started = False
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._deadline_loop)
                self._h2.initiate_connection()
                self._flush_h2()
                with trio.move_on_after(self._settings.connect_timeout):
                    await self._ready.wait()  # the server's SETTINGS: its stream limit
                if self._ready.is_set() and self._close_reason is None:
                    started = True
                    task_status.started()
                    if self._settings.ping_interval > 0:
                        nursery.start_soon(self._ping_loop)
                else:
                    self.close(self._close_reason or "no HTTP/2 SETTINGS from the server")
        except Exception:  # a bug here must end this connection, not the daemon
            log.exception("APNs connection %d to %s failed", self.id, self._endpoint.url)
            self.close("internal error")
        finally:
            if self._close_reason is None:
                self._close_reason = "connection closed"
            self._fail_streams()
            with trio.CancelScope(shield=True):
                await self._shutdown_transport()
            self._on_closed(self)
        if not started:
            raise _ConnectFailed(self._close_reason)

    async def _connect(self) -> _TlsStream:
        ep = self._endpoint
        try:
            with trio.fail_after(self._settings.connect_timeout):
                tcp = await trio.open_tcp_stream(ep.host, ep.port)
                tls = _TlsStream(tcp.socket, self._ssl_context, ep.host)
                try:
                    await tls.do_handshake()
                except BaseException:
                    tls.close_now()
                    raise
        except trio.TooSlowError:
            raise _ConnectFailed("connect timeout") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise _ConnectFailed(_describe(exc)) from None
        if tls.selected_alpn_protocol() != "h2":
            tls.close_now()
            raise _ConnectFailed("server did not offer HTTP/2 (ALPN h2)")
        return tls

    def close(self, reason: str) -> None:
        """End the connection (open streams fail as described in the module docstring)."""
        if self._close_reason is None:
            self._close_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    def _fail_streams(self) -> None:
        reason = self._close_reason or "connection closed"
        for stream in self._streams.values():
            if stream.done.is_set():
                continue
            if self._may_be_processed(stream):
                stream.fail(PushError(f"APNs connection lost after sending ({reason})"))
            else:
                stream.fail(_Unprocessed(reason))
        self._slots.unpark_all()
        self._window.unpark_all()

    def _may_be_processed(self, stream: _Stream) -> bool:
        if self._goaway_last is not None and stream.id > self._goaway_last:
            return False
        return stream.end_offset is not None and stream.end_offset <= self._handed

    async def _shutdown_transport(self) -> None:
        tls = self._tls
        if tls is None:
            return
        with trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                if self._transport_ok:
                    self._h2.close_connection(self._protocol_error)
                    tls.send_nowait(self._h2.data_to_send())
                await tls.aclose()
            except (trio.BrokenResourceError, OSError):
                pass
        tls.close_now()

    # -- tasks

    async def _read_loop(self) -> None:
        assert self._tls is not None
        try:
            while True:
                data = bytes(await self._tls.receive_some(_READ_SIZE))
                if not data:
                    self._transport_ok = False
                    self.close("closed by the server")
                    return
                self._receive(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._transport_ok = False
            self.close(f"connection lost ({_describe(exc)})")
        except http2.Http2ProtocolError as exc:
            self._protocol_error = exc.error_code
            self.close(f"HTTP/2 protocol error ({exc})")

    async def _write_loop(self) -> None:
        """Send what ``_flush_h2`` queued, and what the socket could not take at once."""
        assert self._tls is not None
        try:
            while True:
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                if self._outbox:
                    data = bytes(self._outbox)
                    self._outbox.clear()
                    self._hand(data)
                await self._tls.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._transport_ok = False
            self.close(f"connection lost ({_describe(exc)})")

    async def _ping_loop(self) -> None:
        while True:
            await trio.sleep(self._settings.ping_interval)
            self._ping_data = os.urandom(8)
            ack = self._ping_ack = trio.Event()
            try:
                self._h2.ping(self._ping_data)
            except http2.Http2StateError:
                self.close("HTTP/2 state does not allow PING")
                return
            self._flush_h2()
            with trio.move_on_after(self._settings.request_timeout):
                await ack.wait()
            if not ack.is_set():
                log.info("APNs connection %d: no PING answer, closing", self.id)
                self.close("no answer to PING")
                return

    def _time(self, stream: _Stream, deadline: float) -> None:
        stream.deadline = deadline
        if self._deadlines_idle:
            self._deadlines_idle = False
            self._deadline_set.set()

    async def _deadline_loop(self) -> None:
        """Fail the streams whose attempt ran out of time.

        One timer per connection, not a cancel scope per push (a scope cost ~8 µs on enter
        and exit, 5–7 % of a push). It wakes at the nearest deadline, but no sooner than
        ``_DEADLINE_SLACK`` of the timeout after its last scan, so a push that times out
        does so up to that much late; streams answered meanwhile are gone from
        ``_streams`` and cost nothing. With nothing to time, it sleeps until ``answer``.
        """
        slack = self._settings.request_timeout * _DEADLINE_SLACK
        while True:
            now = trio.current_time()
            nearest = math.inf
            expired = False
            for stream in self._streams.values():
                if stream.deadline <= now:
                    if not stream.done.is_set():
                        stream.fail(_TimedOut())
                        expired = True
                elif stream.deadline < nearest:
                    nearest = stream.deadline
            if expired:
                self._window.unpark_all()  # a body waiting for window gives up too
            if nearest == math.inf:
                self._deadlines_idle = True
                await self._deadline_set.wait()
                self._deadline_set = trio.Event()
            else:
                await trio.sleep_until(max(nearest, now + slack))

    # -- inbound

    def _receive(self, data: bytes) -> None:
        for event in self._h2.receive_data(data):
            self._on_event(event)
        self._flush_h2()
        self._maybe_finish_goaway()

    def _on_event(self, event: http2.Event) -> None:
        if isinstance(event, http2.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                # Checked here: h2, used before, never checked :status, and int() took it
                # as it came.
                for name, value in event.headers:
                    key = _text(name)
                    if key == ":status":
                        if stream.status or _STATUS_RE.fullmatch(_text(value)) is None:
                            stream.fail(PushError(
                                f"APNs answer with an invalid :status {bytes(value[:16])!r}"))
                            break
                        stream.status = int(value)
                    else:
                        stream.headers[key] = _text(value)
        elif isinstance(event, http2.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None and event.data \
                    and len(stream.body) + len(event.data) <= _MAX_RESPONSE_BODY:
                stream.body += event.data
        elif isinstance(event, http2.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.closed_by_peer = True
                if stream.status == 0:
                    stream.fail(PushError("APNs answer without :status"))
                stream.done.set()
        elif isinstance(event, http2.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.closed_by_peer = True
                if event.by_peer and event.error_code == http2.ErrorCode.REFUSED_STREAM:
                    stream.fail(_Unprocessed("stream refused by the server"))
                elif event.by_peer:
                    stream.fail(PushError(
                        f"APNs reset the stream ({http2.error_name(event.error_code)})"))
                else:
                    stream.fail(PushError(f"APNs broke HTTP/2 on the stream "
                                          f"({http2.error_name(event.error_code)})"))
        elif isinstance(event, http2.WindowUpdated):
            self._window.unpark_all()
        elif isinstance(event, http2.GoAwayReceived):
            self._on_goaway(event)
        elif isinstance(event, http2.ConnectionSettingsChanged):
            self._ready.set()
            self._slots.unpark_all()
            self._window.unpark_all()
        elif isinstance(event, http2.PingAckReceived) and self._ping_ack is not None \
                and event.data == self._ping_data:
            self._ping_ack.set()

    def _on_goaway(self, goaway: http2.GoAwayReceived) -> None:
        last = goaway.last_stream_id
        if self._goaway_last is None or last < self._goaway_last:
            self._goaway_last = last
        log.info("APNs connection %d: GOAWAY last_stream_id=%d error=%d %s", self.id, last,
                 goaway.error_code, goaway.debug[:200].decode("utf-8", "replace"))
        for stream in self._streams.values():
            if stream.id > last:
                stream.fail(_Unprocessed("GOAWAY before the server processed it"))
        self._slots.unpark_all()
        self._window.unpark_all()

    def _maybe_finish_goaway(self) -> None:
        if self._goaway_last is not None and self._close_reason is None \
                and all(s.done.is_set() for s in self._streams.values()):
            self.close("GOAWAY")

    # -- outbound

    def _flush_h2(self) -> None:
        """Send what the HTTP/2 state has queued: from the caller's task when the connection
        was quiet (a push is on the wire before the call's task moves on), else through the
        writer task, which sends everything queued meanwhile as one write (a burst of pushes then
        costs one TLS record and one syscall, not one each)."""
        data = self._h2.data_to_send()
        if not data:
            return
        self._queued += len(data)
        now = trio.current_time()
        if self._outbox or now - self._last_direct < _COALESCE_AFTER:
            self._outbox += data
            self._wake_writer.set()
            return
        self._last_direct = now
        self._hand(data)

    def _hand(self, data: bytes) -> None:
        tls = self._tls
        if tls is None or not self._transport_ok:
            return  # dying: what is left is failed by _fail_streams
        self._handed += len(data)
        try:
            if not tls.send_nowait(data):
                self._wake_writer.set()  # the socket is full: the writer waits for room
        except trio.BrokenResourceError as exc:
            self._transport_ok = False
            self.close(f"connection lost ({_describe(exc)})")

    async def exchange(self, ex: _Exchange, headers: list[tuple[bytes, bytes]],
                       body: bytes, deadline: float) -> None:
        """Send one request and wait for its answer (in ``ex.stream``) until ``deadline``.

        Raises ``_Unprocessed`` or ``PushError`` as the module docstring lays out, and
        ``_TimedOut`` at the deadline.
        """
        while True:
            if not self.usable:
                raise _Unprocessed(self._close_reason or "connection going away")
            if self.has_capacity:
                break
            with trio.move_on_at(deadline):  # a scope only when waiting for a slot
                await self._slots.park()
            if trio.current_time() >= deadline:
                raise _TimedOut
        # Woken for a slot just as our caller's deadline passed? Then do not send at all.
        await trio.lowlevel.checkpoint_if_cancelled()
        stream = self._open_stream(ex, headers, body)
        self._time(stream, deadline)  # a body waiting for window gives up at it too
        try:
            if body:  # HEADERS leave with the first DATA: one TLS record, one write
                await self._send_body(stream, body)
            else:
                self._flush_h2()
                stream.end_offset = self._queued
        except BaseException:
            self._release(stream)
            raise
        await self.answer(ex, deadline)

    def start_now(self, ex: _Exchange, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Put a whole request on its way from the caller, without waiting for anything:
        True if it went (then ``answer(ex)`` must follow), False if the connection could not
        take it at once (nothing was sent). A call's push then leaves before its task yields.

        Raises ``_Unprocessed`` as ``exchange`` does.
        """
        h2 = self._h2
        if not (self.usable and self.has_capacity) or len(body) > min(
                h2.outbound_window, h2.max_outbound_frame_size, h2.initial_window_size):
            return False
        stream = self._open_stream(ex, headers, body)
        if body:
            h2.send_data(stream.id, body, end_stream=True)  # fits: checked above
        self._flush_h2()
        stream.end_offset = self._queued
        return True

    def _open_stream(self, ex: _Exchange, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> _Stream:
        try:
            stream_id = self._h2.send_headers(headers, end_stream=not body)
        except http2.Http2StateError as exc:  # nothing of this request left us
            self.close(f"HTTP/2 state error ({exc})")
            raise _Unprocessed("HTTP/2 state error") from None
        stream = ex.stream = self._streams[stream_id] = _Stream(stream_id)
        return stream

    async def answer(self, ex: _Exchange, deadline: float) -> None:
        """Wait for the answer to the request sent on ``ex.stream`` until ``deadline``
        (``_TimedOut``); the stream is released however this ends (cancelled included)."""
        stream = ex.stream
        assert stream is not None
        self._time(stream, deadline)
        try:
            await stream.done.wait()
        finally:
            self._release(stream)
        if stream.error is not None:
            raise stream.error

    def abandon(self, ex: _Exchange) -> None:
        """Give up a request sent by ``start_now`` whose answer nobody will wait for."""
        if ex.stream is not None and ex.stream.id in self._streams:
            self._release(ex.stream)

    async def _send_body(self, stream: _Stream, body: bytes) -> None:
        """DATA frames within the peer's flow-control windows; END_STREAM on the last one."""
        offset = 0
        while not stream.done.is_set():
            try:
                window = self._h2.stream_window(stream.id)
                if window <= 0:
                    self._flush_h2()  # what is queued (our HEADERS) goes while we wait
                    await self._window.park()
                    continue
                chunk = body[offset:offset + window]
                offset += len(chunk)
                end = offset >= len(body)
                self._h2.send_data(stream.id, chunk, end_stream=end)
            except http2.Http2StateError:
                # Our END_STREAM never left: the server cannot have acted on the request.
                stream.fail(_Unprocessed("stream closed before the request was complete"))
                return
            self._flush_h2()
            if end:
                stream.end_offset = self._queued
                return

    def _release(self, stream: _Stream) -> None:
        """Forget a finished or abandoned stream; reset it if it is still open."""
        del self._streams[stream.id]
        if self._close_reason is None and not (stream.closed_by_peer
                                               and stream.end_offset is not None):
            self._h2.reset_stream(stream.id, http2.ErrorCode.CANCEL)  # no-op once closed
            self._flush_h2()
        self._slots.unpark()
        self._maybe_finish_goaway()


@attrs.define
class _Pool:
    """The connections to one endpoint."""

    conns: list[_Connection] = attrs.Factory(list)
    lock: trio.Lock = attrs.Factory(trio.Lock)
    generation: int = 0
    last_error: str | None = None

    def pick(self, max_connections: int) -> _Connection | None:
        usable = [c for c in self.conns if c.usable]
        if not usable:
            return None
        best = min(usable, key=lambda c: c.load)
        if best.has_capacity or len(usable) >= max_connections:
            return best
        return None

    def remove(self, conn: _Connection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)


# --- the client ------------------------------------------------------------------------------

def _read_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PushConfigError(f"cannot read APNs key file {path}: {exc.strerror}") from None


def make_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """TLS client context for APNs: ``ca_file`` alone if given, else the system trust."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise PushConfigError(f"cannot load APNs CA file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


@attrs.frozen
class _Prepared:
    """A push's request, built once: a resent or re-authorised try sends the same one
    (same apns-id)."""

    endpoint: _Endpoint
    head: list[tuple[bytes, bytes]]
    tail: list[tuple[bytes, bytes]]
    body: bytes

    def headers(self, jwt: str) -> list[tuple[bytes, bytes]]:
        return [*self.head, (b"authorization", b"bearer " + jwt.encode()), *self.tail]


class _Started(PushStart):
    """A push ``ApnsClient.start`` put on the wire; ``send`` waits for its answer."""

    __slots__ = ("conn", "ex", "jwt", "prepared")

    def __init__(self, prepared: _Prepared, conn: _Connection, ex: _Exchange,
                 jwt: str) -> None:
        self.prepared = prepared
        self.conn = conn
        self.ex = ex
        self.jwt = jwt

    def abandon(self) -> None:
        self.conn.abandon(self.ex)


class ApnsClient:
    """Sends pushes to APNs over long-lived HTTP/2 connections (implements ``PushClient``).

    Run it as a service: ``await nursery.start(client.run)``; then ``send`` from any task.
    ``aclose`` ends it (or cancelling ``run``).

    ``send`` itself resends a push at most: once with a fresh provider token after
    ``ExpiredProviderToken``, and once on another connection when the server provably did not
    process it. Timed retries on 429/5xx are the caller's (``PushRetryable``).
    """

    def __init__(self, settings: ApnsSettings, *, clock: Callable[[], float] = time.time,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """Read the key and check the endpoints.

        Raises:
            PushConfigError: the key file cannot be read or is no EC P-256 key, an endpoint
                URL is not ``https://host[:port]``, the CA file cannot be loaded, or
                ``default_environment`` is unknown.
        """
        if settings.default_environment not in ENVIRONMENTS:
            raise PushConfigError("APNs default_environment must be production or sandbox")
        self._settings = settings
        self._clock = clock
        self._tokens = ApnsTokenProvider(settings.team_id, settings.key_id,
                                         _read_key(settings.key_file),
                                         refresh_after=settings.token_refresh, clock=clock)
        self._ssl_context = ssl_context or make_ssl_context(settings.ca_file)
        self._endpoints = {
            "production": _Endpoint.parse(settings.production_url, "production_url"),
            "sandbox": _Endpoint.parse(settings.sandbox_url, "sandbox_url"),
        }
        self._pools: dict[str, _Pool] = {}
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._closed = False
        self._connects = 0
        self._accepted = 0
        self._failed = 0
        self._resent = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Hold the connections' tasks until :meth:`aclose` or cancellation."""
        if self._nursery is not None or self._closed:
            raise RuntimeError("ApnsClient.run() can only run once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closed = True
            self._stopped.set()

    async def aclose(self) -> None:
        """Close every connection (GOAWAY, bounded) and stop :meth:`run`."""
        self._closed = True
        for pool in self._pools.values():
            for conn in list(pool.conns):
                conn.close("client closed")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._stopped.wait()

    def statistics(self) -> ApnsStatistics:
        conns = [c for pool in self._pools.values() for c in pool.conns]
        return ApnsStatistics(connections=len(conns), streams=sum(c.load for c in conns),
                              connects=self._connects, accepted=self._accepted,
                              failed=self._failed, resent=self._resent,
                              token_refreshes=self._tokens.refreshes)

    def _endpoint_for(self, target: PushTarget) -> _Endpoint:
        if target.provider != "apns":
            raise PushConfigError(f"not an APNs target (provider {target.provider!r})")
        environment = target.environment or self._settings.default_environment
        if environment == "development":
            environment = "sandbox"
        endpoint = self._endpoints.get(environment)
        if endpoint is None:
            raise PushError(f"unknown APNs environment {environment[:20]!r}")
        return endpoint

    def start(self, request: PushRequest) -> PushStart | None:
        """Put the push on the wire now, from the caller's task, if an open connection can
        take it whole; None if not (or if the request is bad: ``send`` says why). Hand the
        result to ``send``, which waits for the answer (retries included)."""
        try:
            prepared = self._prepare(request)
            pool = self._pools.get(prepared.endpoint.url)
            conn = None if pool is None else pool.pick(max(1, self._settings.max_connections))
            if conn is None or self._closed:
                return None
            jwt = self._tokens.token()
        except PushError:
            return None
        ex = _Exchange()
        try:
            if not conn.start_now(ex, prepared.headers(jwt), prepared.body):
                return None
        except _Unprocessed:
            return None
        return _Started(prepared, conn, ex, jwt)

    async def send(self, request: PushRequest, started: PushStart | None = None
                   ) -> PushResult:
        """Send one push (or finish one ``start`` began) and return Apple's acceptance.

        Raises:
            InvalidToken, PushRetryable, PushAuthError, PushConfigError, PushError: see the
                module docstring.
            RuntimeError: :meth:`run` has not been started.
        """
        device = redacted_token(request.target.token)
        try:
            result = await self._send(request, started)
        except PushError as exc:
            self._failed += 1
            log.info("apns push %s failed device=%s instance=%s reason=%s status=%s",
                     request.kind.value, device, request.instance[:8], exc.reason, exc.status)
            raise
        self._accepted += 1
        log.debug("apns push %s accepted device=%s instance=%s apns-id=%s attempts=%d",
                  request.kind.value, device, request.instance[:8], result.id, result.attempts)
        return result

    def _prepare(self, request: PushRequest) -> _Prepared:
        endpoint = self._endpoint_for(request.target)
        path, fields, body = build_request(request, now=self._clock(),
                                           apns_id=randomness.uuid4())
        # The path names one device: indexing it would churn the HPACK table (~40 paths fit
        # in 4 KiB) and evict the entries every push shares, the provider token first.
        head = [(b":method", b"POST"), (b":scheme", b"https"),
                (b":authority", endpoint.authority),
                NeverIndexedHeaderTuple(b":path", path.encode())]
        # apns-id is new for every push: indexing it would only churn the HPACK table.
        tail = [NeverIndexedHeaderTuple(name.encode(), value.encode()) if name == "apns-id"
                else (name.encode(), value.encode()) for name, value in fields.items()]
        return _Prepared(endpoint, head, tail, body)

    async def _send(self, request: PushRequest, started: PushStart | None) -> PushResult:
        first = started if isinstance(started, _Started) else None
        if started is not None and first is None:
            started.abandon()  # not one of ours
        prepared = first.prepared if first is not None else self._prepare(request)
        refreshed = resent = False
        attempts = 0
        while True:
            attempts += 1
            this, first = first, None  # a started push is its first try only
            jwt = this.jwt if this is not None else self._tokens.token()
            try:
                status, response_headers, response_body = await self._attempt(
                    prepared, jwt, this)
            except _Unprocessed as exc:
                if resent:
                    raise PushRetryable(f"not processed by APNs: {exc.reason}") from None
                resent = True
                self._resent += 1
                log.debug("apns push not processed (%s): sending it once more", exc.reason)
                continue
            try:
                result = parse_response(status, response_headers, response_body)
            except PushAuthError as exc:
                if exc.reason == _EXPIRED_TOKEN and not refreshed:
                    refreshed = True
                    self._tokens.invalidate(jwt)
                    continue
                raise
            return attrs.evolve(result, attempts=attempts)

    async def _attempt(self, prepared: _Prepared, jwt: str, started: _Started | None
                       ) -> tuple[int, dict[str, str], bytes]:
        timeout = self._settings.request_timeout
        if started is not None:  # on the wire already: only its answer is awaited
            ex = started.ex
            answered = started.conn.answer(ex, trio.current_time() + timeout)
        else:
            conn = await self._connection(prepared.endpoint)
            ex = _Exchange()
            answered = conn.exchange(ex, prepared.headers(jwt), prepared.body,
                                     trio.current_time() + timeout)
        timed_out = False
        try:
            await answered
        except _TimedOut:
            timed_out = True
        stream = ex.stream
        if timed_out or stream is None:
            if stream is None or stream.end_offset is None:
                # Never complete on the wire: the server cannot have acted on it.
                raise PushRetryable(f"APNs connection busy: not sent within {timeout:g}s")
            raise PushError(f"no answer from APNs within {timeout:g}s (may have been sent)")
        return stream.status, stream.headers, bytes(stream.body)

    async def _connection(self, endpoint: _Endpoint) -> _Connection:
        """A usable connection to ``endpoint``, opening one when needed (one at a time)."""
        if self._closed:
            raise PushError("APNs client closed")
        if self._nursery is None:
            raise RuntimeError("ApnsClient.run() is not running")
        pool = self._pools.setdefault(endpoint.url, _Pool())
        max_connections = max(1, self._settings.max_connections)
        conn = pool.pick(max_connections)
        if conn is not None:
            return conn
        generation = pool.generation
        async with pool.lock:
            conn = pool.pick(max_connections)
            if conn is not None:
                return conn
            if self._closed:
                raise PushError("APNs client closed")
            if pool.generation != generation and pool.last_error is not None:
                # Someone failed to connect while we queued: do not hammer the server.
                raise PushRetryable(f"cannot connect to APNs: {pool.last_error}")
            pool.generation += 1
            self._connects += 1
            conn = _Connection(endpoint, self._ssl_context, conn_id=self._connects,
                               settings=self._settings, on_closed=pool.remove)
            pool.conns.append(conn)
            try:
                await self._nursery.start(conn.run)
            except _ConnectFailed as exc:
                pool.remove(conn)
                pool.last_error = exc.reason
                log.warning("APNs %s: cannot connect: %s", endpoint.url, exc.reason)
                raise PushRetryable(f"cannot connect to APNs: {exc.reason}") from None
            except BaseException:
                pool.remove(conn)
                raise
            pool.last_error = None
            log.info("APNs connection %d to %s open", conn.id, endpoint.url)
            return conn


@asynccontextmanager
async def open_apns_client(settings: ApnsSettings, *, clock: Callable[[], float] = time.time,
                           ssl_context: ssl.SSLContext | None = None
                           ) -> AsyncIterator[ApnsClient]:
    """An ``ApnsClient`` running for the ``async with`` block (tests, benchmarks, scripts).

    Exceptions leaving the block arrive wrapped in an ``ExceptionGroup`` (trio nursery).
    """
    client = ApnsClient(settings, clock=clock, ssl_context=ssl_context)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
