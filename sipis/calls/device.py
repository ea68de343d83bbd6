"""The device registrar: the woken app REGISTERs to sipis, so that a held call can reach it.

Sans-IO: requests and an explicit ``now`` in, responses and binding changes out. No clock, no
socket, no store: the trio driver looks up HA1 values, runs the REGISTER server transaction,
and wakes held calls from the returned ``changes``.

Why the store keeps digest HA1 values for the device (and not only the secret verifier)
    The app authenticates with HTTP digest (SPEC.md: username = instance id, password =
    instance secret). A digest server must compute ``HA1 = H(username:realm:password)``; the
    secret verifier (``sipis.store.crypto.make_verifier``, a domain-separated SHA-256 of the
    secret) cannot produce it, and keeping the plaintext secret would defeat the verifier. So,
    like Kamailio (``ha1`` columns) and Asterisk (``md5_cred``), the instance service stores,
    when it creates the secret, one HA1 per offered algorithm (MD5, SHA-256) for the device
    realm: :func:`device_ha1s`. An HA1 is a password equivalent for this realm only — whoever
    holds it can REGISTER as that device to sipis — but it does not reveal the secret (256
    random bits, so no dictionary attack on H), hence it does not open the HTTPS API, which
    keeps checking the verifier. The store encrypts them at rest like the SIP password (one
    AEAD-encrypted JSON map per instance, AAD ``"<id>:device_ha1"``) and wipes them with the
    instance. Changing the device realm invalidates every stored HA1: the realm is fixed
    configuration, and a new realm needs new instances (or HA1s recomputed when the app next
    presents its secret to the API).

Digest as served here (RFC 7616/8760 on RFC 3261 §22)
    - 401 challenges offer SHA-256 first, then MD5 (RFC 8760 §2.4: most preferred first),
      ``qop="auth"``, one fresh nonce shared by both. ``userhash`` and ``-sess`` are not
      offered; credentials using them are refused.
    - :class:`NonceIssuer` makes stateless nonces ``b64url(ts_ms || salt || mac)`` with
      ``mac = HMAC-SHA256(key, ts_ms || salt || realm)[:16]``. A nonce older than
      ``lifetime`` whose credentials are otherwise right is answered with ``stale=true``
      (RFC 7616 §3.3: the client retries without asking anyone); a forged, foreign-realm or
      future nonce with a plain new challenge. The random salt keeps two nonces of the same
      millisecond apart.
    - Replay: ``nc`` must grow per (username, nonce). The highest ``nc`` of each nonce in use
      is kept in a bounded table that forgets expired nonces. If the table is full, the oldest
      entry is evicted and nonces issued up to that entry's time are no longer accepted
      (answered ``stale=true``): an evicted nonce can never be replayed.
    - A failed ``nc`` check is answered ``stale=true`` as well: the response matched, so the
      client knows the secret; it only needs a new nonce.

Registration rules (RFC 3261 §10.3, RFC 5626 §6)
    1. ``Require`` options other than ``outbound`` → 420 with ``Unsupported``.
    2. Missing or wrong credentials → 401 with the challenges above.
    3. The To user (the AOR) must be the authenticated username (the instance id) → else 403.
    4. ``Contact: *`` needs ``Expires: 0`` and no other Contact (else 400) and removes every
       binding of the instance. Malformed Contacts, non-SIP URIs, or more than one Contact with
       ``reg-id`` (RFC 5626 §6) → 400.
    5. Expiry per Contact: its ``expires`` parameter, else the ``Expires`` header, else
       ``default_expires``; a malformed value counts as absent. 0 removes the binding; below
       ``min_expires`` → 423 with ``Min-Expires``; above ``max_expires`` it is capped.
    6. Bindings are keyed by (``+sip.instance``, ``reg-id``) when both are present (RFC 5626
       §6: a new flow replaces the old one), else by the Contact URI (host case-insensitive;
       user, port, ``transport``/``maddr`` parameters compared). For an existing binding with
       the same Call-ID, a CSeq that is not higher fails the whole request with 500 (§10.3
       step 7: the update is aborted); ``*`` applies that check to every binding.
    7. All changes commit together or not at all; more than ``max_contacts`` live bindings for
       one instance → 403.
    8. 200 lists every live binding of the instance with its remaining ``expires`` (and
       ``Require: outbound`` when a ``reg-id`` was processed).

NAT (RFC 5626 style): a binding records where the REGISTER came *from* (source address and
port, which the endpoint also wrote into the top Via as ``received``/``rport``) and its flow
(TCP/TLS connection). Calls go to that flow, or to that address over UDP — never to the
Contact host, which behind NAT is a private address. The Contact URI is only the
Request-URI of the forwarded INVITE. When a flow closes, :meth:`DeviceBindings.remove_flow`
drops its bindings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeAlias

import attrs

from sipis import fastenum
from sipis.sip.digest import (
    Credentials,
    compute_ha1,
    compute_response_from_ha1,
    make_challenge,
    verify_authorization_ha1,
)
from sipis.sip.errors import DigestError, SipParseError
from sipis.sip.headers import URI, Address
from sipis.sip.message import SipRequest, SipResponse, make_response, new_tag

__all__ = [
    "DIGEST_ALGORITHMS",
    "SUPPORTED_OPTIONS",
    "BindingChange",
    "BindingChangeKind",
    "DeviceBinding",
    "DeviceBindings",
    "DeviceRegistrar",
    "NonceIssuer",
    "NonceStatus",
    "RegisterResult",
    "SourceInfo",
    "SourceLike",
    "compute_response_from_ha1",
    "device_ha1",
    "device_ha1s",
    "verify_authorization_ha1",
]

#: Algorithms the device registrar offers, most preferred first (RFC 8760 §2.4).
DIGEST_ALGORITHMS: tuple[str, ...] = ("SHA-256", "MD5")

#: Option tags we accept in ``Require`` (RFC 3261 §8.2.2.3); anything else → 420.
SUPPORTED_OPTIONS: frozenset[str] = frozenset({"outbound"})

_DIGITS = re.compile(r"[0-9]{1,10}")


# --- HA1 ------------------------------------------------------------------------------------


def device_ha1(secret: str, username: str, realm: str, algorithm: str) -> str:
    """``H(username:realm:secret)`` in lower-case hex: what the store keeps for digest.

    Args:
        secret: the instance secret (the device's digest password).
        username: the instance id.
        realm: the device realm (configuration; the 201 body names it).
        algorithm: ``"MD5"``, ``"SHA-256"`` (or ``"SHA-512-256"``), case-insensitive; a
            ``-sess`` variant uses the same stored HA1.

    Raises:
        ValueError: an algorithm we do not implement.
    """
    try:
        return compute_ha1(algorithm, username, realm, secret)
    except DigestError as exc:
        raise ValueError("unsupported digest algorithm") from exc


def device_ha1s(secret: str, username: str, realm: str) -> dict[str, str]:
    """One HA1 per algorithm in :data:`DIGEST_ALGORITHMS`, for the store at creation."""
    return {alg: device_ha1(secret, username, realm, alg) for alg in DIGEST_ALGORITHMS}


# --- nonces ---------------------------------------------------------------------------------


class NonceStatus(fastenum.Enum):
    """What :meth:`NonceIssuer.status` found."""

    VALID = "valid"
    STALE = "stale"  # ours, but too old: challenge again with stale=true
    INVALID = "invalid"  # not ours (forged, another realm or key, from the future)


_TS_LEN = 8
_SALT_LEN = 8
_MAC_LEN = 16
_NONCE_LEN = _TS_LEN + _SALT_LEN + _MAC_LEN


class NonceIssuer:
    """Stateless HMAC nonces with expiry, plus the ``nc`` replay table (see the module doc).

    Args:
        key: at least 16 random bytes; a new key (e.g. per process start) invalidates every
            nonce issued before, which only costs each device one more 401.
        lifetime: seconds a nonce is accepted; older ones are STALE.
        max_tracked: (username, nonce) pairs whose highest ``nc`` is remembered.
        max_skew: seconds a nonce may seem to come from the future before it is INVALID.

    ``now`` must come from one clock for the key's life (the driver's wall or monotonic clock).
    """

    def __init__(
        self,
        key: bytes,
        *,
        lifetime: float = 300.0,
        max_tracked: int = 10_000,
        max_skew: float = 5.0,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the nonce key needs at least 16 bytes")
        if lifetime <= 0 or max_tracked < 1:
            raise ValueError("lifetime and max_tracked must be positive")
        self._key = key
        self.lifetime = lifetime
        self.max_tracked = max_tracked
        self.max_skew = max_skew
        # (username, nonce) -> (highest nc, nonce timestamp in ms); first use first.
        self._highest: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._floor_ms: int | None = None  # nonces with ts <= this are no longer accepted

    def __repr__(self) -> str:
        return (f"NonceIssuer(lifetime={self.lifetime}, tracked={len(self._highest)}/"
                f"{self.max_tracked})")

    def _mac(self, head: bytes, realm: str) -> bytes:
        return hmac.new(self._key, head + realm.encode("utf-8"), hashlib.sha256).digest()[
            :_MAC_LEN]

    def issue(self, realm: str, now: float) -> str:
        """A new nonce for ``realm``, valid from ``now`` for ``lifetime`` seconds."""
        ts_ms = math.floor(now * 1000)
        head = ts_ms.to_bytes(_TS_LEN, "big", signed=True) + secrets.token_bytes(_SALT_LEN)
        raw = head + self._mac(head, realm)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @staticmethod
    def _decode(nonce: str) -> tuple[int, bytes, bytes] | None:
        if not nonce.isascii() or len(nonce) > 64:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _NONCE_LEN:
            return None
        head, mac = raw[:_TS_LEN + _SALT_LEN], raw[_TS_LEN + _SALT_LEN:]
        return int.from_bytes(raw[:_TS_LEN], "big", signed=True), head, mac

    def status(self, nonce: str, realm: str, now: float) -> NonceStatus:
        """Whether ``nonce`` is one we issued for ``realm`` and is still fresh at ``now``."""
        decoded = self._decode(nonce)
        if decoded is None:
            return NonceStatus.INVALID
        ts_ms, head, mac = decoded
        if not hmac.compare_digest(mac, self._mac(head, realm)):
            return NonceStatus.INVALID
        now_ms = math.floor(now * 1000)
        if ts_ms > now_ms + self.max_skew * 1000:
            return NonceStatus.INVALID
        if now_ms - ts_ms > self.lifetime * 1000:
            return NonceStatus.STALE
        return NonceStatus.VALID

    def accept_nc(self, nonce: str, username: str, nc: int, now: float) -> bool:
        """Record ``nc`` for (``username``, ``nonce``) if it is higher than any seen before.

        Call only for a nonce that :meth:`status` found VALID and credentials that matched.
        Returns False for a replayed or reordered ``nc`` and for a nonce that may have been
        evicted from the table (answer ``stale=true``).
        """
        decoded = self._decode(nonce)
        if decoded is None or nc < 1:
            return False
        ts_ms = decoded[0]
        self._forget_expired(now)
        key = (username, nonce)
        seen = self._highest.get(key)
        if seen is None:
            if self._floor_ms is not None and ts_ms <= self._floor_ms:
                return False
        elif nc <= seen[0]:
            return False
        self._highest[key] = (nc, ts_ms)
        while len(self._highest) > self.max_tracked:
            _, (_, evicted_ts) = self._highest.popitem(last=False)
            if self._floor_ms is None or evicted_ts > self._floor_ms:
                self._floor_ms = evicted_ts
        return True

    def _forget_expired(self, now: float) -> None:
        limit_ms = math.floor((now - self.lifetime) * 1000)
        while self._highest:
            key = next(iter(self._highest))
            if self._highest[key][1] >= limit_ms:
                break
            del self._highest[key]

    @property
    def tracked(self) -> int:
        """How many (username, nonce) pairs the replay table holds."""
        return len(self._highest)


# --- bindings -------------------------------------------------------------------------------


class SourceLike(Protocol):
    """Where a request came from; ``sipis.sip.transport.Source`` fits as it is."""

    @property
    def transport(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def flow(self) -> object | None: ...


@attrs.frozen
class SourceInfo:
    """A plain :class:`SourceLike` (tests, or drivers without a transport ``Source``)."""

    transport: str  # "udp" | "tcp" | "tls"
    host: str
    port: int
    flow: object | None = None


BindingKey: TypeAlias = tuple[str, ...]


@attrs.frozen
class DeviceBinding:
    """One registered contact of a device.

    Attributes:
        instance_id: the push instance (the authenticated digest username, the AOR user).
        contact: the Contact URI: the Request-URI of INVITEs and MESSAGEs sent to the device.
        source: ``(host, port, transport)`` the REGISTER came from: where to send (NAT).
        flow: the TCP/TLS flow it came on (prefer it while open), None for UDP.
        expires_at: when the binding lapses (clock of ``now``).
        call_id, cseq: of the REGISTER that last wrote it (§10.3 step 7 ordering).
        instance_urn: ``+sip.instance`` (RFC 5626), without quotes and angle brackets.
        reg_id: RFC 5626 ``reg-id`` when given together with ``+sip.instance``.
        registered_at: when the REGISTER that last wrote it arrived.
    """

    instance_id: str
    contact: URI
    source: tuple[str, int, str]
    flow: object | None
    expires_at: float
    call_id: str
    cseq: int
    instance_urn: str | None = None
    reg_id: int | None = None
    registered_at: float = 0.0

    @property
    def host(self) -> str:
        """Source address to send to."""
        return self.source[0]

    @property
    def port(self) -> int:
        """Source port to send to (the ``rport``)."""
        return self.source[1]

    @property
    def transport(self) -> str:
        """Transport the REGISTER came over (``"udp"``, ``"tcp"``, ``"tls"``)."""
        return self.source[2]

    @property
    def key(self) -> BindingKey:
        """What identifies this binding among the instance's (see the module rules)."""
        return _binding_key(self.contact, self.instance_urn, self.reg_id)

    def remaining(self, now: float) -> int:
        """Whole seconds left, for ``expires`` in a 200 (never negative)."""
        return max(0, math.ceil(self.expires_at - now - 1e-9))


