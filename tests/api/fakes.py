"""An in-memory InstanceServiceAPI and API settings for the HTTPS API tests.

The fake keeps records in a dict, checks secrets like the real service (constant time), and
can be told how `create` should end: success, a provider rejection, a provider timeout, or a
hang (to exercise the API's own create_timeout). Every call is recorded in `calls` so tests
can check that authenticated requests count as heard from the device.
"""

from __future__ import annotations

import hmac
import itertools

import attrs
import trio

from sipis.config import ApiConfig, ListenAddress, RateConfig
from sipis.instances import (
    Created,
    DeviceInfo,
    InstanceUpdate,
    NewInstance,
    ProviderRejected,
    ProviderTimeout,
    Unauthorized,
)
from sipis.store.errors import NotFound
from sipis.store.models import CallRecord, InstanceRecord, RegistrationStatus

START_TIME = 1_790_000_000.0  # 2026-09-21T14:13:20Z
DEFAULT_LIFETIME = 3 * 86400
MAX_LIFETIME = 6 * 86400


def api_config(
    *,
    port: int = 0,
    allowed_domains: tuple[str, ...] = ("*",),
    allowed_apps: tuple[str, ...] = ("*",),
    max_body_bytes: int = 16384,
    per_minute: float = 10.0,
    burst: int = 10,
    create_timeout: float = 10.0,
) -> ApiConfig:
    """The real ApiConfig with the documented defaults, listening on a free loopback port."""
    return ApiConfig(
        listen=ListenAddress(host="127.0.0.1", port=port),
        allowed_domains=allowed_domains,
        allowed_apps=allowed_apps,
        max_body_bytes=max_body_bytes,
        create_rate=RateConfig(per_minute=per_minute, burst=burst),
        create_timeout=create_timeout,
    )


@attrs.define
class FakeInstanceService:
    """InstanceServiceAPI in memory. Set `create_error` / `create_hangs` to change `create`."""

    now: float = START_TIME
    create_error: Exception | None = None
    create_hangs: bool = False
    create_delay: float = 0.0
    fail_with: Exception | None = None  # raised by get-like calls, to test the 500 path
    records: dict[str, InstanceRecord] = attrs.Factory(dict)
    secrets: dict[str, str] = attrs.Factory(dict)
    foreground_ids: set[str] = attrs.Factory(set)
    calls: list[tuple[str, str]] = attrs.Factory(list)
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))

    async def create(self, new: NewInstance) -> Created:
        self.calls.append(("create", new.aor))
        if self.create_hangs:
            await trio.sleep_forever()
        await trio.sleep(self.create_delay)
        if self.create_error is not None:
            raise self.create_error
        record, secret = make_record(new, number=next(self._ids), now=self.now)
        instance_id = record.id
        self.records[instance_id] = record
        self.secrets[instance_id] = secret
        return Created(record=record, secret=secret)

    def _record(self, instance_id: str) -> InstanceRecord:
        if self.fail_with is not None:
            raise self.fail_with
        try:
            return self.records[instance_id]
        except KeyError:
            raise NotFound(instance_id) from None

    async def get(self, instance_id: str) -> InstanceRecord:
        return self._record(instance_id)

    async def authenticate(self, instance_id: str, secret: str) -> InstanceRecord:
        self.calls.append(("authenticate", instance_id))
        record = self._record(instance_id)
        if not hmac.compare_digest(self.secrets[instance_id].encode(), secret.encode()):
            raise Unauthorized("bad secret")
        return record

    def _heard(self, record: InstanceRecord) -> InstanceRecord:
        updated = attrs.evolve(
            record, last_heard_at=self.now, expires_at=self.now + record.lifetime
        )
        self.records[record.id] = updated
        return updated

    async def update(self, instance_id: str, update: InstanceUpdate) -> InstanceRecord:
        self.calls.append(("update", instance_id))
        record = self._record(instance_id)
        record = attrs.evolve(
            record,
            push_token=update.push_token or record.push_token,
            push_environment=update.push_environment or record.push_environment,
            password=update.password or record.password,
            lifetime=min(update.lifetime or record.lifetime, MAX_LIFETIME),
        )
        return self._heard(record)

    async def touch(self, instance_id: str) -> InstanceRecord:
        self.calls.append(("touch", instance_id))
        return self._heard(self._record(instance_id))

    async def wipe(self, instance_id: str, reason: str) -> bool:
        self.calls.append(("wipe:" + reason, instance_id))
        self.secrets.pop(instance_id, None)
        self.foreground_ids.discard(instance_id)
        return self.records.pop(instance_id, None) is not None

    async def foreground(self, instance_id: str) -> InstanceRecord:
        self.calls.append(("foreground", instance_id))
        record = self._heard(self._record(instance_id))
        self.foreground_ids.add(instance_id)
        return record

    async def background(self, instance_id: str) -> InstanceRecord:
        self.calls.append(("background", instance_id))
        record = self._heard(self._record(instance_id))
        self.foreground_ids.discard(instance_id)
        return record

    def registration_status(self, record: InstanceRecord) -> RegistrationStatus:
        if record.id in self.foreground_ids:
            return attrs.evolve(record.registration, state="unregistered", granted_expires=None)
        return record.registration

    def device_info(self, record: InstanceRecord) -> DeviceInfo:
        return DeviceInfo(
            registrar="sip:127.0.0.1:5060;transport=tcp", username=record.id, realm="127.0.0.1"
        )


@attrs.define
class FakeCallControl:
    """CallControl over a set of ringing (instance id, call ref) pairs; records every call.

    A decline ends the call (it stops ringing); progress leaves it ringing.
    """

    ringing: set[tuple[str, str]] = attrs.Factory(set)
    events: list[tuple[str, str, str]] = attrs.Factory(list)
    records: list[CallRecord] = attrs.Factory(list)

    async def call_records(self, instance_id: str) -> list[CallRecord]:
        self.events.append(("call_records", instance_id, ""))
        return [r for r in self.records if r.instance_id == instance_id]

    def progress(self, instance_id: str, call_ref: str) -> bool:
        self.events.append(("progress", instance_id, call_ref))
        return (instance_id, call_ref) in self.ringing

    def decline(self, instance_id: str, call_ref: str) -> bool:
        self.events.append(("decline", instance_id, call_ref))
        if (instance_id, call_ref) not in self.ringing:
            return False
        self.ringing.discard((instance_id, call_ref))
        return True


def make_record(new: NewInstance, *, number: int, now: float) -> tuple[InstanceRecord, str]:
    """The record (and secret) the fake service stores for `new`."""
    instance_id = f"inst{number:04d}"
    secret = f"secret-{number:04d}-abcdefghijklmnopqrstuvwxyz"
    lifetime = min(new.lifetime or DEFAULT_LIFETIME, MAX_LIFETIME)
    record = InstanceRecord(
        id=instance_id,
        secret_verifier=b"verifier-" + secret.encode(),
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
        contact_token=f"ct{number:04d}",
        instance_urn=f"urn:uuid:00000000-0000-4000-8000-{number:012d}",
        lifetime=lifetime,
        created_at=now,
        last_heard_at=now,
        expires_at=now + lifetime,
        registration=RegistrationStatus(
            state="registered",
            last_error=None,
            next_attempt_at=None,
            granted_expires=new.expires,
            last_registered_at=now,
        ),
    )
    return record, secret


def rejected(status: int = 403, reason: str = "Forbidden") -> ProviderRejected:
    return ProviderRejected(status, reason)


def timed_out() -> ProviderTimeout:
    return ProviderTimeout("no answer")
