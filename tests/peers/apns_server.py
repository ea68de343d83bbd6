"""A local APNs for tests: real HTTP/2 over TLS on 127.0.0.1, checking what Apple checks.

Usage (pytest-trio)::

    key = TestKey.generate()
    server = ApnsServer(public_key=key.public_key)
    await nursery.start(server.run)        # or: async with open_apns_server(...) as server
    ... client with production_url=server.url, ca_file=server.write_ca(tmp_path) ...
    assert [p.token for p in server.pushes] == [...]

Each request is checked like Apple does (method, path, provider token signed with the test
key, ``kid``/``iss``/``iat``, topic, push type, priority, expiration, ids, payload size) and,
beyond Apple, against the SPEC.md payload schema. A request that fails a check is answered
with Apple's status and reason and listed in ``rejections``. A request that passes gets the
scripted reply (default 200) and is listed in ``answers``; a 200 also lands in ``pushes``,
at the moment the server decides to deliver it (a delayed answer was still delivered).

Scripting: ``reply_to_token(token, Reply(...))`` (every push to that token),
``reply_next(*replies)`` (the next pushes in arrival order), ``goaway_after(n, connections=1)``
(GOAWAY with ``last_stream_id`` = the n-th stream, answer those, then close), ``delay``
(slow server), ``Reply(reset=ErrorCodes.X)`` (RST_STREAM instead of an answer),
``drop_connections()`` (TCP close, no GOAWAY), ``freeze()``/``thaw()`` (stop reading: a
hung peer), ``stop()`` (the whole server), ``reject_tokens_issued_before(t)``.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
import trustme
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hyperframe.frame import GoAwayFrame

HOST = "127.0.0.1"
TEAM_ID = "TEAM123456"
KEY_ID = "KEY1234567"
BUNDLE = "com.example.phone"
MAX_TOKEN_AGE = 3600.0  # Apple refuses provider tokens older than one hour
PUSH_TYPES = ("call", "call-ended", "message", "instance-expiring")
CALL_ENDED_REASONS = ("cancelled", "answered-elsewhere", "timeout")
SIPIS_KEYS = frozenset({"type", "instance", "call", "from_uri", "from_name", "to_uri",
                        "sip_call_id", "reason", "sent_at", "body"})
MAX_PAYLOAD = {"voip": 5120, "alert": 4096}
_TOKEN_RE = re.compile(r"[0-9a-f]{64,200}")


@dataclass(frozen=True)
class TestKey:
    """An APNs-style ``.p8`` key: PKCS#8 EC P-256 PEM, and its public half."""

    __test__ = False  # not a pytest class

    pem: bytes
    public_key: ec.EllipticCurvePublicKey

    @classmethod
    def generate(cls) -> TestKey:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return cls(pem=pem, public_key=key.public_key())

    def write(self, directory: Path) -> Path:
        path = directory / f"AuthKey_{KEY_ID}.p8"
        path.write_bytes(self.pem)
        return path


@dataclass(frozen=True)
class Reply:
    """How the server answers one push that passed every check."""

    status: int = 200
    reason: str | None = None  # Apple's reason, for the JSON body of an error
    retry_after: int | None = None  # Retry-After header (seconds)
    delay: float | None = None  # None: the server's ``delay``
    reset: h2.errors.ErrorCodes | None = None  # RST_STREAM with this code, no answer


@dataclass(frozen=True)
class RecordedPush:
    """A push the server accepted (answered 200)."""

    connection_id: int
    stream_id: int
    token: str
    headers: Mapping[str, str]  # without authorization
    jwt: str
    payload: Mapping[str, Any]

    @property
    def apns_id(self) -> str:
        return self.headers["apns-id"]

    @property
    def topic(self) -> str:
        return self.headers["apns-topic"]

    @property
    def push_type(self) -> str:
        return self.headers["apns-push-type"]

    @property
    def sipis(self) -> Mapping[str, str]:
        return self.payload["sipis"]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Answer:
    """A request that passed the checks and what it got (any status, or a reset)."""

    connection_id: int
    stream_id: int
    apns_id: str
    jwt: str
    status: int | None  # None: reset
    reason: str | None


