"""What every push provider shares: the request, the result, the errors, the client protocol.

Core module: no I/O. ``apns.py`` and ``fcm.py`` build provider requests from a ``PushRequest``
and map provider answers onto the errors below; the call layer only ever sees these types.

Errors (one line each: when raised, what the caller does):

    PushError                 base; the push failed, ``reason`` says why (kept for the call record)
    ├── InvalidToken          the provider says the token is dead (APNs 410/BadDeviceToken/
    │                         Unregistered, FCM UNREGISTERED/INVALID_ARGUMENT on the token):
    │                         wipe the instance
    ├── PushRetryable         429/5xx/connection lost before the provider processed it: retry
    │                         after ``retry_after`` (None: caller's backoff), within the call timer
    ├── PushAuthError         our provider credentials are refused (APNs 403 InvalidProviderToken
    │                         after a refresh, FCM 401/403): the operator must act; fail the push
    └── PushConfigError       the provider is not configured (no APNs key, no FCM account)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from sipis import fastenum


class PushKind(fastenum.Enum):
    """What the push is for; it decides the provider's push type and priority.

    - ``CALL``: APNs ``apns-push-type: voip`` on topic ``{bundle}.voip``, priority 10,
      ``apns-expiration: 0``; FCM data message, ``android.priority: high``, short ttl.
    - ``CALL_ENDED``, ``MESSAGE``, ``INSTANCE_EXPIRING``: APNs ``alert`` on the bundle topic;
      FCM data message, high priority, ordinary ttl.
    """

    CALL = "call"
    CALL_ENDED = "call-ended"
    MESSAGE = "message"
    INSTANCE_EXPIRING = "instance-expiring"


@attrs.frozen
class PushTarget:
    """Where a push goes: provider, token, app bundle and (APNs) environment."""

    provider: str  # "apns" | "fcm"
    token: str = attrs.field(repr=False)
    app: str  # iOS bundle id / Android package
    environment: str | None = None  # APNs "production" | "sandbox"


@attrs.frozen
class PushRequest:
    """One push: the target and the SPEC.md payload keys (all values strings or None)."""

    kind: PushKind
    target: PushTarget
    instance: str
    call: str | None = None
    from_uri: str | None = None
    from_name: str | None = None
    to_uri: str | None = None
    sip_call_id: str | None = None
    reason: str | None = None  # call-ended: cancelled | answered-elsewhere | timeout
    sent_at: int = 0  # unix seconds
    body: str | None = attrs.field(default=None, repr=False)  # MESSAGE text, only if configured
    collapse_id: str | None = None

    def payload(self) -> dict[str, str]:
        """The SPEC.md keys, as strings (FCM ``data`` needs strings; APNs gets the same)."""
        keys: dict[str, str | None] = {
            "type": self.kind.value,
            "instance": self.instance,
            "call": self.call,
            "from_uri": self.from_uri,
            "from_name": self.from_name,
            "to_uri": self.to_uri,
            "sip_call_id": self.sip_call_id,
            "reason": self.reason,
            "sent_at": str(self.sent_at),
            "body": self.body,
        }
        return {k: v for k, v in keys.items() if v is not None}


@attrs.frozen
class PushResult:
    """The provider accepted the push (``id`` is apns-id / FCM message name)."""

    provider: str
    id: str | None = None
    attempts: int = 1


class PushError(Exception):
    """A push failed; ``reason`` is the provider's reason (safe to log: no token)."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class InvalidToken(PushError):
    """The token is dead for good: wipe the instance."""


class PushRetryable(PushError):
    """Try again (after ``retry_after`` seconds if the provider said so)."""

    def __init__(self, reason: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason, status=status)
        self.retry_after = retry_after


class PushAuthError(PushError):
    """Our credentials for the provider are refused: the operator must act."""


class PushConfigError(PushError):
    """The provider needed for this push is not configured."""


class PushClient(Protocol):
    """One provider's sender. ``send`` raises a ``PushError`` subclass or returns a result.

    A client never retries a request the provider may have processed (a call must not ring
    twice); ``PushRetryable`` is raised only when it provably did not (HTTP/2 stream refused,
    GOAWAY with a last-stream-id below ours, 429/5xx answers).
    """

    async def send(self, request: PushRequest) -> PushResult: ...

    async def aclose(self) -> None: ...


class PushStart:
    """A push a client put on the wire from its caller's task (``StartingPushClient.start``),
    before the task that waits for its answer runs. Hand it to that client's ``send``, or
    ``abandon`` it."""

    __slots__ = ()

    def abandon(self) -> None:
        """Give it up: nobody will wait for its answer."""
        raise NotImplementedError


@runtime_checkable
class StartingPushClient(PushClient, Protocol):
    """A client that can send a push at once, from the caller's task: the latency of a call's
    push is then not a scheduler pass longer than the INVITE's own handling."""

    def start(self, request: PushRequest) -> PushStart | None:
        """The push on its way, or None when it cannot go at once (``send`` does it all)."""
        ...

    async def send(self, request: PushRequest, started: PushStart | None = None
                   ) -> PushResult: ...


# One encoder for every push body: json.dumps with options builds a new one per call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact_json(value: Mapping[str, Any]) -> bytes:
    """``value`` as compact UTF-8 JSON (a push body: APNs payload, FCM message)."""
    return _COMPACT_JSON.encode(value).encode()
