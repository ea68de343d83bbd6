"""The instance service stores device digest HA1s at creation and serves them to the registrar.

Lives beside the store tests because it checks what the service persists: the HA1s written by
``InstanceService.create`` must verify a digest that the app computes from its secret
(``DigestClient`` against ``verify_authorization_ha1``), survive a restart (``load_all``), and
disappear — from the store and from the in-memory cache — when the instance is wiped.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import attrs
import pytest

from sipis.calls.device import DIGEST_ALGORITHMS, device_ha1s, verify_authorization_ha1
from sipis.instances import InstancePolicy, InstanceService, NewInstance, WipeReason
from sipis.registrar.binding import Outcome
from sipis.registrar.keeper import RegistrationKeeper
from sipis.sip.digest import DigestClient, make_challenge, parse_challenge
from sipis.store.crypto import KeyRing
from sipis.store.memory import MemoryStore
from sipis.store.models import InstanceRecord, RegistrationStatus
from sipis.store.sqlite import SqliteStore

T0 = 1_790_000_000.0
REALM = "sipis.example.org"
NONCE = "bm9uY2UtZm9yLXRlc3Rz"
REQUEST_URI = "sip:sipis.example.org;transport=tcp"


class FakeKeeper:
    """Accepts every first REGISTER at once; remembers which instances it keeps."""

    def __init__(self) -> None:
        self.kept: set[str] = set()
        self.records: dict[str, InstanceRecord] = {}

    async def register_first(self, record: InstanceRecord) -> Outcome:
        self.kept.add(record.id)
        self.records[record.id] = record
        return Outcome(registered=True, status=200, reason="OK")

    def status(self, instance_id: str) -> RegistrationStatus | None:
        return None

    def registered_since(self, instance_id: str) -> tuple[bool, float | None] | None:
        return None

    def record(self, instance_id: str) -> InstanceRecord | None:
        return self.records.get(instance_id) if instance_id in self.kept else None

    def adopt(self, record: InstanceRecord, *, delay: float = 0.0) -> None:
        self.kept.add(record.id)

    async def remove(self, instance_id: str, *, wait: bool = True) -> None:
        self.kept.discard(instance_id)

    def update_record(self, record: InstanceRecord) -> None:
        pass


def new_instance() -> NewInstance:
    return NewInstance(
        app="com.example.phone", aor="sip:alice@sip.example.net", username="alice",
        password="sip-password-1", registrar=None, outbound_proxy=None, expires=600,
        push_provider="apns", push_token="ab" * 32, push_environment="production",
        lifetime=None,
    )


def make_service(store: MemoryStore | SqliteStore, *, now: float = T0) -> InstanceService:
    return InstanceService(
        store=store, keeper=cast(RegistrationKeeper, FakeKeeper()),
        policy=InstancePolicy(realm=REALM), clock=lambda: now,
    )


def authorization(username: str, secret: str, algorithm: str, realm: str = REALM) -> str:
    """What the woken app sends after a 401 offering ``algorithm``."""
    challenge = parse_challenge(make_challenge(realm, NONCE, algorithm=algorithm))
    return DigestClient(username, secret).authorize(challenge, method="REGISTER",
                                                    uri=REQUEST_URI)


def verify(header: str, lookup: Callable[[str, str], str | None]) -> str | None:
    return verify_authorization_ha1(header, method="REGISTER", ha1_lookup=lookup, realm=REALM)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "sipis.db", KeyRing.ephemeral())
    await store.open()
    yield store
    await store.close()


async def test_create_stores_ha1s_that_verify_a_digest_of_the_secret(
    sqlite_store: SqliteStore,
) -> None:
    """For each offered algorithm, the stored HA1 accepts the app's digest made from
    (username = instance id, password = secret), and refuses one made from a wrong secret."""
    service = make_service(sqlite_store)
    created = await service.create(new_instance())
    stored = await sqlite_store.get(created.record.id)
    assert stored.device_realm == REALM
    assert set(stored.device_ha1) == set(DIGEST_ALGORITHMS)
    assert dict(stored.device_ha1) == device_ha1s(created.secret, stored.id, REALM)
    fetched = {alg: await service.ha1_lookup(stored.id, alg) for alg in DIGEST_ALGORITHMS}
    for algorithm in DIGEST_ALGORITHMS:
        good = authorization(stored.id, created.secret, algorithm)
        assert verify(good, lambda user, alg: fetched[alg] if user == stored.id else None) \
            == stored.id
        assert verify(good, service.device_ha1_cached) == stored.id
        bad = authorization(stored.id, created.secret + "x", algorithm)
        assert verify(bad, service.device_ha1_cached) is None


async def test_ha1s_differ_per_instance() -> None:
    """Two instances never share an HA1 (each has its own id and secret)."""
    service = make_service(MemoryStore())
    a = await service.create(new_instance())
    b = await service.create(new_instance())
    assert set(a.record.device_ha1.values()).isdisjoint(b.record.device_ha1.values())
    assert verify(authorization(a.record.id, b.secret, "SHA-256"),
                  service.device_ha1_cached) is None


async def test_lookups_answer_none_for_unknown_instances_and_algorithms() -> None:
    """An unknown id or an algorithm with no stored HA1 gives None, not an error."""
    service = make_service(MemoryStore())
    created = await service.create(new_instance())
    assert await service.ha1_lookup("no-such-instance", "MD5") is None
    assert service.device_ha1_cached("no-such-instance", "MD5") is None
    assert await service.ha1_lookup(created.record.id, "SHA-512-256") is None
    assert service.device_ha1_cached(created.record.id, "SHA-512-256") is None


async def test_ha1s_of_another_realm_are_not_served() -> None:
    """After the realm (sip.public_host) changes, the old HA1s verify nothing."""
    service = make_service(MemoryStore())
    created = await service.create(new_instance())
    assert await service.ha1_lookup(created.record.id, "MD5") is not None
    service.policy = attrs.evolve(service.policy, realm="other.example.org")
    assert await service.ha1_lookup(created.record.id, "MD5") is None
    assert service.device_ha1_cached(created.record.id, "MD5") is None


async def test_wipe_drops_the_ha1s_from_cache_and_store(sqlite_store: SqliteStore) -> None:
    """Once wiped, neither lookup knows the instance, and the other instances still work."""
    service = make_service(sqlite_store)
    gone = await service.create(new_instance())
    kept = await service.create(new_instance())
    assert await service.wipe(gone.record.id, WipeReason.DELETED)
    for algorithm in DIGEST_ALGORITHMS:
        assert service.device_ha1_cached(gone.record.id, algorithm) is None
        assert await service.ha1_lookup(gone.record.id, algorithm) is None
        assert service.device_ha1_cached(kept.record.id, algorithm) is not None


async def test_load_all_fills_the_cache_for_live_instances_only(tmp_path: Path) -> None:
    """After a restart, load_all makes the live instances' HA1s available again; an expired
    instance (wiped at load) and one stored without HA1s (schema 1) get none."""
    keyring = KeyRing.ephemeral()
    store = SqliteStore(tmp_path / "sipis.db", keyring)
    await store.open()
    first = make_service(store)
    live = await first.create(new_instance())
    short = await first.create(attrs.evolve(new_instance(), lifetime=60))
    old_style = attrs.evolve(live.record, id="old-style", contact_token="ct-old",
                             device_realm="", device_ha1={})
    await store.insert(old_style)
    await store.close()

    store = SqliteStore(tmp_path / "sipis.db", keyring)
    await store.open()
    try:
        second = make_service(store, now=T0 + 120)
        assert second.device_ha1_cached(live.record.id, "SHA-256") is None  # not loaded yet
        await second.load_all()
        header = authorization(live.record.id, live.secret, "SHA-256")
        assert verify(header, second.device_ha1_cached) == live.record.id
        assert second.device_ha1_cached(short.record.id, "SHA-256") is None
        assert await second.ha1_lookup(short.record.id, "SHA-256") is None
        assert second.device_ha1_cached("old-style", "MD5") is None
        assert await second.ha1_lookup("old-style", "MD5") is None
    finally:
        await store.close()


async def test_create_logs_neither_secret_nor_ha1s(caplog: pytest.LogCaptureFixture) -> None:
    """The HA1s are password equivalents: no log line and no repr shows them."""
    caplog.set_level(logging.DEBUG)
    service = make_service(MemoryStore())
    created = await service.create(new_instance())
    text = caplog.text + repr(created) + repr(created.record)
    assert created.secret not in text
    for ha1 in created.record.device_ha1.values():
        assert ha1 not in text


async def test_every_wipe_tells_the_wipe_listeners_once_with_its_reason() -> None:
    """Whoever wipes (API DELETE, sweeper, dead token, CLI), the listeners hear (id, reason)
    once, after the instance is gone; a failing listener does not stop the others or the wipe;
    wiping an unknown instance tells nobody."""
    store = MemoryStore()
    service = make_service(store)
    heard: list[tuple[str, str, bool]] = []

    def broken(instance_id: str, reason: str) -> None:
        raise RuntimeError("listener bug")

    async def gone(instance_id: str) -> bool:
        return instance_id not in {r.id for r in await store.list_all()}

    service.wipe_listeners.append(broken)
    service.wipe_listeners.append(lambda i, r: heard.append((i, r, True)))
    created = await service.create(new_instance())
    assert await service.wipe(created.record.id, WipeReason.DELETED)
    assert heard == [(created.record.id, WipeReason.DELETED, True)]
    assert await gone(created.record.id)
    assert not await service.wipe(created.record.id, WipeReason.DELETED)
    assert len(heard) == 1


async def test_instance_expiring_pushes_go_out_12h_and_1h_before_once_each() -> None:
    """SPEC.md "Lifetime": the sweep sends one instance-expiring push when 12 h are left and
    one when 1 h is left, never twice for the same expiry; being heard from moves the expiry
    and re-arms them; the instance is wiped at its expiry."""
    now = [T0]
    store = MemoryStore()
    service = InstanceService(store=store, keeper=cast(RegistrationKeeper, FakeKeeper()),
                              policy=InstancePolicy(realm=REALM, lifetime_default=3 * 86400.0,
                                                    not_registered_max_age=30 * 86400.0),
                              clock=lambda: now[0])
    sent: list[tuple[str, float]] = []

    async def expiry_push(record: InstanceRecord) -> None:
        sent.append((record.id, record.expires_at - now[0]))

    service.expiry_push = expiry_push
    created = await service.create(new_instance())
    expires_at = created.record.expires_at
    for at in (T0 + 3600, expires_at - 13 * 3600, expires_at - 12 * 3600 + 1,
               expires_at - 11 * 3600, expires_at - 3599, expires_at - 60):
        now[0] = at
        assert await service.sweep() == 0
    assert [round(left) for _, left in sent] == [12 * 3600 - 1, 3599]
    now[0] = expires_at - 30 * 60
    await service.touch(created.record.id)  # heard from: a new expiry, warnings re-armed
    sent.clear()
    now[0] = service_expiry(service, created.record.id) - 12 * 3600
    await service.sweep()
    assert len(sent) == 1
    now[0] = service_expiry(service, created.record.id)
    assert await service.sweep() == 1  # wiped at expiry, no warning then


def service_expiry(service: InstanceService, instance_id: str) -> float:
    return service._expiry[instance_id][0]


async def test_no_instance_expiring_push_for_a_lifetime_shorter_than_the_warning() -> None:
    """An instance that lives 2 h gets the 1 h warning but not the 12 h one (it was heard
    from after that point: the push would be noise)."""
    now = [T0]
    service = InstanceService(store=MemoryStore(), keeper=cast(RegistrationKeeper, FakeKeeper()),
                              policy=InstancePolicy(realm=REALM,
                                                    not_registered_max_age=30 * 86400.0),
                              clock=lambda: now[0])
    sent: list[float] = []

    async def expiry_push(record: InstanceRecord) -> None:
        sent.append(record.expires_at - now[0])

    service.expiry_push = expiry_push
    created = await service.create(attrs.evolve(new_instance(), lifetime=7200))
    for at in (T0 + 1, T0 + 1800, T0 + 3601, T0 + 3700):
        now[0] = at
        await service.sweep()
    assert [round(x) for x in sent] == [3599]
    assert created.record.expires_at == T0 + 7200


def test_ids_and_contact_tokens_never_start_with_a_dash() -> None:
    """`sipis instances delete ID` must not read an id as an option (1 in 64 would)."""
    from sipis.instances import _token

    assert not any(_token(16).startswith("-") for _ in range(5000))


async def test_the_invite_path_finds_kept_instances_by_contact_token_in_memory() -> None:
    """kept_record_by_contact_token answers from memory for kept instances, None for unknown
    tokens and once the instance is wiped (then the driver asks the store)."""
    service = make_service(MemoryStore())
    created = await service.create(new_instance())
    token = created.record.contact_token
    found = service.kept_record_by_contact_token(token)
    assert found is not None and found.id == created.record.id
    assert service.kept_record_by_contact_token("nope") is None
    await service.wipe(created.record.id, WipeReason.DELETED)
    assert service.kept_record_by_contact_token(token) is None
