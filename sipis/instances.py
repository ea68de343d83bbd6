"""Push instances: the one place that creates, changes and wipes them.

Why a service of its own: the HTTPS API, the lifetime sweeper, the admin CLI and (next) the call
layer's dead-token handling must all end an instance the same way — unREGISTER upstream, delete
from the store with the bytes really gone, forget it in memory, log one line with the reason.
Keeping that path in one class makes "wipes are real" checkable in one place.

Errors (what the API maps them to):

    InstanceError
    ├── ProviderRejected   the registrar refused the credentials (422, names its status)
    ├── ProviderTimeout    no REGISTER outcome within api.create_timeout (504)
    ├── ProviderUnreachable the registrar's name does not resolve (422)
    ├── NotAllowed         AOR domain or app outside the allow-lists (403)
    └── InvalidInstance    a value that passed the schema but not the policy (400)
    store.errors.NotFound  unknown instance id (404)
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from sipis.calls.device import device_ha1s
from sipis.registrar.binding import FailureKind
from sipis.registrar.keeper import RegistrationKeeper
from sipis.sip.errors import SipParseError
from sipis.sip.headers import URI
from sipis.store.base import Store
from sipis.store.crypto import check_verifier, make_verifier, new_secret
from sipis.store.errors import NotFound, StoreError
from sipis.store.models import InstanceRecord, RegistrationStatus

log = logging.getLogger(__name__)


class InstanceError(Exception):
    """Base of the errors the instance service raises to its callers."""


class ProviderRejected(InstanceError):
    """The provider answered the authenticated REGISTER with a final error: nothing is stored."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"provider rejected the registration: {status} {reason}")
        self.status = status
        self.reason = reason


class ProviderTimeout(InstanceError):
    """No REGISTER outcome arrived in time: nothing is stored."""


class NotAllowed(InstanceError):
    """The AOR domain or the app is not on the configured allow-list."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class InvalidInstance(InstanceError):
    """A field passed the schema but not policy (e.g. registrar URI unusable)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@attrs.frozen
class NewInstance:
    """A validated create request (api.schemas builds it from the JSON body)."""

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
    lifetime: int | None  # seconds; None = the configured default for the domain


@attrs.frozen
class InstanceUpdate:
    """A validated PATCH: each None field is left as it is."""

    push_token: str | None = attrs.field(default=None, repr=False)
    push_environment: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    lifetime: int | None = None


@attrs.frozen
class Created:
    """The outcome of a create: the stored record and the secret, shown to the app once."""

    record: InstanceRecord
    secret: str = attrs.field(repr=False)


@attrs.frozen
class DeviceInfo:
    """What the woken app needs to register to sipis (SPEC.md 201 body, "device")."""

    registrar: str
    username: str
    realm: str


class WipeReason:
    """Why an instance ended; the values appear in logs and (later) metrics."""

    DELETED = "deleted"
    EXPIRED = "expired"
    NOT_REGISTERED = "not-registered"
    TOKEN_INVALID = "push-token-invalid"  # noqa: S105 — a reason, not a credential
    ADMIN = "admin"


class InstanceServiceAPI(Protocol):
    """What the HTTPS API and the CLI may call."""

    async def create(self, new: NewInstance) -> Created: ...

    async def get(self, instance_id: str) -> InstanceRecord: ...

    async def authenticate(self, instance_id: str, secret: str) -> InstanceRecord:
        """The record if the secret matches (constant time); NotFound / Unauthorized otherwise."""
        ...

    async def update(self, instance_id: str, update: InstanceUpdate) -> InstanceRecord:
        """Apply a PATCH and count it as heard from the device (extends expiry)."""
        ...

    async def touch(self, instance_id: str) -> InstanceRecord:
        """Heard from the device: push expires_at out by the instance's lifetime."""
        ...

    async def wipe(self, instance_id: str, reason: str) -> bool:
        """The one wipe path: unREGISTER, delete for good, forget. False if it was unknown."""
        ...

    async def foreground(self, instance_id: str) -> InstanceRecord:
        """The app holds the registration itself: unREGISTER, keep the record."""
        ...

    async def background(self, instance_id: str) -> InstanceRecord:
        """The app went to the background: register again."""
        ...

    def registration_status(self, record: InstanceRecord) -> RegistrationStatus:
        """Live registration state (the keeper's view, fresher than the stored one)."""
        ...

    def device_info(self, record: InstanceRecord) -> DeviceInfo: ...


