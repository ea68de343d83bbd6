"""JSON bodies of the HTTPS API: validate what comes in, serialise what goes out (pure).

Strategy: every validator walks the whole body and collects *all* field errors (dotted paths
such as ``sip.password``) instead of stopping at the first, so an app developer sees every
mistake in one round trip. Validators never raise on any JSON value: they return either the
domain object (``NewInstance`` / ``InstanceUpdate``) or an ``Invalid`` carrying the errors.
Decoding the raw bytes is separate (``decode_json``) because a body that is not JSON at all is
a different problem (400 "malformed") from a JSON body with bad fields (400 "validation").

The serialisers are the only place that turns an ``InstanceRecord`` into JSON, so the rule
"never the SIP password, never the full push token, never the verifier" is enforced here by
building the output field by field (nothing is dumped wholesale).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote

import attrs

from sipis.instances import Created, DeviceInfo, InstanceUpdate, NewInstance
from sipis.sip.errors import SipParseError
from sipis.sip.headers import URI
from sipis.store.models import CallRecord, InstanceRecord, RegistrationStatus, redacted_token

# --- limits (policy constants, named once) -------------------------------------------------

MAX_APP_LENGTH: Final = 255
MAX_URI_LENGTH: Final = 2048
MAX_USERNAME_LENGTH: Final = 256
MAX_PASSWORD_LENGTH: Final = 256
MAX_TOKEN_LENGTH: Final = 4096
# Far above any lifetime policy (the service caps to the domain's maximum); only here so
# that absurd numbers are refused instead of overflowing a timestamp somewhere downstream.
MAX_LIFETIME_SECONDS: Final = 10 * 365 * 86400
# Nesting deeper than this is no instance request; refuse it before recursion gets costly.
MAX_JSON_DEPTH: Final = 32

PUSH_PROVIDERS: Final = ("apns", "fcm")
APNS_ENVIRONMENTS: Final = ("production", "sandbox")
ROOT_FIELD: Final = ""  # the `field` of an error about the body as a whole


@attrs.frozen
class FieldError:
    """One problem with one field; ``field`` is a dotted path ("" for the whole body)."""

    field: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


@attrs.frozen
class Invalid:
    """A body that failed validation, with every error found (never empty)."""

    errors: tuple[FieldError, ...]


class MalformedBody(Exception):
    """The bytes are not one JSON value in UTF-8; the API answers 400 (malformed)."""


@attrs.frozen
class ExpiresPolicy:
    """The REGISTER expiry an app may ask for (config ``registrar.*_expires``)."""

    default: int = 600
    minimum: int = 60
    maximum: int = 7200


# --- decoding ------------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise MalformedBody(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedBody("a number is too large")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # Two values for one key would be read differently by different parsers.
            raise MalformedBody(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _depth_ok(raw: bytes) -> bool:
    depth = 0
    in_string = False
    escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def decode_json(raw: bytes) -> object:
    """Parse a request body as strict JSON.

    Args:
        raw: the body bytes (already size-limited by the caller).
    Returns:
        The decoded JSON value.
    Raises:
        MalformedBody: not UTF-8, not JSON, NaN/Infinity, a duplicate key, a number too big
        to be exact, or nesting deeper than MAX_JSON_DEPTH. The message never quotes the body.
    """
    if not _depth_ok(raw):
        raise MalformedBody("JSON nested too deeply")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedBody("body is not UTF-8") from None
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_object,
        )
    except MalformedBody:
        raise
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise MalformedBody(f"not JSON: {exc.msg} at {where}") from None
    except (ValueError, RecursionError):
        # int() digit limit (CVE-2020-10735 guard) and the like.
        raise MalformedBody("not JSON: a value is too large") from None
    return value


# --- small field checkers ------------------------------------------------------------------


class _Collector:
    """Gathers FieldErrors while a validator walks the body."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, field: str, message: str) -> None:
        self.errors.append(FieldError(field, message))

    def mapping(self, value: object, field: str) -> Mapping[str, object] | None:
        if not isinstance(value, dict):
            self.add(field, "must be a JSON object")
            return None
        return value

    def unknown_keys(self, obj: Mapping[str, object], allowed: Iterable[str], prefix: str) -> None:
        known = set(allowed)
        for key in obj:
            if key not in known:
                self.add(_join(prefix, key), "unknown field")

    def text(
        self,
        value: object,
        field: str,
        *,
        max_length: int,
        printable_ascii: bool = False,
    ) -> str | None:
        """A non-empty string without CR, LF or NUL (or only visible ASCII when asked)."""
        if not isinstance(value, str):
            self.add(field, "must be a string")
            return None
        if not value:
            self.add(field, "must not be empty")
            return None
        if len(value) > max_length:
            self.add(field, f"must be at most {max_length} characters")
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
            self.add(field, "must be valid Unicode")
            return None
        if printable_ascii:
            if not all("\x21" <= ch <= "\x7e" for ch in value):
                self.add(field, "must contain only visible ASCII characters")
                return None
        elif any(ch in "\r\n\x00" for ch in value):
            self.add(field, "must not contain CR, LF or NUL")
            return None
        return value

    def choice(self, value: object, field: str, choices: tuple[str, ...]) -> str | None:
        if not isinstance(value, str) or value not in choices:
            self.add(field, "must be one of: " + ", ".join(choices))
            return None
        return value

    def integer(self, value: object, field: str, *, low: int, high: int) -> int | None:
        # bool is an int subclass in Python, not in JSON.
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(field, "must be an integer")
            return None
        if not low <= value <= high:
            self.add(field, f"must be between {low} and {high}")
            return None
        return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# --- SIP URIs ------------------------------------------------------------------------------

