"""A local FCM HTTP v1 server with its Google OAuth token endpoint: real HTTP/2 over TLS.

Raw ``h2`` on ``trio.serve_ssl_over_tcp`` with a ``trustme`` certificate for 127.0.0.1, so the
client under test runs its real ``httpx`` HTTP/2 stack, TLS and ALPN included.

- ``POST /token``: RFC 7523 JWT-bearer grant. The RS256 assertion is checked against the test
  service account's public key (with ``cryptography``, not google-auth, so the client's signer
  is checked by an independent implementation), and ``iss``/``aud``/``scope``/``iat``/``exp``.
  Answers ``{"access_token", "expires_in", "token_type": "Bearer"}``; ``token_lifetime`` makes
  tokens short-lived, ``token_delay`` makes the endpoint slow.
- ``POST /v1/projects/{project}/messages:send``: checks the bearer token, the project, the body
  schema (``message.token``, ``data`` of SPEC.md keys with string values, ``android.priority``,
  ``android.ttl``), records each accepted message in ``accepted`` and answers
  ``{"name": "projects/p/messages/0:N"}``.
- Scripted answers (``answer(...)``, consumed one per send, in order): ``Answer.unregistered()``,
  ``invalid_token()``, ``quota_exceeded()``, ``unavailable()``, ``unauthenticated()``,
  ``slow(delay)``, ``drop()`` (accept and record, then cut the TCP connection without
  answering), ``refuse()`` (RST_STREAM REFUSED_STREAM, not processed). ``dead_tokens``
  answers UNREGISTERED for those tokens every time.
- ``goaway_after=N``: on each connection (the first ``goaway_limit`` ones), once N streams
  (token requests included) are answered, a GOAWAY with the last answered stream id goes
  out and every later stream is ignored, as RFC 9113 §6.8 allows. ``goaway_after=0`` sends
  GOAWAY(last_stream_id=0) at once.

Usage::

    key = ServiceAccountKey.generate()
    server = FcmServer(key)
    await nursery.start(server.run)
    key.write(tmp_path / "sa.json", token_uri=server.token_uri)
    server.write_ca(tmp_path / "ca.pem")
"""

from __future__ import annotations

import base64
import collections
import contextlib
import functools
import itertools
import json
import re
import secrets
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio
import trustme
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hyperframe.frame import GoAwayFrame

from tests.peers.ports import HOST

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
SPEC_KEYS = frozenset({"type", "instance", "call", "from_uri", "from_name", "to_uri",
                       "sip_call_id", "reason", "sent_at", "body"})