class Unauthorized(InstanceError):
    """The bearer secret does not match the instance (401)."""


# -- implementation ------------------------------------------------------------------------


@attrs.frozen
class DomainLifetime:
    """Lifetime policy of one AOR domain (seconds)."""

    default: float
    max: float


@attrs.frozen
class InstancePolicy:
    """What the service needs from ``lifetime``, ``api`` and ``sip`` config (SIGHUP swaps it)."""

    lifetime_default: float = 3 * 86400.0
    lifetime_max: float = 6 * 86400.0
    domains: Mapping[str, DomainLifetime] = attrs.Factory(dict)
    not_registered_max_age: float = 12 * 3600.0
    allowed_domains: tuple[str, ...] = ("*",)
    allowed_apps: tuple[str, ...] = ("*",)
    device_registrar: str = "sip:127.0.0.1:5060;transport=tcp"
    realm: str = "sipis"
    expiry_warnings: tuple[float, ...] = (12 * 3600.0, 3600.0)  # seconds before expires_at

    def lifetime_for(self, domain: str, asked: int | None) -> int:
        """The app's lifetime (or the default), capped by the domain's policy."""
        rule = self.domains.get(domain.lower())
        default = rule.default if rule else self.lifetime_default
        cap = min(rule.max, self.lifetime_max) if rule else self.lifetime_max
        wanted = float(asked) if asked is not None else default
        return int(min(max(wanted, 1.0), cap))


#: The sweeper yields to other tasks after this many instances.
SWEEP_SLICE = 2000


def allowed(value: str, patterns: Sequence[str]) -> bool:
    """Allow-list match: ``*`` any, ``*.example.com`` a subdomain, else exact (any case)."""
    value = value.lower()
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == "*" or pattern == value:
            return True
        if pattern.startswith("*.") and value.endswith(pattern[1:]):
            return True
    return False


def short_id(instance_id: str) -> str:
    """Instance ids in logs are shortened: enough to correlate, not to address."""
    return instance_id[:8]