# RFC 3261 §25.1: user = 1*(unreserved / escaped / user-unreserved),
# password = *(unreserved / escaped / "&" / "=" / "+" / "$" / ",").
_USER_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|%[0-9A-Fa-f]{2})+")
_PASSWORD_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|%[0-9A-Fa-f]{2})*")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# uri-parameter = pname ["=" pvalue], both paramchar (param-unreserved / unreserved / escaped).
_PARAM_RE = re.compile(
    r"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+"
    r"(?:=(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+)?"
)


@attrs.frozen
class SipUriParts:
    """The pieces of a sip:/sips: URI that the API checks (host lower-cased, no brackets)."""

    scheme: str
    user: str | None
    has_password: bool
    host: str
    port: int | None
    params: tuple[str, ...]
    has_headers: bool


def _valid_host(host: str) -> str | None:
    """The host in canonical form (lower case, IPv6 without brackets), or None."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            return None
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        return None
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            return None
    return name.lower()


def parse_sip_uri(text: str) -> SipUriParts | str:
    """Split a sip:/sips: URI (RFC 3261 §19.1.1), or return why it is not one.

    A small local grammar gives app developers a precise message per mistake; the URI must
    then also pass ``sipis.sip.headers.URI.parse``, so that whatever the API accepts the SIP
    layer can use.
    """
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        return "must be a sip: or sips: URI"
    if any(ch.isspace() for ch in text) or not text.isascii():
        return "must not contain spaces or non-ASCII characters"
    rest, qmark, _headers = rest.partition("?")
    user: str | None = None
    has_password = False
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user_text, colon, password = userinfo.partition(":")
        if not _USER_RE.fullmatch(user_text) or (colon and not _PASSWORD_RE.fullmatch(password)):
            return "has an invalid user part"
        user = unquote(user_text)
        has_password = bool(colon)
    hostport, *params = rest.split(";")
    port: int | None = None
    if hostport.startswith("["):
        host_text, bracket, port_text = hostport.partition("]")
        host_text += bracket
        if port_text and not port_text.startswith(":"):
            return "has an invalid host"
        port_text = port_text[1:]
    else:
        host_text, _, port_text = hostport.partition(":")
        if ":" in port_text:
            return "has an invalid host"
    if port_text or hostport.endswith(":"):
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535 or len(port_text) > 5:
            return "has an invalid port"
        port = int(port_text)
    host = _valid_host(host_text)
    if host is None:
        return "has an invalid host"
    if not all(_PARAM_RE.fullmatch(param) for param in params):
        return "has an invalid parameter"
    try:
        URI.parse(text)
    except SipParseError:
        return "is not a valid SIP URI"
    return SipUriParts(
        scheme=scheme.lower(),
        user=user,
        has_password=has_password,
        host=host,
        port=port,
        params=tuple(params),
        has_headers=bool(qmark),
    )


def _sip_uri(
    c: _Collector, value: object, field: str, *, need_user: bool
) -> tuple[str, SipUriParts] | None:
    uri = c.text(value, field, max_length=MAX_URI_LENGTH)
    if uri is None:
        return None
    parts = parse_sip_uri(uri)
    if isinstance(parts, str):
        c.add(field, parts)
        return None
    if parts.has_password:
        c.add(field, "must not contain a password (send it in sip.password)")
        return None
    if parts.has_headers:
        c.add(field, "must not contain URI headers")
        return None
    if need_user and not parts.user:
        c.add(field, "must have a user part (sip:user@host)")
        return None
    return uri, parts


def aor_domain(aor: str) -> str:
    """The host of a validated AOR, lower case, as the domain allow-list sees it."""
    parts = parse_sip_uri(aor)
    if isinstance(parts, str):
        raise ValueError("not a SIP URI")  # callers pass validated AORs only
    return parts.host


# --- durations -----------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(?:\d{1,9}[wdhms])+")
_DURATION_PART_RE = re.compile(r"(\d+)([wdhms])")
_UNIT_SECONDS: Final = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> int | None:
    """Seconds in "5d", "36h", "1d12h", "90m", "3600s" (units w/d/h/m/s), or None if malformed."""
    if not _DURATION_RE.fullmatch(text):
        return None
    return sum(
        int(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART_RE.findall(text)
    )


def _lifetime(c: _Collector, value: object, field: str) -> int | None:
    if isinstance(value, str):
        seconds = parse_duration(value)
        if seconds is None:
            c.add(field, 'must be seconds or a duration such as "5d" or "36h"')
            return None
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    else:
        c.add(field, 'must be seconds or a duration such as "5d" or "36h"')
        return None
    if seconds <= 0:
        c.add(field, "must be more than zero")
        return None
    if seconds > MAX_LIFETIME_SECONDS:
        c.add(field, f"must be at most {MAX_LIFETIME_SECONDS} seconds")
        return None
    return seconds


# --- app id --------------------------------------------------------------------------------

# iOS bundle ids and Android application ids: dot-separated segments of letters, digits,
# "_" and "-", at least two segments.
_APP_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)+")


def _app(c: _Collector, value: object) -> str | None:
    app = c.text(value, "app", max_length=MAX_APP_LENGTH)
    if app is not None and not _APP_RE.fullmatch(app):
        c.add("app", 'must be a reverse-DNS app id such as "com.example.phone"')
        return None
    return app


# --- POST /v1/instances --------------------------------------------------------------------

_TOP_KEYS: Final = ("app", "sip", "push", "lifetime")
_SIP_KEYS: Final = ("aor", "username", "password", "registrar", "outbound_proxy", "expires")
_PUSH_KEYS: Final = ("provider", "token", "environment")


def _required(c: _Collector, obj: Mapping[str, object], key: str, prefix: str) -> bool:
    if key not in obj:
        c.add(_join(prefix, key), "is required")
        return False
    return True


def validate_new_instance(body: object, *, expires: ExpiresPolicy) -> NewInstance | Invalid:
    """Check a create body (SPEC.md "POST /v1/instances") and build the NewInstance.

    Args:
        body: any decoded JSON value.
        expires: the REGISTER expiry bounds and default.
    Returns:
        The NewInstance with defaults filled in (username from the AOR user, expires from the
        policy, APNs environment "production"), or Invalid listing every error. Never raises.
    """
    c = _Collector()
    top = c.mapping(body, ROOT_FIELD)
    if top is None:
        return Invalid(tuple(c.errors))
    c.unknown_keys(top, _TOP_KEYS, "")

    app = _app(c, top["app"]) if _required(c, top, "app", "") else None

    aor = username = password = None
    registrar = outbound_proxy = None
    expires_value: int | None = expires.default
    sip = c.mapping(top["sip"], "sip") if _required(c, top, "sip", "") else None
    if sip is not None:
        c.unknown_keys(sip, _SIP_KEYS, "sip")
        aor_parts: SipUriParts | None = None
        if _required(c, sip, "aor", "sip"):
            checked = _sip_uri(c, sip["aor"], "sip.aor", need_user=True)
            if checked is not None:
                aor, aor_parts = checked
        if sip.get("username") is not None:
            username = c.text(sip["username"], "sip.username", max_length=MAX_USERNAME_LENGTH)
        elif aor_parts is not None and aor_parts.user is not None:
            username = aor_parts.user
            if len(username) > MAX_USERNAME_LENGTH or any(ch in "\r\n\x00" for ch in username):
                c.add("sip.aor", "has a user part that cannot be a username")
                username = None
        if _required(c, sip, "password", "sip"):
            password = c.text(sip["password"], "sip.password", max_length=MAX_PASSWORD_LENGTH)
        if sip.get("registrar") is not None:
            checked = _sip_uri(c, sip["registrar"], "sip.registrar", need_user=False)
            registrar = checked[0] if checked else None
        if sip.get("outbound_proxy") is not None:
            checked = _sip_uri(c, sip["outbound_proxy"], "sip.outbound_proxy", need_user=False)
            outbound_proxy = checked[0] if checked else None
        if sip.get("expires") is not None:
            expires_value = c.integer(
                sip["expires"], "sip.expires", low=expires.minimum, high=expires.maximum
            )

    provider = token = environment = None
    push = c.mapping(top["push"], "push") if _required(c, top, "push", "") else None
    if push is not None:
        c.unknown_keys(push, _PUSH_KEYS, "push")
        if _required(c, push, "provider", "push"):
            provider = c.choice(push["provider"], "push.provider", PUSH_PROVIDERS)
        if _required(c, push, "token", "push"):
            token = c.text(
                push["token"], "push.token", max_length=MAX_TOKEN_LENGTH, printable_ascii=True
            )
        raw_env = push.get("environment")
        if raw_env is not None:
            if provider == "fcm":
                c.add("push.environment", "applies to apns only")
            else:
                environment = c.choice(raw_env, "push.environment", APNS_ENVIRONMENTS)
        elif provider == "apns":
            environment = "production"

    lifetime = None
    if top.get("lifetime") is not None:
        lifetime = _lifetime(c, top["lifetime"], "lifetime")

    if c.errors:
        return Invalid(tuple(c.errors))
    # Every None below is impossible once there are no errors; the asserts tell mypy.
    assert app is not None and aor is not None and username is not None
    assert password is not None and expires_value is not None
    assert provider is not None and token is not None
    return NewInstance(
        app=app,
        aor=aor,
        username=username,
        password=password,
        registrar=registrar,
        outbound_proxy=outbound_proxy,
        expires=expires_value,
        push_provider=provider,
        push_token=token,
        push_environment=environment,
        lifetime=lifetime,
    )


# --- PATCH /v1/instances/{id} --------------------------------------------------------------

_PATCH_TOP_KEYS: Final = ("push", "sip", "lifetime")
_PATCH_PUSH_KEYS: Final = ("token", "environment")
_PATCH_SIP_KEYS: Final = ("password",)


def validate_update(body: object, *, push_provider: str | None = None) -> InstanceUpdate | Invalid:
    """Check a PATCH body: any subset of push.token, push.environment, sip.password, lifetime.

    An empty object is a valid (empty) update: it still counts as heard from the device.
    A null value is an error (there is nothing to reset a field to).

    Args:
        body: any decoded JSON value.
        push_provider: the instance's provider, when known, so that push.environment can be
            refused for FCM.
    Returns:
        The InstanceUpdate, or Invalid listing every error. Never raises.
    """
    c = _Collector()
    top = c.mapping(body, ROOT_FIELD)
    if top is None:
        return Invalid(tuple(c.errors))
    c.unknown_keys(top, _PATCH_TOP_KEYS, "")
    token = environment = password = None
    lifetime = None
    if "push" in top:
        push = c.mapping(top["push"], "push")
        if push is not None:
            c.unknown_keys(push, _PATCH_PUSH_KEYS, "push")
            if "token" in push:
                token = c.text(
                    push["token"], "push.token", max_length=MAX_TOKEN_LENGTH, printable_ascii=True
                )
            if "environment" in push:
                if push_provider is not None and push_provider != "apns":
                    c.add("push.environment", "applies to apns only")
                else:
                    environment = c.choice(
                        push["environment"], "push.environment", APNS_ENVIRONMENTS
                    )
    if "sip" in top:
        sip = c.mapping(top["sip"], "sip")
        if sip is not None:
            c.unknown_keys(sip, _PATCH_SIP_KEYS, "sip")
            if "password" in sip:
                password = c.text(sip["password"], "sip.password", max_length=MAX_PASSWORD_LENGTH)
    if "lifetime" in top:
        lifetime = _lifetime(c, top["lifetime"], "lifetime")
    if c.errors:
        return Invalid(tuple(c.errors))
    return InstanceUpdate(
        push_token=token, push_environment=environment, password=password, lifetime=lifetime
    )


# --- serialisation -------------------------------------------------------------------------


def rfc3339(timestamp: float | None) -> str | None:
    """Unix seconds as RFC 3339 UTC with a "Z" (whole seconds), None stays None."""
    if timestamp is None or not math.isfinite(timestamp):
        return None
    moment = datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_ms(timestamp: float | None) -> str | None:
    """Unix seconds as RFC 3339 UTC with milliseconds, e.g. "2026-11-23T10:59:10.123Z"."""
    if timestamp is None or not math.isfinite(timestamp):
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def registration_body(status: RegistrationStatus) -> dict[str, object]:
    """The "registration" member of the GET body."""
    return {
        "state": status.state,
        "expires": status.granted_expires,
        "last_error": status.last_error,
        # Milliseconds: the backoff jitter between instances is visible (RFC 5626 §4.5).
        "next_attempt_at": rfc3339_ms(status.next_attempt_at),
        "last_registered_at": rfc3339(status.last_registered_at),
    }


def instance_body(record: InstanceRecord, registration: RegistrationStatus) -> dict[str, object]:
    """The GET/PATCH/foreground/background body: state of one instance, no secrets.

    Built member by member: never the SIP password, the secret verifier, the contact token
    or the full push token.
    """
    return {
        "id": record.id,
        "app": record.app,
        "aor": record.aor,
        "username": record.username,
        "registrar": record.registrar,
        "outbound_proxy": record.outbound_proxy,
        "push": {
            "provider": record.push_provider,
            "environment": record.push_environment,
            # The same redaction as in logs: a prefix and the length, never the token.
            "token": redacted_token(record.push_token),
        },
        "created_at": rfc3339(record.created_at),
        "last_heard_at": rfc3339(record.last_heard_at),
        "expires_at": rfc3339(record.expires_at),
        "lifetime": record.lifetime,
        "registration": registration_body(registration),
    }


def created_body(
    created: Created, registration: RegistrationStatus, device: DeviceInfo
) -> dict[str, object]:
    """The 201 body of POST /v1/instances: the only time the secret is ever shown."""
    return {
        "id": created.record.id,
        "secret": created.secret,
        "expires_at": rfc3339(created.record.expires_at),
        "registration": {"state": registration.state, "expires": registration.granted_expires},
        "device": {
            "registrar": device.registrar,
            "username": device.username,
            "realm": device.realm,
        },
    }


def call_record_body(record: CallRecord) -> dict[str, object]:
    """One entry of ``GET /v1/instances/{id}/calls``: who called, when, how it ended."""
    return {
        "call": record.call,
        "sip_call_id": record.sip_call_id,
        "from_uri": record.from_uri,
        "from_name": record.from_name,
        "to_uri": record.to_uri,
        "started_at": rfc3339_ms(record.started_at),
        "ended_at": rfc3339_ms(record.ended_at),
        "outcome": record.outcome,
    }