class BindingChangeKind(fastenum.Enum):
    """What happened to a binding."""

    ADDED = "added"  # a new contact registered
    REFRESHED = "refreshed"  # an existing one re-registered (maybe from a new address/flow)
    REMOVED = "removed"  # the device removed it (Expires: 0 or ``*``)
    EXPIRED = "expired"  # it lapsed
    DROPPED = "dropped"  # its flow closed, or the instance was wiped

    @property
    def reachable(self) -> bool:
        """True for ADDED/REFRESHED: the device just proved it is there; wake held calls."""
        return self in (BindingChangeKind.ADDED, BindingChangeKind.REFRESHED)


@attrs.frozen
class BindingChange:
    """One change of the binding table (the driver's ``on_registered`` notifications)."""

    kind: BindingChangeKind
    binding: DeviceBinding


def _uri_key(uri: URI) -> tuple[str, ...]:
    # RFC 3261 §19.1.4, simplified: scheme, user and port exact, host case-insensitive, and
    # the parameters that change where the URI leads.
    return (
        uri.scheme,
        uri.user or "",
        uri.host.lower(),
        str(uri.port or ""),
        (uri.transport or ""),
        (uri.param("maddr") or "").lower(),
    )


def _binding_key(contact: URI, instance_urn: str | None, reg_id: int | None) -> BindingKey:
    if instance_urn is not None and reg_id is not None:
        return ("outbound", instance_urn, str(reg_id))
    return ("uri", *_uri_key(contact))