REQUIRED_KEYS = frozenset({"type", "instance", "sent_at"})
PUSH_TYPES = frozenset({"call", "call-ended", "message", "instance-expiring"})
ANDROID_KEYS = frozenset({"priority", "ttl", "collapse_key"})
_TTL = re.compile(r"^\d+(\.\d{1,9})?s$")
_SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_CLOCK_SKEW = 60


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@attrs.frozen
class ServiceAccountKey:
    """A test service account: RSA key pair plus the fields of Google's JSON key file."""

    project_id: str
    client_email: str
    private_key_id: str
    private_key_pem: str = attrs.field(repr=False)
    public_key: rsa.RSAPublicKey = attrs.field(repr=False)

    @classmethod
    def generate(cls, project_id: str = "sipis-test") -> ServiceAccountKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return cls(project_id=project_id,
                   client_email=f"sipis-push@{project_id}.iam.gserviceaccount.com",
                   private_key_id=secrets.token_hex(20), private_key_pem=pem,
                   public_key=key.public_key())

    def info(self, *, token_uri: str, project_id: str | None = None) -> dict[str, str]:
        """The JSON key file's content (``project_id=""`` leaves the field out)."""
        info = {"type": "service_account", "project_id": project_id or self.project_id,
                "private_key_id": self.private_key_id, "private_key": self.private_key_pem,
                "client_email": self.client_email, "client_id": "1234567890",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": token_uri}
        if project_id == "":
            del info["project_id"]
        return info

    def write(self, path: Path, *, token_uri: str, project_id: str | None = None) -> Path:
        path.write_text(json.dumps(self.info(token_uri=token_uri, project_id=project_id)))
        return path


@attrs.frozen
class Answer:
    """One scripted answer to a send request (status 200 = process it normally)."""

    status: int = 200
    error_status: str | None = None
    error_code: str | None = None
    message: str = ""
    retry_after: str | None = None
    delay: float = 0.0
    drop_connection: bool = False
    refuse_stream: bool = False
    token_violation: bool = False

    @classmethod
    def unregistered(cls) -> Answer:
        return cls(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found.")

    @classmethod
    def invalid_token(cls) -> Answer:
        return cls(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                   "The registration token is not a valid FCM registration token",
                   token_violation=True)

    @classmethod
    def invalid_argument(cls, message: str = "Invalid JSON payload received.") -> Answer:
        return cls(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", message)

    @classmethod
    def quota_exceeded(cls, retry_after: str | None = "3") -> Answer:
        return cls(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded.",
                   retry_after=retry_after)

    @classmethod
    def unavailable(cls, retry_after: str | None = None) -> Answer:
        return cls(503, "UNAVAILABLE", "UNAVAILABLE", "The service is unavailable.",
                   retry_after=retry_after)

    @classmethod
    def internal(cls) -> Answer:
        return cls(500, "INTERNAL", "INTERNAL", "Internal error encountered.")

    @classmethod
    def unauthenticated(cls) -> Answer:
        return cls(401, "UNAUTHENTICATED", None,
                   "Request had invalid authentication credentials.")

    @classmethod
    def sender_id_mismatch(cls) -> Answer:
        return cls(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch")

    @classmethod
    def slow(cls, delay: float) -> Answer:
        return cls(delay=delay)

    @classmethod
    def drop(cls) -> Answer:
        return cls(drop_connection=True)

    @classmethod
    def refuse(cls) -> Answer:
        """RST_STREAM(REFUSED_STREAM) without looking at the request (RFC 9113 §8.7)."""
        return cls(refuse_stream=True)


@attrs.frozen
class Accepted:
    """A message the server accepted (and would have delivered)."""

    name: str
    project: str
    token: str
    data: dict[str, str]
    android: dict[str, str]
    connection: int
    stream_id: int


@attrs.define
class _Request:
    headers: dict[str, str]
    body: bytearray = attrs.Factory(bytearray)


@attrs.define(eq=False)
class _Connection:
    number: int
    h2: h2.connection.H2Connection
    stream: trio.SSLStream[trio.SocketStream]
    scope: trio.CancelScope
    lock: trio.Lock = attrs.Factory(trio.Lock)
    goaway_due: bool = False  # this connection sends a GOAWAY after goaway_after streams
    answered: int = 0
    in_flight: int = 0
    last_stream_id: int | None = None  # frozen once goaway_after streams were taken
    goaway_sent: bool = False
    pending: dict[int, _Request] = attrs.Factory(dict)  # streams still receiving their body

    def goaway_ready(self) -> bool:
        """Every stream up to last_stream_id answered: a GOAWAY now strands nothing."""
        last = self.last_stream_id
        return (last is not None and not self.goaway_sent and self.in_flight == 0
                and not any(stream_id <= last for stream_id in self.pending)
                and not self.scope.cancel_called)

    async def flush(self, extra: bytes = b"") -> None:
        async with self.lock:
            data = self.h2.data_to_send() + extra
            if data:
                await self.stream.send_all(data)


class FcmServer:
    """See the module docstring. Bound on 127.0.0.1, a fresh port per instance."""

    def __init__(self, account: ServiceAccountKey, *, token_lifetime: int = 3600,
                 goaway_after: int | None = None, goaway_limit: int | None = None) -> None:
        self.account = account
        self.token_lifetime = token_lifetime
        self.token_delay = 0.0
        self.goaway_after = goaway_after
        self.goaway_limit = goaway_limit
        self.ca = trustme.CA()
        self._cert = self.ca.issue_cert(HOST, "localhost")
        self.port = 0
        self.script: collections.deque[Answer] = collections.deque()
        self.dead_tokens: set[str] = set()
        self.accepted: list[Accepted] = []
        self.assertions: list[dict[str, Any]] = []  # verified JWT claims, in order
        self.token_requests = 0
        self.send_requests = 0  # every send stream taken (not the ignored ones)
        self.ignored_streams = 0  # streams above a GOAWAY's last-stream-id
        self.goaways = 0
        self.connections = 0
        self.rejections: list[str] = []  # why requests were refused (schema, auth, …)
        self.errors: list[str] = []  # unexpected exceptions in connection handlers
        self._tokens: dict[str, float] = {}  # access token -> expiry (trio time)
        self.issued_tokens: list[str] = []  # every access token handed out
        self._conn_ids = itertools.count(1)
        self._names = itertools.count(1)

    # -- addresses -----------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The send URL template (``{project_id}`` left for the client to fill)."""
        return self.base + "/v1/projects/{project_id}/messages:send"

    @property
    def token_uri(self) -> str:
        return self.base + "/token"

    def write_ca(self, path: Path) -> Path:
        self.ca.cert_pem.write_to_path(str(path))
        return path

    # -- control ---------------------------------------------------------------------------

    def answer(self, *answers: Answer) -> None:
        """Queue answers for the next send requests, in order."""
        self.script.extend(answers)

    def revoke_tokens(self) -> None:
        """Every access token issued so far is now refused (401)."""
        self._tokens.clear()

    # -- serving ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[FcmServer] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        context.set_alpn_protocols(["h2"])
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_ssl_over_tcp, self._serve, 0, context,
                                      host=HOST, https_compatible=True)
            listeners: list[trio.SSLListener[trio.SocketStream]] = await nursery.start(serve)
            tcp = listeners[0].transport_listener
            assert isinstance(tcp, trio.SocketListener)
            self.port = tcp.socket.getsockname()[1]
            task_status.started(self)

    async def _serve(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.connections += 1
        number = next(self._conn_ids)
        conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        with trio.CancelScope() as scope:
            state = _Connection(number, conn, stream, scope)
            state.goaway_due = self.goaway_after is not None and (
                self.goaway_limit is None or number <= self.goaway_limit)
            try:
                conn.initiate_connection()
                await state.flush()
                if state.goaway_due and self.goaway_after == 0:
                    state.last_stream_id = 0
                    await self._send_goaway(state)
                async with trio.open_nursery() as nursery:
                    await self._read_loop(state, nursery)
                    nursery.cancel_scope.cancel()
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away, or a drop() answer cut the connection
            except* Exception as group:  # a server bug: keep serving, let the test see it
                self.errors.extend(f"connection {number}: {exc!r}" for exc in group.exceptions)
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    async def _read_loop(self, state: _Connection, nursery: trio.Nursery) -> None:
        pending = state.pending
        while True:
            data = await state.stream.receive_some(65536)
            if not data:
                return
            for event in state.h2.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = {str(k): str(v) for k, v in event.headers or ()}
                    pending[event.stream_id] = _Request(headers)
                elif isinstance(event, h2.events.DataReceived):
                    if event.stream_id in pending and event.data:
                        pending[event.stream_id].body += event.data
                    state.h2.acknowledge_received_data(event.flow_controlled_length,
                                                       event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    request = pending.pop(event.stream_id, None)
                    if request is not None and self._take(state, event.stream_id):
                        state.in_flight += 1
                        nursery.start_soon(self._handle, state, event.stream_id, request)
                elif isinstance(event, h2.events.StreamReset):
                    pending.pop(event.stream_id, None)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            if state.goaway_ready():  # a stream we waited for was reset
                await self._send_goaway(state)
            await state.flush()

    def _take(self, state: _Connection, stream_id: int) -> bool:
        """Whether this stream is processed; past the GOAWAY point it is ignored."""
        if state.last_stream_id is not None and stream_id > state.last_stream_id:
            self.ignored_streams += 1
            return False
        state.answered += 1
        if state.goaway_due and state.last_stream_id is None \
                and self.goaway_after is not None and state.answered >= self.goaway_after:
            state.last_stream_id = stream_id
        return True

    async def _send_goaway(self, state: _Connection) -> None:
        """GOAWAY written beside h2's state machine, so that later frames still parse."""
        assert state.last_stream_id is not None
        if state.goaway_sent:
            return
        state.goaway_sent = True
        self.goaways += 1
        frame = GoAwayFrame(stream_id=0, last_stream_id=state.last_stream_id, error_code=0)
        await state.flush(frame.serialize())

    async def _handle(self, state: _Connection, stream_id: int, request: _Request) -> None:
        try:
            status, headers, body = await self._route(state, stream_id, request)
            if status is None:
                return
            try:
                state.h2.send_headers(stream_id, [(":status", str(status)),
                                                  ("content-type", "application/json"),
                                                  *headers])
                state.h2.send_data(stream_id, body, end_stream=True)
            except h2.exceptions.StreamClosedError:
                return
            await state.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            state.scope.cancel()
        finally:
            state.in_flight -= 1
            if state.goaway_ready():
                try:
                    await self._send_goaway(state)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    state.scope.cancel()

    async def _route(self, state: _Connection, stream_id: int, request: _Request,
                     ) -> tuple[int | None, list[tuple[str, str]], bytes]:
        method = request.headers.get(":method")
        path = request.headers.get(":path", "")
        if method == "POST" and path == "/token":
            return await self._token(request)
        match = _SEND_PATH.match(path)
        if method == "POST" and match:
            return await self._send(state, stream_id, match.group(1), request)
        return 404, [], json.dumps({"error": {"code": 404, "message": "no such path",
                                              "status": "NOT_FOUND"}}).encode()

    # -- OAuth token endpoint ----------------------------------------------------------------

    async def _token(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        self.token_requests += 1
        if self.token_delay:
            await trio.sleep(self.token_delay)
        form = urllib.parse.parse_qs(request.body.decode(), strict_parsing=True)
        try:
            if form.get("grant_type") != [JWT_BEARER_GRANT]:
                raise ValueError("unsupported grant_type")
            (assertion,) = form["assertion"]
            claims = self._verify_assertion(assertion)
        except (ValueError, KeyError, InvalidSignature) as exc:
            self.rejections.append(f"token: {exc or type(exc).__name__}")
            return 400, [], json.dumps({"error": "invalid_grant",
                                        "error_description": "Invalid JWT"}).encode()
        self.assertions.append(claims)
        token = "ya29.test-" + secrets.token_urlsafe(24)
        self._tokens[token] = trio.current_time() + self.token_lifetime
        self.issued_tokens.append(token)
        return 200, [], json.dumps({"access_token": token, "expires_in": self.token_lifetime,
                                    "token_type": "Bearer"}).encode()

    def _verify_assertion(self, assertion: str) -> dict[str, Any]:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64url_decode(header_b64))
        if header.get("alg") != "RS256":
            raise ValueError(f"alg {header.get('alg')!r}")
        self.account.public_key.verify(_b64url_decode(signature_b64),
                                       f"{header_b64}.{payload_b64}".encode(),
                                       padding.PKCS1v15(), hashes.SHA256())
        claims: dict[str, Any] = json.loads(_b64url_decode(payload_b64))
        now = time.time()
        if claims.get("iss") != self.account.client_email:
            raise ValueError("iss")
        if claims.get("aud") != self.token_uri:
            raise ValueError("aud")
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            raise ValueError("scope")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            raise ValueError("iat/exp")
        if iat > now + _CLOCK_SKEW or exp < now - _CLOCK_SKEW or exp - iat > 3600:
            raise ValueError("iat/exp window")
        return claims

    # -- send endpoint ---------------------------------------------------------------------

    async def _send(self, state: _Connection, stream_id: int, project: str,
                    request: _Request,
                    ) -> tuple[int | None, list[tuple[str, str]], bytes]:
        self.send_requests += 1
        answer = self.script.popleft() if self.script else Answer()
        if answer.delay:
            await trio.sleep(answer.delay)
        if answer.refuse_stream:
            state.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            await state.flush()
            return None, [], b""
        if answer.status != 200:
            return _error(answer)
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ")
        expiry = self._tokens.get(token)
        if not auth.startswith("Bearer ") or expiry is None or expiry <= trio.current_time():
            self.rejections.append("send: bad or expired access token")
            return _error(Answer.unauthenticated())
        if project != self.account.project_id:
            self.rejections.append(f"send: project {project}")
            return _error(Answer(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH",
                                 "Permission denied on project"))
        try:
            message = _check_message(json.loads(request.body))
        except (ValueError, KeyError, TypeError) as exc:
            self.rejections.append(f"send: {exc}")
            return _error(Answer.invalid_argument(f"Invalid message: {exc}"))
        if message["token"] in self.dead_tokens:
            return _error(Answer.unregistered())
        name = f"projects/{project}/messages/0:{next(self._names)}"
        self.accepted.append(Accepted(name=name, project=project, token=message["token"],
                                      data=message["data"], android=message["android"],
                                      connection=state.number,
                                      stream_id=stream_id))
        if answer.drop_connection:
            # Cut TCP under TLS: the client never learns that the message went out.
            await state.stream.transport_stream.aclose()
            state.scope.cancel()
            return None, [], b""
        return 200, [], json.dumps({"name": name}).encode()


def _check_message(body: Any) -> dict[str, Any]:
    """The FCM v1 shape sipis must send; raises ValueError naming what is wrong."""
    if not isinstance(body, dict) or set(body) != {"message"}:
        raise ValueError("body must be {'message': …}")
    message = body["message"]
    if not isinstance(message, dict) or not set(message) <= {"token", "data", "android"}:
        raise ValueError(f"unexpected message fields {sorted(message)}")
    if not isinstance(message.get("token"), str) or not message["token"]:
        raise ValueError("message.token")
    data = message.get("data")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError("message.data values must be strings")
    if not set(data) <= SPEC_KEYS or not set(data) >= REQUIRED_KEYS:
        raise ValueError(f"message.data keys {sorted(data)}")
    if data["type"] not in PUSH_TYPES or not data["sent_at"].isdigit():
        raise ValueError("message.data type/sent_at")
    android = message.get("android")
    if not isinstance(android, dict) or not set(android) <= ANDROID_KEYS:
        raise ValueError("message.android")
    if android.get("priority") not in ("high", "normal"):
        raise ValueError("message.android.priority")
    if "ttl" in android and not _TTL.match(str(android["ttl"])):
        raise ValueError("message.android.ttl")
    return message


def _error(answer: Answer) -> tuple[int, list[tuple[str, str]], bytes]:
    details: list[dict[str, Any]] = []
    if answer.error_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": answer.error_code})
    if answer.token_violation:
        details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": [
            {"field": "message.token", "description": "Invalid registration token"}]})
    error: dict[str, Any] = {"code": answer.status, "message": answer.message,
                             "status": answer.error_status}
    if details:
        error["details"] = details
    headers = [("retry-after", answer.retry_after)] if answer.retry_after else []
    if answer.status == 401:
        headers.append(("www-authenticate", 'Bearer realm="https://accounts.google.com/"'))
    return answer.status, headers, json.dumps({"error": error}).encode()
