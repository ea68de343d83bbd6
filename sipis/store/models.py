"""Frozen records the store keeps: one push instance and its upstream registration status.

Pure data (sans-IO): no clock, no I/O. Times are unix seconds (floats) chosen by the caller.
Secrets stay out of ``repr()`` so that a record can be logged by accident without leaking the
SIP password or the full push token; use :func:`redacted_token` where a token must be named.
"""

from __future__ import annotations

import attrs

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


@attrs.frozen
class InstanceRecord:
    """One push instance: an app install plus one SIP account, as stored.

    ``password`` and ``push_token`` are encrypted at rest by the SQLite store and hidden from
    ``repr()``. ``secret_verifier`` is what :func:`sipis.store.crypto.make_verifier` returned for
    the instance secret; the secret itself is never stored. ``lifetime`` is in seconds;
    ``expires_at`` is ``last_heard_at + lifetime`` as maintained by the instance service.
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


_SHOWN_PREFIX = 6
_MIN_LEN_TO_SHOW_PREFIX = 24


def redacted_token(token: str) -> str:
    """A push token (or other long credential) shortened for logs: ``"a1b2c3…(64)"``.

    The first 6 characters and the length identify a token among a user's devices without
    making it usable. Tokens shorter than 24 characters show only their length, because 6
    characters would be too large a share of them.
    """
    if len(token) < _MIN_LEN_TO_SHOW_PREFIX:
        return f"…({len(token)})"
    return f"{token[:_SHOWN_PREFIX]}…({len(token)})"