class InstanceService:
    """Creates, changes and wipes push instances; see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        keeper: RegistrationKeeper,
        policy: InstancePolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keeper = keeper
        self.policy = policy
        self._clock = clock
        # id → (expires_at, created_at): what the sweeper needs, without decrypting every row.
        self._expiry: dict[str, tuple[float, float]] = {}
        self._handed_to_app: set[str] = set()
        self._locks: dict[str, trio.Lock] = {}
        # id → (device realm, algorithm → HA1): see device_ha1_cached.
        self._ha1_cache: dict[str, tuple[str, Mapping[str, str]]] = {}
        # Told (instance id, reason) after each wipe, whoever asked for it: the call driver
        # drops the device bindings, metrics count wipes by reason. Must not raise or block.
        self.wipe_listeners: list[Callable[[str, str], None]] = []
        # Sends the ``instance-expiring`` alert push (set by the daemon); None sends nothing.
        self.expiry_push: Callable[[InstanceRecord], Awaitable[None]] | None = None
        # id → (expires_at warned about, smallest offset warned): one push per offset per
        # expiry; an extension (heard from) moves expires_at and re-arms the warnings.
        self._warned: dict[str, tuple[float, float]] = {}
        # contact token → id and back (contact tokens never change): the INVITE path's lookup.
        self._by_token: dict[str, str] = {}
        self._token_of: dict[str, str] = {}

    # -- start-up and sweeping --------------------------------------------------------------

    async def load_all(self) -> int:
        """Re-register every live stored instance (the keeper's rate limit spreads them)."""
        records = await self._store.list_all()
        now = self._clock()
        kept = 0
        for record in records:
            self._expiry[record.id] = (record.expires_at, record.created_at)
            self._index_token(record)
            if record.expires_at <= now:
                await self.wipe(record.id, WipeReason.EXPIRED)
                continue
            self._cache_ha1(record)
            if record.registration.state == "unregistered":
                self._handed_to_app.add(record.id)  # the app holds it (foreground)
                continue
            self._keeper.adopt(record)
            kept += 1
        log.info("loaded instances=%d registering=%d", len(records), kept)
        return kept

    async def sweep(self) -> int:
        """Wipe every instance past its lifetime or unregistered past the max age."""
        now = self._clock()
        wiped = 0
        max_age = self.policy.not_registered_max_age
        for n, (instance_id, (expires_at, created_at)) in enumerate(list(self._expiry.items())):
            if n % SWEEP_SLICE == SWEEP_SLICE - 1:
                await trio.lowlevel.checkpoint()  # 100k instances: never hold the loop long
            reason = None
            if expires_at <= now:
                reason = WipeReason.EXPIRED
            elif instance_id not in self._handed_to_app and now - created_at >= max_age:
                kept = self._keeper.registered_since(instance_id)
                registered, last_ok = kept if kept is not None else (False, None)
                since = last_ok if last_ok is not None else created_at
                if not registered and now - since >= max_age:
                    reason = WipeReason.NOT_REGISTERED
            if reason is not None:
                if await self.wipe(instance_id, reason):
                    wiped += 1
                continue
            offset = self._warning_due(instance_id, expires_at, now)
            if offset is not None:
                await self._warn_expiring(instance_id, expires_at, offset)
        return wiped

    def _warning_due(self, instance_id: str, expires_at: float, now: float) -> float | None:
        """The offset of a warning due now and not yet sent for this expiry, if any."""
        due = [o for o in self.policy.expiry_warnings if expires_at - o <= now]
        if not due or self.expiry_push is None:
            return None
        offset = min(due)
        warned = self._warned.get(instance_id)
        if warned is not None and warned[0] == expires_at and warned[1] <= offset:
            return None
        return offset

    async def _warn_expiring(self, instance_id: str, expires_at: float, offset: float) -> None:
        """Send ``instance-expiring`` (SPEC.md "Lifetime"): the user can open the app and
        renew. Not when the instance was heard from after that warning point (a lifetime
        shorter than the offset): such a push would only be noise."""
        self._warned[instance_id] = (expires_at, offset)
        try:
            record = await self._store.get(instance_id)
        except NotFound:
            return
        if record.last_heard_at >= expires_at - offset or self.expiry_push is None:
            return
        log.info("instance=%s expires in %.0f s: instance-expiring push",
                 short_id(instance_id), max(0.0, expires_at - self._clock()))
        await self.expiry_push(record)

    async def run_sweeper(
        self,
        interval: Callable[[], float],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Sweep every ``interval()`` seconds until cancelled (interval may change on SIGHUP)."""
        task_status.started()
        while True:
            await trio.sleep(interval())
            try:
                await self.sweep()
            except StoreError:
                log.exception("lifetime sweep failed; trying again next interval")

    # -- the API's calls --------------------------------------------------------------------

    async def create(self, new: NewInstance) -> Created:
        aor = URI.parse(new.aor)
        if not allowed(aor.host, self.policy.allowed_domains):
            raise NotAllowed("sip.aor", f"the domain {aor.host!r} is not served here")
        if not allowed(new.app, self.policy.allowed_apps):
            raise NotAllowed("app", f"the app {new.app!r} is not served here")
        for field, value in (("sip.registrar", new.registrar),
                             ("sip.outbound_proxy", new.outbound_proxy)):
            if value is not None:
                try:
                    URI.parse(value)
                except SipParseError as exc:
                    raise InvalidInstance(field, str(exc)) from exc
        now = self._clock()
        lifetime = self.policy.lifetime_for(aor.host, new.lifetime)
        secret = new_secret()
        instance_id = _token(16)
        record = InstanceRecord(
            id=instance_id,
            secret_verifier=make_verifier(secret),
            app=new.app,
            aor=new.aor,
            username=new.username,
            password=new.password,
            registrar=new.registrar,
            outbound_proxy=new.outbound_proxy,
            expires=new.expires,
            push_provider=new.push_provider,
            push_token=new.push_token,
            push_environment=new.push_environment,
            contact_token=_token(18),
            instance_urn=f"urn:uuid:{uuid.uuid4()}",
            lifetime=lifetime,
            created_at=now,
            last_heard_at=now,
            expires_at=now + lifetime,
            registration=RegistrationStatus(state="registering"),
            device_realm=self.policy.realm,
            device_ha1=device_ha1s(secret, instance_id, self.policy.realm),
        )
        outcome = await self._keeper.register_first(record)
        if not outcome.registered:
            log.info("instance create refused domain=%s outcome=%r", aor.host, outcome.reason)
            if outcome.failure is FailureKind.RESOLVE:
                raise ProviderUnreachable(outcome.reason)
            if outcome.status is None:
                raise ProviderTimeout(outcome.reason)
            raise ProviderRejected(outcome.status, outcome.reason)
        record = attrs.evolve(record, registration=self._keeper.status(record.id)
                              or record.registration)
        try:
            with trio.CancelScope(shield=True):
                await self._store.insert(record)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._keeper.remove(record.id)
            raise
        self._expiry[record.id] = (record.expires_at, record.created_at)
        self._index_token(record)
        self._cache_ha1(record)
        log.info("instance=%s created app=%s domain=%s lifetime=%d", short_id(record.id),
                 record.app, aor.host, lifetime)
        return Created(record=record, secret=secret)

    async def get(self, instance_id: str) -> InstanceRecord:
        record = await self._store.get(instance_id)
        return attrs.evolve(record, registration=self.registration_status(record))

    async def authenticate(self, instance_id: str, secret: str) -> InstanceRecord:
        record = await self._store.get(instance_id)
        if not check_verifier(secret, record.secret_verifier):
            raise Unauthorized("the bearer secret does not match")
        return record

    async def update(self, instance_id: str, update: InstanceUpdate) -> InstanceRecord:
        async with self._lock(instance_id):
            record = await self._store.get(instance_id)
            changes: dict[str, object] = {}
            if update.push_token is not None:
                changes["push_token"] = update.push_token
            if update.push_environment is not None:
                changes["push_environment"] = update.push_environment
            if update.password is not None:
                changes["password"] = update.password
            if update.lifetime is not None:
                changes["lifetime"] = self.policy.lifetime_for(
                    URI.parse(record.aor).host, update.lifetime
                )
            record = attrs.evolve(record, **changes)  # type: ignore[arg-type]
            record = await self._heard_from(record)
            self._keeper.update_record(record)
        return attrs.evolve(record, registration=self.registration_status(record))

    async def touch(self, instance_id: str) -> InstanceRecord:
        async with self._lock(instance_id):
            record = await self._heard_from(await self._store.get(instance_id))
        return attrs.evolve(record, registration=self.registration_status(record))

    async def wipe(self, instance_id: str, reason: str) -> bool:
        """The one wipe path: unREGISTER, delete for good, forget; one log line."""
        async with self._lock(instance_id):
            with trio.CancelScope(shield=True):
                await self._keeper.remove(instance_id)
                deleted = await self._store.delete(instance_id)
            self._expiry.pop(instance_id, None)
            self._handed_to_app.discard(instance_id)
            self._ha1_cache.pop(instance_id, None)
            self._warned.pop(instance_id, None)
            token = self._token_of.pop(instance_id, None)
            if token is not None:
                self._by_token.pop(token, None)
        self._locks.pop(instance_id, None)
        if deleted:
            log.info("instance=%s wiped reason=%s", short_id(instance_id), reason)
            for listener in self.wipe_listeners:
                try:
                    listener(instance_id, reason)
                except Exception:
                    log.exception("instance=%s wipe listener failed", short_id(instance_id))
        return deleted

    async def foreground(self, instance_id: str) -> InstanceRecord:
        async with self._lock(instance_id):
            record = await self._heard_from(await self._store.get(instance_id))
            await self._keeper.remove(instance_id)
            status = RegistrationStatus(state="unregistered", last_error=None)
            await self._store.set_registration(instance_id, status)
            self._handed_to_app.add(instance_id)
        log.info("instance=%s handed to the app (foreground)", short_id(instance_id))
        return attrs.evolve(record, registration=status)

    async def background(self, instance_id: str) -> InstanceRecord:
        async with self._lock(instance_id):
            record = await self._heard_from(await self._store.get(instance_id))
            self._handed_to_app.discard(instance_id)
            self._keeper.adopt(record)
        log.info("instance=%s taken back (background)", short_id(instance_id))
        return attrs.evolve(record, registration=self.registration_status(record))

    def registration_status(self, record: InstanceRecord) -> RegistrationStatus:
        return self._keeper.status(record.id) or record.registration

    def _index_token(self, record: InstanceRecord) -> None:
        self._by_token[record.contact_token] = record.id
        self._token_of[record.id] = record.contact_token

    def kept_record_by_contact_token(self, token: str) -> InstanceRecord | None:
        """The instance a contact token names, from memory (no store read, no thread): the
        keeper's current record. None when the token is unknown or the instance is not kept
        (handed to the app): then the caller asks the store."""
        instance_id = self._by_token.get(token)
        return None if instance_id is None else self._keeper.record(instance_id)

    def counts_by_state(self) -> dict[str, int]:
        """Live instances by registration state as the API shows it (``sipis_instances``):
        instances handed to the app (foreground) count as unregistered."""
        counts: dict[str, int] = {}
        for instance_id in self._expiry:
            status = self._keeper.status(instance_id)
            state = ("unregistered" if instance_id in self._handed_to_app or status is None
                     else status.state)
            counts[state] = counts.get(state, 0) + 1
        return counts

    def device_info(self, record: InstanceRecord) -> DeviceInfo:
        return DeviceInfo(
            registrar=self.policy.device_registrar, username=record.id, realm=self.policy.realm
        )

    # -- the device registrar's digest lookups ------------------------------------------------

    async def ha1_lookup(self, instance_id: str, algorithm: str) -> str | None:
        """The stored device HA1 of ``instance_id`` for ``algorithm`` (``"MD5"``/``"SHA-256"``).

        None for an unknown instance, an algorithm without an HA1, or HA1s computed for another
        realm than the current ``policy.realm`` (``sip.public_host`` changed since the instance
        was made: its HA1s no longer verify anything). Raises StoreError if the store fails,
        so that the caller can answer 500 rather than a misleading 401.
        """
        try:
            record = await self._store.get(instance_id)
        except NotFound:
            return None
        if record.device_realm != self.policy.realm:
            return None
        return record.device_ha1.get(algorithm)

    def device_ha1_cached(self, instance_id: str, algorithm: str) -> str | None:
        """:meth:`ha1_lookup` from memory, for the device registrar's synchronous lookup.

        Filled at create and ``load_all`` and dropped by ``wipe``, so it holds exactly the live
        instances. Trade-off: the HA1s of every live instance stay in this process's memory, as
        the SIP passwords already do in the registration keeper; an HA1 only lets one register
        a device to sipis's own realm. Reading the store on each REGISTER would keep them out of
        memory but cannot be done from the sans-IO registrar.
        """
        entry = self._ha1_cache.get(instance_id)
        if entry is None or entry[0] != self.policy.realm:
            return None
        return entry[1].get(algorithm)

    # -- internals --------------------------------------------------------------------------

    def _lock(self, instance_id: str) -> trio.Lock:
        return self._locks.setdefault(instance_id, trio.Lock())

    def _cache_ha1(self, record: InstanceRecord) -> None:
        if record.device_ha1:
            self._ha1_cache[record.id] = (record.device_realm, record.device_ha1)

    async def _heard_from(self, record: InstanceRecord) -> InstanceRecord:
        now = self._clock()
        record = attrs.evolve(record, last_heard_at=now, expires_at=now + record.lifetime)
        await self._store.replace(record)
        self._expiry[record.id] = (record.expires_at, record.created_at)
        return record


class ProviderUnreachable(InstanceError):
    """The registrar's name did not resolve (RFC 3263 found no target): nothing is stored (422)."""


def _token(nbytes: int) -> str:
    """An unguessable URL- and SIP-user-safe token (base64url without padding) that never
    starts with "-", so that an id on a command line is never taken for an option."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if not token.startswith("-"):
            return token