@dataclass(frozen=True)
class Rejection:
    """A request that failed a check: Apple's status and reason, and what was wrong."""

    status: int
    reason: str
    detail: str


_CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError,
                      trio.BusyResourceError, h2.exceptions.H2Error, OSError)


class _Check(Exception):
    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.status = status
        self.reason = reason
        self.detail = detail


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class _Request:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    answered: bool = False
    cancelled: bool = False


class _ServerConnection:
    def __init__(self, conn_id: int, tls: trio.SSLStream[trio.SocketStream],
                 max_concurrent_streams: int) -> None:
        self.id = conn_id
        self.tls = tls
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
        })
        self.send_lock = trio.Lock()
        self.requests: dict[int, _Request] = {}
        self.streams_seen = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.goaway_last: int | None = None
        self.accepted = 0
        self.scope = trio.CancelScope()

    async def flush(self, extra: bytes = b"") -> None:
        async with self.send_lock:
            data = self.h2.data_to_send() + extra
            if data:
                await self.tls.send_all(data)

    def pending_below_goaway(self) -> bool:
        assert self.goaway_last is not None
        return any(not r.answered and not r.cancelled
                   for sid, r in self.requests.items() if sid <= self.goaway_last)


class ApnsServer:
    """The local APNs; see the module docstring."""

    def __init__(self, *, public_key: ec.EllipticCurvePublicKey, team_id: str = TEAM_ID,
                 key_id: str = KEY_ID, bundle: str = BUNDLE,
                 max_concurrent_streams: int = 1000, streams_after_first_push: int | None = None,
                 ca: trustme.CA | None = None) -> None:
        """``streams_after_first_push``: like Apple, allow only ``max_concurrent_streams``
        (Apple: 1) until a push on the connection has been accepted, then this many."""
        self.public_key = public_key
        self.team_id = team_id
        self.key_id = key_id
        self.bundle = bundle
        self.max_concurrent_streams = max_concurrent_streams
        self.streams_after_first_push = streams_after_first_push
        self.ca = ca or trustme.CA()
        self._cert = self.ca.issue_cert(HOST, "localhost")
        self.port: int | None = None
        self.delay = 0.0
        self.pushes: list[RecordedPush] = []
        self.answers: list[Answer] = []
        self.rejections: list[Rejection] = []
        self.connections_opened = 0
        self.max_in_flight = 0  # most streams open at once on any one connection
        self._token_replies: dict[str, Reply] = {}
        self._next_replies: collections.deque[Reply] = collections.deque()
        self._goaway_after: int | None = None
        self._goaway_budget: int | None = None
        self._min_iat = 0.0
        self._conns: dict[int, _ServerConnection] = {}
        self._ids = itertools.count(1)
        self._scope: trio.CancelScope | None = None
        self._decided = 0
        self._verified: set[str] = set()
        self._thawed = trio.Event()
        self._thawed.set()
        self._received = trio.Event()

    # -- addresses and trust

    @property
    def url(self) -> str:
        assert self.port is not None, "server not started"
        return f"https://{HOST}:{self.port}"

    def write_ca(self, directory: Path) -> Path:
        """The CA certificate as a PEM file (for ``ca_file``)."""
        path = directory / "apns-test-ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def client_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=None, capath=None, cadata=None)
        context.load_verify_locations(cadata=self.ca.cert_pem.bytes().decode())
        context.set_alpn_protocols(["h2"])
        return context

    # -- scripting

    def reply_to_token(self, token: str, reply: Reply) -> None:
        self._token_replies[token] = reply

    def reply_next(self, *replies: Reply) -> None:
        self._next_replies.extend(replies)

    def goaway_after(self, streams: int, *, connections: int | None = 1) -> None:
        """GOAWAY once a connection has received ``streams`` streams (on ``connections``
        connections; None: on every one)."""
        self._goaway_after = streams
        self._goaway_budget = connections

    def reject_tokens_issued_before(self, unix_time: float) -> None:
        self._min_iat = unix_time

    def freeze(self) -> None:
        """Stop reading from every connection (a hung peer: no answers, no PING acks)."""
        self._thawed = trio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    def drop_connections(self) -> None:
        """Close every connection at once, without GOAWAY (a crash or a cut cable)."""
        for conn in list(self._conns.values()):
            conn.scope.cancel()

    def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._scope is not None:
            self._scope.cancel()

    async def wait_received(self, count: int) -> None:
        """Wait until ``count`` requests have passed the checks (answered or not yet)."""
        while self._decided < count:
            self._received = trio.Event()
            await self._received.wait()

    @property
    def connection_ids(self) -> set[int]:
        return {p.connection_id for p in self.pushes}

    # -- running

    async def run(self, *, task_status: trio.TaskStatus[ApnsServer] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        context.set_alpn_protocols(["h2"])
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(partial(
                    trio.serve_ssl_over_tcp, self._handle, 0, context, host=HOST,
                    https_compatible=True))
                self.port = listeners[0].transport_listener.socket.getsockname()[1]
                task_status.started(self)

    async def _handle(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        conn = _ServerConnection(next(self._ids), tls, self.max_concurrent_streams)
        self._conns[conn.id] = conn
        self.connections_opened += 1
        try:
            with conn.scope:
                await tls.do_handshake()
                conn.h2.initiate_connection()
                await conn.flush()
                async with trio.open_nursery() as nursery:
                    while True:
                        await self._thawed.wait()
                        data = await tls.receive_some(65536)
                        if not data:
                            break
                        for event in conn.h2.receive_data(data):
                            self._on_event(conn, event, nursery)
                        await conn.flush()
                    nursery.cancel_scope.cancel()
        except* _CONNECTION_ERRORS:
            pass  # this connection is over; the others and the server go on
        finally:
            del self._conns[conn.id]
            await trio.aclose_forcefully(tls)

    def _on_event(self, conn: _ServerConnection, event: h2.events.Event,
                  nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = {str(k): str(v) for k, v in event.headers}
            conn.requests[event.stream_id] = _Request(headers)
            conn.streams_seen += 1
            conn.in_flight += 1
            conn.max_in_flight = max(conn.max_in_flight, conn.in_flight)
            self.max_in_flight = max(self.max_in_flight, conn.max_in_flight)
            if conn.goaway_last is None and self._goaway_after is not None \
                    and conn.streams_seen == self._goaway_after \
                    and self._goaway_budget != 0:
                if self._goaway_budget is not None:
                    self._goaway_budget -= 1
                conn.goaway_last = event.stream_id
                nursery.start_soon(self._send_goaway, conn)
        elif isinstance(event, h2.events.DataReceived):
            conn.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            request = conn.requests.get(event.stream_id)
            if request is not None:
                request.body += event.data
        elif isinstance(event, h2.events.StreamEnded):
            request = conn.requests.get(event.stream_id)
            if request is None:
                return
            if conn.goaway_last is not None and event.stream_id > conn.goaway_last:
                conn.in_flight -= 1
                return  # after our GOAWAY: not processed, no answer
            nursery.start_soon(self._answer, conn, event.stream_id, request)
        elif isinstance(event, h2.events.StreamReset):
            request = conn.requests.get(event.stream_id)
            if request is not None and not request.cancelled:
                request.cancelled = True
                conn.in_flight -= 1
        elif isinstance(event, h2.events.ConnectionTerminated):
            conn.scope.cancel()

    async def _send_goaway(self, conn: _ServerConnection) -> None:
        # h2 would refuse to send anything after its own GOAWAY, so this one is written as
        # raw bytes (after whatever h2 had queued) and h2 goes on answering the streams below.
        assert conn.goaway_last is not None
        frame = GoAwayFrame(stream_id=0, last_stream_id=conn.goaway_last, error_code=0,
                            additional_data=b'{"reason":"Shutdown"}')
        await conn.flush(frame.serialize())
        await self._close_after_goaway(conn)

    async def _close_after_goaway(self, conn: _ServerConnection) -> None:
        if conn.goaway_last is None or conn.pending_below_goaway():
            return
        with trio.move_on_after(1):
            conn.h2.close_connection(last_stream_id=conn.goaway_last)
            await conn.flush()
        conn.scope.cancel()

    # -- answering

    async def _answer(self, conn: _ServerConnection, stream_id: int, request: _Request) -> None:
        reply, body = self._decide(conn, stream_id, request)
        delay = reply.delay if reply.delay is not None else self.delay
        if delay:
            await trio.sleep(delay)
        if request.cancelled:
            return
        try:
            if reply.reset is not None:
                conn.h2.reset_stream(stream_id, reply.reset)
            else:
                headers = [(":status", str(reply.status)),
                           ("apns-id", request.headers.get("apns-id", str(uuid.uuid4())))]
                if reply.status == 200:
                    conn.h2.send_headers(stream_id, headers, end_stream=True)
                    conn.accepted += 1
                    if conn.accepted == 1 and self.streams_after_first_push is not None:
                        conn.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                                                 self.streams_after_first_push})
                else:
                    headers.append(("content-type", "application/json"))
                    if reply.retry_after is not None:
                        headers.append(("retry-after", str(reply.retry_after)))
                    conn.h2.send_headers(stream_id, headers)
                    conn.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.StreamClosedError:
            return
        request.answered = True
        conn.in_flight -= 1
        await conn.flush()
        await self._close_after_goaway(conn)

    def _decide(self, conn: _ServerConnection, stream_id: int,
                request: _Request) -> tuple[Reply, bytes]:
        """Check the request; pick and record the reply. Returns it with its JSON body."""
        headers = request.headers
        jwt = headers.get("authorization", "").removeprefix("bearer ")
        try:
            token, payload = self._check(headers, bytes(request.body))
        except _Check as bad:
            self.rejections.append(Rejection(bad.status, bad.reason, bad.detail))
            reply = Reply(bad.status, bad.reason)
        else:
            reply = self._token_replies.get(token) or (
                self._next_replies.popleft() if self._next_replies else Reply())
            apns_id = headers.get("apns-id", "")
            self.answers.append(Answer(conn.id, stream_id, apns_id, jwt,
                                       None if reply.reset is not None else reply.status,
                                       reply.reason))
            if reply.status == 200 and reply.reset is None:
                kept = {k: v for k, v in headers.items()
                        if not k.startswith(":") and k != "authorization"}
                self.pushes.append(RecordedPush(conn.id, stream_id, token, kept, jwt, payload))
            self._decided += 1
            self._received.set()
        error: dict[str, Any] = {"reason": reply.reason or f"HTTP{reply.status}"}
        if reply.status == 410:
            error["timestamp"] = int(time.time() * 1000)
        return reply, json.dumps(error).encode()

    # -- Apple's checks (and the SPEC.md schema)

    def _check(self, headers: Mapping[str, str], body: bytes) -> tuple[str, dict[str, Any]]:
        if headers.get(":method") != "POST":
            raise _Check(405, "MethodNotAllowed", headers.get(":method", ""))
        path = headers.get(":path", "")
        if not path.startswith("/3/device/"):
            raise _Check(404, "BadPath", path)
        token = path.removeprefix("/3/device/")
        if not token:
            raise _Check(400, "MissingDeviceToken")
        self._check_jwt(headers.get("authorization"))
        if not _TOKEN_RE.fullmatch(token):
            raise _Check(400, "BadDeviceToken", "not 64+ lower-case hex digits")
        push_type = headers.get("apns-push-type")
        if push_type not in ("voip", "alert"):
            raise _Check(400, "InvalidPushType", str(push_type))
        topic = headers.get("apns-topic")
        if topic is None:
            raise _Check(400, "MissingTopic")
        expected = self.bundle + ".voip" if push_type == "voip" else self.bundle
        if topic != expected:
            raise _Check(400, "BadTopic", f"{topic} for {push_type}, expected {expected}")
        priority = headers.get("apns-priority")
        if priority not in (("10",) if push_type == "voip" else ("10", "5")):
            raise _Check(400, "BadPriority", str(priority))
        expiration = headers.get("apns-expiration", "")
        if not expiration.isdigit() or (push_type == "voip" and expiration != "0"):
            raise _Check(400, "BadExpirationDate", expiration)
        try:
            uuid.UUID(headers.get("apns-id", ""))
        except ValueError:
            raise _Check(400, "BadMessageId", headers.get("apns-id", "")) from None
        collapse = headers.get("apns-collapse-id")
        if collapse is not None and len(collapse.encode()) > 64:
            raise _Check(400, "BadCollapseId", collapse)
        if not body:
            raise _Check(400, "PayloadEmpty")
        if len(body) > MAX_PAYLOAD[push_type]:
            raise _Check(413, "PayloadTooLarge", str(len(body)))
        return token, self._check_payload(body, push_type)

    def _check_jwt(self, authorization: str | None) -> None:
        if not authorization:
            raise _Check(403, "MissingProviderToken")
        scheme, _, jwt = authorization.partition(" ")
        parts = jwt.split(".")
        if scheme.lower() != "bearer" or len(parts) != 3:
            raise _Check(403, "InvalidProviderToken", "not a bearer JWT")
        try:
            header = json.loads(_b64decode(parts[0]))
            claims = json.loads(_b64decode(parts[1]))
            signature = _b64decode(parts[2])
        except ValueError:
            raise _Check(403, "InvalidProviderToken", "undecodable") from None
        if header != {"alg": "ES256", "kid": self.key_id}:
            raise _Check(403, "InvalidProviderToken", f"header {header}")
        if set(claims) != {"iss", "iat"} or claims["iss"] != self.team_id \
                or not isinstance(claims["iat"], int):
            raise _Check(403, "InvalidProviderToken", f"claims {claims}")
        if len(signature) != 64:
            raise _Check(403, "InvalidProviderToken", "signature is not raw r||s")
        if jwt not in self._verified:  # like Apple, check each token's signature once
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                       int.from_bytes(signature[32:], "big"))
            try:
                self.public_key.verify(der, f"{parts[0]}.{parts[1]}".encode(),
                                       ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                raise _Check(403, "InvalidProviderToken", "bad signature") from None
            self._verified.add(jwt)
        iat = claims["iat"]
        if iat < time.time() - MAX_TOKEN_AGE or iat < self._min_iat:
            raise _Check(403, "ExpiredProviderToken", f"iat {iat}")

    @staticmethod
    def _check_payload(body: bytes, push_type: str) -> dict[str, Any]:
        try:
            payload = json.loads(body)
        except ValueError:
            raise _Check(400, "BadPayload", "not JSON") from None
        if not isinstance(payload, dict) or not set(payload) <= {"aps", "sipis"}:
            raise _Check(400, "BadPayload", "top level must be {sipis, aps}")
        sipis = payload.get("sipis")
        if not isinstance(sipis, dict) or not all(isinstance(v, str) for v in sipis.values()):
            raise _Check(400, "BadPayload", "sipis must map keys to strings")
        if not set(sipis) <= SIPIS_KEYS:
            raise _Check(400, "BadPayload", f"unknown keys {set(sipis) - SIPIS_KEYS}")
        kind = sipis.get("type")
        if kind not in PUSH_TYPES or not sipis.get("instance") \
                or not sipis.get("sent_at", "").isdigit():
            raise _Check(400, "BadPayload", "type, instance and sent_at are required")
        if (kind == "call") != (push_type == "voip"):
            raise _Check(400, "BadPayload", f"type {kind} as a {push_type} push")
        if kind == "call" and not sipis.get("call"):
            raise _Check(400, "BadPayload", "a call push needs call")
        if "reason" in sipis and (kind != "call-ended"
                                  or sipis["reason"] not in CALL_ENDED_REASONS):
            raise _Check(400, "BadPayload", f"reason {sipis['reason']} for {kind}")
        aps = payload.get("aps")
        if push_type == "alert":
            alert = aps.get("alert") if isinstance(aps, dict) else None
            if not (isinstance(alert, str) or (isinstance(alert, dict) and alert.get("title")
                                               and isinstance(alert.get("body"), str))):
                raise _Check(400, "BadPayload", "an alert push needs aps.alert")
        elif aps is not None and "alert" in aps:
            raise _Check(400, "BadPayload", "a VoIP push carries no alert")
        return payload


@asynccontextmanager
async def open_apns_server(**kwargs: Any) -> AsyncIterator[ApnsServer]:
    """Run an ``ApnsServer`` for the block (exceptions leave it in an ExceptionGroup)."""
    server = ApnsServer(**kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        server.stop()