class DeviceBindings:
    """The live device bindings, by instance. Only the registrar and the driver change it."""

    def __init__(self) -> None:
        self._by_instance: dict[str, dict[BindingKey, DeviceBinding]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_instance.values())

    def __repr__(self) -> str:
        return f"DeviceBindings(instances={len(self._by_instance)}, bindings={len(self)})"

    def live(self, instance_id: str, now: float) -> list[DeviceBinding]:
        """Unexpired bindings of ``instance_id``, most recently registered first."""
        found = [b for b in self._by_instance.get(instance_id, {}).values() if b.expires_at > now]
        return sorted(found, key=lambda b: b.registered_at, reverse=True)

    def of(self, instance_id: str) -> dict[BindingKey, DeviceBinding]:
        """A copy of the instance's bindings by key, expired ones included."""
        return dict(self._by_instance.get(instance_id, {}))

    def replace(self, instance_id: str, bindings: dict[BindingKey, DeviceBinding]) -> None:
        """Set the instance's bindings at once (the registrar's atomic commit)."""
        if bindings:
            self._by_instance[instance_id] = dict(bindings)
        else:
            self._by_instance.pop(instance_id, None)

    def expire(self, now: float, instance_id: str | None = None) -> list[BindingChange]:
        """Drop bindings whose ``expires_at`` is not after ``now`` (one instance, or all)."""
        ids = [instance_id] if instance_id is not None else list(self._by_instance)
        changes: list[BindingChange] = []
        for iid in ids:
            table = self._by_instance.get(iid)
            if not table:
                continue
            for key, binding in list(table.items()):
                if binding.expires_at <= now:
                    del table[key]
                    changes.append(BindingChange(BindingChangeKind.EXPIRED, binding))
            if not table:
                del self._by_instance[iid]
        return changes

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` of all bindings, for the driver's timer; None if empty."""
        times = [b.expires_at for t in self._by_instance.values() for b in t.values()]
        return min(times, default=None)

    def remove_flow(self, flow: object) -> list[BindingChange]:
        """A TCP/TLS flow closed: its bindings can no longer be reached (RFC 5626 §5.3)."""
        changes: list[BindingChange] = []
        for iid in list(self._by_instance):
            table = self._by_instance[iid]
            for key, binding in list(table.items()):
                if binding.flow is not None and binding.flow == flow:
                    del table[key]
                    changes.append(BindingChange(BindingChangeKind.DROPPED, binding))
            if not table:
                del self._by_instance[iid]
        return changes

    def remove_instance(self, instance_id: str) -> list[BindingChange]:
        """The instance is wiped: forget all its bindings."""
        table = self._by_instance.pop(instance_id, {})
        return [BindingChange(BindingChangeKind.DROPPED, b) for b in table.values()]


# --- the registrar --------------------------------------------------------------------------


@attrs.frozen
class RegisterResult:
    """The answer to one REGISTER and what it changed.

    ``instance_id`` is the authenticated instance (None when unauthenticated): the device
    was heard from. ``changes`` lists ADDED/REFRESHED/REMOVED bindings and any that expired
    on the way; hand held calls to bindings whose ``kind.reachable`` is true.
    """

    response: SipResponse
    changes: list[BindingChange]
    instance_id: str | None = None


class _Refusal(Exception):
    """Abort a REGISTER with this response (internal control flow only)."""

    def __init__(self, status: int, reason: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason
        self.headers = headers


@attrs.frozen
class _ContactRequest:
    address: Address
    expires: int
    instance_urn: str | None
    reg_id: int | None

    @property
    def key(self) -> BindingKey:
        return _binding_key(self.address.uri, self.instance_urn, self.reg_id)


class DeviceRegistrar:
    """RFC 3261 §10.3 registrar for devices, with digest from stored HA1 (see the module doc).

    Args:
        realm: the device digest realm.
        nonce_issuer: makes and checks nonces, and tracks ``nc``.
        ha1_lookup: (instance id, ``"MD5"``/``"SHA-256"``) → stored HA1, or None.
        bindings: the table to maintain (a new one by default); ``self.bindings``.
        min_expires: shorter non-zero expiries → 423.
        max_expires: longer ones are capped.
        default_expires: when the REGISTER names none (capped by ``max_expires``).
        max_contacts: live bindings allowed per instance.
    """

    def __init__(
        self,
        realm: str,
        *,
        nonce_issuer: NonceIssuer,
        ha1_lookup: Callable[[str, str], str | None],
        bindings: DeviceBindings | None = None,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        max_contacts: int = 5,
    ) -> None:
        if not 0 < min_expires <= max_expires:
            raise ValueError("need 0 < min_expires <= max_expires")
        self.realm = realm
        self.nonce_issuer = nonce_issuer
        self._ha1_lookup = ha1_lookup
        self.bindings = bindings if bindings is not None else DeviceBindings()
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = min(max(default_expires, min_expires), max_expires)
        self.max_contacts = max_contacts

    def __repr__(self) -> str:
        return f"DeviceRegistrar(realm={self.realm!r}, bindings={self.bindings!r})"

    def handle_register(self, request: SipRequest, source: SourceLike,
                        now: float) -> RegisterResult:
        """Answer one REGISTER (after the endpoint's transaction layer) and update bindings.

        Args:
            request: the REGISTER, with the endpoint's ``received``/``rport`` on its top Via.
            source: where it came from (address, transport, flow).
            now: the current time (the clock of every ``expires_at``).

        Returns:
            The response to send and the binding changes (empty unless it was a 200).
            Never raises for anything a peer can send.

        Raises:
            ValueError: ``request`` is not a REGISTER (caller bug).
        """
        if request.method != "REGISTER":
            raise ValueError("handle_register takes REGISTER requests only")
        instance_id: str | None = None
        try:
            self._check_require(request)
            instance_id, stale = self._authenticate(request, now)
            if instance_id is None:
                return RegisterResult(self._challenge(request, now, stale=stale), [])
            self._check_aor(request, instance_id)
            return self._update(request, source, instance_id, now)
        except _Refusal as refusal:
            response = self._respond(request, refusal.status, refusal.reason)
            for name, value in refusal.headers:
                response.headers.add(name, value)
            return RegisterResult(response, [], instance_id)

    # -- steps ----------------------------------------------------------------------------

    def _respond(self, request: SipRequest, status: int,
                 reason: str | None = None) -> SipResponse:
        try:
            return make_response(request, status, reason, to_tag=new_tag())
        except SipParseError:  # pragma: no cover - parsed requests have a valid To
            return make_response(request, status, reason)

    @staticmethod
    def _check_require(request: SipRequest) -> None:
        unsupported = [opt for opt in request.headers.get_list("Require")
                       if opt.lower() not in SUPPORTED_OPTIONS]
        if unsupported:
            raise _Refusal(420, None, (("Unsupported", ", ".join(unsupported)),))

    def _authenticate(self, request: SipRequest, now: float) -> tuple[str | None, bool]:
        """(username, stale): the authenticated instance id, or None and whether a matching
        response failed only on its nonce (stale or replayed ``nc``)."""
        stale = False
        issuer = self.nonce_issuer

        def accept(creds: Credentials) -> bool:
            nonlocal stale
            status = issuer.status(creds.nonce, self.realm, now)
            if status is NonceStatus.STALE:
                stale = True
            if status is not NonceStatus.VALID:
                return False
            if not _digest_uri_matches(creds.uri, request.uri):
                return False
            nc = creds.nonce_count
            if nc is None or not issuer.accept_nc(creds.nonce, creds.username, nc, now):
                stale = True
                return False
            return True

        for value in request.headers.get_all("Authorization"):
            username = verify_authorization_ha1(
                value,
                method=request.method,
                ha1_lookup=self._ha1_lookup,
                realm=self.realm,
                body=request.body,
                algorithms=DIGEST_ALGORITHMS,
                accept=accept,
            )
            if username is not None:
                return username, False
        return None, stale

    def _challenge(self, request: SipRequest, now: float, *, stale: bool) -> SipResponse:
        response = self._respond(request, 401)
        nonce = self.nonce_issuer.issue(self.realm, now)
        for algorithm in DIGEST_ALGORITHMS:
            response.headers.add(
                "WWW-Authenticate",
                make_challenge(self.realm, nonce, algorithm=algorithm, stale=stale),
            )
        return response

    @staticmethod
    def _check_aor(request: SipRequest, instance_id: str) -> None:
        try:
            user = request.to.uri.user
        except SipParseError:  # pragma: no cover - parsed requests have a valid To
            user = None
        if user != instance_id:
            raise _Refusal(403, "Forbidden (To does not match the credentials)")

    def _expires_header(self, request: SipRequest) -> int | None:
        value = request.headers.get("Expires")
        if value is None or not _DIGITS.fullmatch(value.strip()):
            return None  # absent or malformed: the default applies (RFC 3261 §20.19)
        return int(value.strip())

    def _parse_contacts(self, request: SipRequest) -> list[_ContactRequest] | None:
        """The Contacts to apply; None for ``*``; [] for a query. Raises ``_Refusal``."""
        raw = request.headers.get_list("Contact")
        header_expires = self._expires_header(request)
        if any(value.strip() == "*" for value in raw):
            if len(raw) != 1 or header_expires != 0:
                raise _Refusal(400, "Bad Request (Contact: * needs Expires: 0 and nothing else)")
            return None
        contacts: list[_ContactRequest] = []
        with_reg_id = 0
        for value in raw:
            try:
                address = Address.parse(value)
            except SipParseError:
                raise _Refusal(400, "Bad Request (malformed Contact)") from None
            if address.uri.scheme not in ("sip", "sips"):
                raise _Refusal(400, "Bad Request (Contact must be a SIP URI)")
            instance_urn = _instance_urn(address)
            reg_id = _reg_id(address) if instance_urn is not None else None
            if reg_id is not None:
                with_reg_id += 1
            param = address.param("expires")
            if param is not None and _DIGITS.fullmatch(param):
                expires = int(param)
            elif header_expires is not None:
                expires = header_expires
            else:
                expires = self.default_expires
            contacts.append(_ContactRequest(address, expires, instance_urn, reg_id))
        if with_reg_id > 1:
            raise _Refusal(400, "Bad Request (more than one Contact with reg-id)")
        for contact in contacts:
            if 0 < contact.expires < self.min_expires:
                raise _Refusal(423, None, (("Min-Expires", str(self.min_expires)),))
        return contacts

    def _update(self, request: SipRequest, source: SourceLike, instance_id: str,
                now: float) -> RegisterResult:
        contacts = self._parse_contacts(request)
        stored = self.bindings.of(instance_id)
        # Lapsed bindings count as absent; they leave the table only if this REGISTER
        # commits, so that a refused request changes nothing.
        current = {k: b for k, b in stored.items() if b.expires_at > now}
        changes = [BindingChange(BindingChangeKind.EXPIRED, b)
                   for b in stored.values() if b.expires_at <= now]
        call_id = request.call_id
        cseq = request.cseq.seq
        updated = dict(current)
        applied: list[BindingChange] = []

        def in_order(existing: DeviceBinding) -> bool:
            return existing.call_id != call_id or cseq > existing.cseq

        if contacts is None:  # Contact: * — remove everything, if the order allows
            if not all(in_order(b) for b in current.values()):
                raise _Refusal(500, "Server Internal Error (CSeq out of order)")
            applied = [BindingChange(BindingChangeKind.REMOVED, b) for b in current.values()]
            updated = {}
        else:
            src = (source.host, source.port, source.transport.lower())
            for contact in contacts:
                key = contact.key
                existing = updated.get(key)
                if existing is not None and not in_order(existing):
                    raise _Refusal(500, "Server Internal Error (CSeq out of order)")
                if contact.expires == 0:
                    if existing is not None:
                        del updated[key]
                        applied.append(BindingChange(BindingChangeKind.REMOVED, existing))
                    continue
                binding = DeviceBinding(
                    instance_id=instance_id,
                    contact=contact.address.uri,
                    source=src,
                    flow=source.flow,
                    expires_at=now + min(contact.expires, self.max_expires),
                    call_id=call_id,
                    cseq=cseq,
                    instance_urn=contact.instance_urn,
                    reg_id=contact.reg_id,
                    registered_at=now,
                )
                updated[key] = binding
                kind = (BindingChangeKind.REFRESHED if key in current
                        else BindingChangeKind.ADDED)
                applied = [c for c in applied if c.binding.key != key]
                applied.append(BindingChange(kind, binding))
            if len(updated) > self.max_contacts:
                raise _Refusal(403, "Forbidden (too many contacts)")
        self.bindings.replace(instance_id, updated)
        response = self._respond(request, 200)
        for binding in self.bindings.live(instance_id, now):
            response.headers.add("Contact", _contact_value(binding, now))
        if contacts and any(c.reg_id is not None for c in contacts):
            response.headers.add("Require", "outbound")
        response.headers.add("Supported", "outbound")
        return RegisterResult(response, changes + applied, instance_id)


def _digest_uri_matches(digest_uri: str, request_uri: URI) -> bool:
    """The credentials' ``uri`` names the Request-URI (RFC 7616 §3.4.6), parameters aside."""
    try:
        uri = URI.parse(digest_uri)
    except SipParseError:
        return False
    return (uri.scheme, uri.user, uri.host.lower(), uri.port) == (
        request_uri.scheme, request_uri.user, request_uri.host.lower(), request_uri.port)


def _instance_urn(address: Address) -> str | None:
    value = address.param("+sip.instance")
    if value is None:
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value or None


def _reg_id(address: Address) -> int | None:
    value = address.param("reg-id")
    if value is None:
        return None
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= 2**31 - 1:
        raise _Refusal(400, "Bad Request (invalid reg-id)")
    return int(value)


def _contact_value(binding: DeviceBinding, now: float) -> str:
    params: list[tuple[str, str | None]] = []
    if binding.instance_urn is not None:
        params.append(("+sip.instance", f'"<{binding.instance_urn}>"'))
    if binding.reg_id is not None:
        params.append(("reg-id", str(binding.reg_id)))
    params.append(("expires", str(binding.remaining(now))))
    return str(Address(binding.contact, None, tuple(params)))
