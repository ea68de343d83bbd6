"""Frozen records the store keeps: one push instance and its upstream registration status.

Pure data (sans-IO): no clock, no I/O. Times are unix seconds (floats) chosen by the caller.
Secrets stay out of ``repr()`` so that a record can be logged by accident without leaking the
SIP password or the full push token; use :func:`redacted_token` where a token must be named.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs

from sipis.logs import redacted_token as redacted_token  # re-export (old import path)

REGISTRATION_STATES = ("registering", "registered", "backoff", "auth-failed", "unregistered")
"""Every value ``RegistrationStatus.state`` (and the API's ``registration.state``) may take."""


@attrs.frozen
class RegistrationStatus:
    """Where the upstream REGISTER binding of an instance stands, as last persisted.

    Attributes:
        state: one of :data:`REGISTRATION_STATES`.
        last_error: short human text of the last failure (e.g. ``"403 Forbidden"``), no secrets.
        next_attempt_at: unix time of the next REGISTER attempt while in backoff.
        granted_expires: the expiry the registrar granted (seconds), when registered.
        last_registered_at: unix time of the last successful REGISTER.
    """

    state: str = attrs.field(default="registering", validator=attrs.validators.in_(
        REGISTRATION_STATES))
    last_error: str | None = None
    next_attempt_at: float | None = None
    granted_expires: int | None = None
    last_registered_at: float | None = None


def _read_only(mapping: Mapping[str, str]) -> Mapping[str, str]:
    """A private read-only copy (keeps the record immutable; left out of its hash)."""
    return MappingProxyType(dict(mapping))


@attrs.frozen
class InstanceRecord:
    """One push instance: an app install plus one SIP account, as stored.

    ``password`` and ``push_token`` are encrypted at rest by the SQLite store and hidden from
    ``repr()``. ``secret_verifier`` is what :func:`sipis.store.crypto.make_verifier` returned for
    the instance secret; the secret itself is never stored. ``lifetime`` is in seconds;
    ``expires_at`` is ``last_heard_at + lifetime`` as maintained by the instance service.

    ``device_ha1`` maps a digest algorithm (``"MD5"``, ``"SHA-256"``) to the hex
    ``H(id:device_realm:secret)`` that the device registrar checks the woken app's REGISTER
    against (``sipis.calls.device.device_ha1s``): the verifier cannot yield it. An HA1 is a
    password equivalent for ``device_realm`` only, so it is treated like ``password``
    (encrypted, wiped, out of ``repr()``). Records made before HA1s were stored have the
    defaults, realm ``""`` and no HA1: such an instance simply cannot register a device. The
    mapping is copied into a read-only one, so a frozen record really cannot change.
    """

    id: str
    secret_verifier: bytes
    app: str
    aor: str
    username: str
    password: str = attrs.field(repr=False)
    registrar: str | None
    outbound_proxy: str | None
    expires: int
    push_provider: str
    push_token: str = attrs.field(repr=False)
    push_environment: str | None
    contact_token: str
    instance_urn: str
    lifetime: int
    created_at: float
    last_heard_at: float
    expires_at: float
    registration: RegistrationStatus = RegistrationStatus()
    device_realm: str = ""
    device_ha1: Mapping[str, str] = attrs.field(
        factory=dict, converter=_read_only, repr=False, hash=False)





CALL_OUTCOMES = ("answered", "missed", "cancelled", "answered-elsewhere", "declined", "failed")
"""Every value ``CallRecord.outcome`` (and the API's call ``outcome``) may take."""


@attrs.frozen
class HeldMessage:
    """A SIP MESSAGE waiting for the instance's device to register (SPEC.md "MESSAGE").

    Everything but the ids and times is encrypted at rest (the sender and the text are the
    user's private data); ``body`` is hidden from ``repr()``. ``id`` is random (it is part of
    the AAD, so one message's ciphertext cannot be moved to another row).
    """

    id: str
    instance_id: str
    received_at: float
    expires_at: float
    from_: str  # the From header value as received (name-addr, tag dropped)
    to: str
    content_type: str
    body: bytes = attrs.field(repr=False)


@attrs.frozen
class CallRecord:
    """One finished incoming call, for ``GET /v1/instances/{id}/calls``: no credentials."""

    instance_id: str
    call: str  # the call reference of the pushes and the fast channel
    sip_call_id: str
    from_uri: str
    from_name: str | None
    to_uri: str
    started_at: float
    ended_at: float
    outcome: str = attrs.field(validator=attrs.validators.in_(CALL_OUTCOMES))
