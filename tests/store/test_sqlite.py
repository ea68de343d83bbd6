"""The store contract (SQLite and in-memory), and SQLite's at-rest guarantees.

The wipe tests read the raw bytes of the database, ``-wal`` and ``-shm`` files and look for
every byte string a wiped instance left behind: ciphertexts, plaintexts (device HA1s among
them), tokens and id.
"""

from __future__ import annotations

import os
import random
import secrets
import sqlite3
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import sipis.store.sqlite as sqlite_mod
from sipis.store.base import Store
from sipis.store.crypto import KeyRing, make_verifier
from sipis.store.errors import Conflict, CryptoError, NotFound, SchemaError, StoreError
from sipis.store.memory import MemoryStore
from sipis.store.models import InstanceRecord, RegistrationStatus
from sipis.store.sqlite import SCHEMA_VERSION, SqliteStore

T0 = 1_700_000_000.0
N_CHURN = 150
# With SQLite 3.40 this seed's workload leaves 17 wiped values (password and device HA1 blobs
# among them) in the file when the scrub is only secure_delete + wal_checkpoint(TRUNCATE),
# without VACUUM.
CHURN_SEED = 37


def make_record(n: int, *, rng: random.Random | None = None, **changes: Any) -> InstanceRecord:
    """A record whose secrets and tokens are random, so they can be searched for in files."""
    def token_hex(size: int) -> str:
        return rng.randbytes(size).hex() if rng else secrets.token_hex(size)

    rec = InstanceRecord(
        id=f"inst-{n:04d}-{token_hex(8)}",
        secret_verifier=make_verifier(f"secret-{n}"),
        app="com.example.phone",
        aor=f"sip:user{n}@sip.example.net",
        username=f"user{n}",
        password=f"Pw{n}-{token_hex(12)}",
        registrar="sip:sip.example.net;transport=tcp",
        outbound_proxy=None,
        expires=600,
        push_provider="apns",
        push_token=token_hex(32),
        push_environment="production",
        contact_token=f"ct-{token_hex(14)}",
        instance_urn=f"urn:uuid:{uuid.UUID(token_hex(16))}",
        lifetime=3 * 86400,
        created_at=T0 + n,
        last_heard_at=T0 + n,
        expires_at=T0 + n + 3 * 86400,
        device_realm="sipis.example.org",
        device_ha1={"MD5": token_hex(16), "SHA-256": token_hex(32)},
    )
    return attrs.evolve(rec, **changes)


FULL_STATUS = RegistrationStatus(
    state="backoff", last_error="503 Service Unavailable", next_attempt_at=T0 + 61.25,
    granted_expires=300, last_registered_at=T0 - 0.5,
)


def raw_bytes(db: Path) -> bytes:
    """Everything on disk for this database: main file, WAL and shared-memory index."""
    out = b""
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db}{suffix}")
        if p.exists():
            out += p.read_bytes()
    return out


Blobs = tuple[bytes, bytes, bytes]


def stored_blobs(db: Path, instance_id: str) -> Blobs:
    """The password, push token and device HA1 ciphertexts as stored (read by a second
    connection); the HA1 one is ``b""`` when the column is NULL."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT password_blob, push_token_blob, device_ha1_blob FROM instances WHERE id = ?",
            (instance_id,),
        ).fetchone()
    finally:
        conn.close()
    assert row is not None
    return bytes(row[0]), bytes(row[1]), bytes(row[2] or b"")


def traces(rec: InstanceRecord, blobs: Blobs) -> dict[str, bytes]:
    """Byte strings that must not survive a wipe of ``rec``: whole values and fragments."""
    pw_blob, pt_blob, ha1_blob = blobs
    assert ha1_blob, "make_record gives every instance HA1s"
    return {
        "password": rec.password.encode(),
        "push_token": rec.push_token.encode(),
        "password_blob": pw_blob,
        "password_blob[12:28]": pw_blob[12:28],
        "password_blob tag": pw_blob[-16:],
        "push_token_blob": pt_blob,
        "push_token_blob[40:56]": pt_blob[40:56],
        "device_ha1_blob": ha1_blob,
        "device_ha1_blob[30:46]": ha1_blob[30:46],
        "device_ha1_blob tag": ha1_blob[-16:],
        **{f"device_ha1 {alg}": ha1.encode() for alg, ha1 in rec.device_ha1.items()},
        "contact_token": rec.contact_token.encode(),
        "id": rec.id.encode(),
    }


def found(data: bytes, needles: dict[str, bytes]) -> list[str]:
    return [name for name, needle in needles.items() if needle in data]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sipis.db"


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing.ephemeral()


@pytest.fixture
async def sqlite_store(db_path: Path, keyring: KeyRing) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(db_path, keyring)
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Store]:
    s: Store = SqliteStore(db_path, KeyRing.ephemeral()) if request.param == "sqlite" \
        else MemoryStore()
    await s.open()
    yield s
    await s.close()


# -- the contract, for both stores --------------------------------------------------------------


async def test_every_field_round_trips(store: Store) -> None:
    """What is inserted comes back equal, by id and by contact token, with every field."""
    full = make_record(1, outbound_proxy="sip:proxy.example.net;lr", push_environment=None,
                       registration=FULL_STATUS, password="pässwörd ☎ \"'\\",
                       secret_verifier=bytes(range(256)))
    bare = make_record(2, registrar=None, outbound_proxy=None, push_environment=None,
                       push_provider="fcm", device_realm="", device_ha1={})
    await store.insert(full)
    await store.insert(bare)
    assert await store.get(full.id) == full
    assert await store.get(bare.id) == bare
    assert await store.get_by_contact_token(full.contact_token) == full
    assert await store.list_all() == [full, bare]
    assert await store.count() == 2
    got = await store.get(full.id)
    assert type(got.created_at) is float
    assert type(got.expires) is int
    assert type(got.registration.granted_expires) is int
    assert dict(got.device_ha1) == dict(full.device_ha1)
    assert (await store.get(bare.id)).device_ha1 == {}


async def test_duplicate_id_or_contact_token_is_a_conflict(store: Store) -> None:
    """A second instance with a taken id or contact token is refused; the first is unchanged."""
    first = make_record(1)
    await store.insert(first)
    with pytest.raises(Conflict, match="id"):
        await store.insert(make_record(2, id=first.id))
    with pytest.raises(Conflict, match="contact token"):
        await store.insert(make_record(3, contact_token=first.contact_token))
    assert await store.list_all() == [first]


async def test_unknown_instance_is_not_found(store: Store) -> None:
    """Reads and updates of an unknown instance raise NotFound; delete answers False."""
    with pytest.raises(NotFound):
        await store.get("nope")
    with pytest.raises(NotFound):
        await store.get_by_contact_token("nope")
    with pytest.raises(NotFound):
        await store.replace(make_record(1))
    with pytest.raises(NotFound):
        await store.set_registration("nope", FULL_STATUS)
    assert await store.delete("nope") is False


async def test_replace_overwrites_the_whole_record(store: Store) -> None:
    """replace stores every field of the new record, including a new contact token."""
    rec = make_record(1)
    await store.insert(rec)
    new = make_record(9, id=rec.id, registration=FULL_STATUS)
    await store.replace(new)
    assert await store.get(rec.id) == new
    assert await store.get_by_contact_token(new.contact_token) == new
    with pytest.raises(NotFound):
        await store.get_by_contact_token(rec.contact_token)


async def test_replace_onto_another_instances_contact_token_is_a_conflict(store: Store) -> None:
    """Two instances can never share a contact token, also through replace."""
    a, b = make_record(1), make_record(2)
    await store.insert(a)
    await store.insert(b)
    with pytest.raises(Conflict):
        await store.replace(attrs.evolve(b, contact_token=a.contact_token))
    assert await store.get(b.id) == b


async def test_set_registration_changes_only_the_status(store: Store) -> None:
    """set_registration replaces the status and leaves the rest alone."""
    rec = make_record(1)
    await store.insert(rec)
    await store.set_registration(rec.id, FULL_STATUS)
    assert await store.get(rec.id) == attrs.evolve(rec, registration=FULL_STATUS)


async def test_set_registrations_writes_a_batch_and_skips_unknown_ids(store: Store) -> None:
    """The keeper's batch: each known instance gets its own status, unknown ids are skipped
    and not counted, and the rest of each record is left alone."""
    recs = [make_record(n) for n in range(1, 4)]
    for rec in recs:
        await store.insert(rec)
    statuses = [attrs.evolve(FULL_STATUS, granted_expires=600 + n) for n in range(3)]
    items = [(rec.id, status) for rec, status in zip(recs, statuses, strict=True)]
    assert await store.set_registrations([*items[:2], ("nope", FULL_STATUS), items[2]]) == 3
    for rec, status in zip(recs, statuses, strict=True):
        assert await store.get(rec.id) == attrs.evolve(rec, registration=status)
    assert await store.set_registrations([]) == 0


async def test_delete_removes_the_instance(store: Store) -> None:
    """After delete, the instance is gone by id and by token; a second delete says False."""
    a, b = make_record(1), make_record(2)
    await store.insert(a)
    await store.insert(b)
    assert await store.delete(a.id) is True
    assert await store.delete(a.id) is False
    with pytest.raises(NotFound):
        await store.get(a.id)
    with pytest.raises(NotFound):
        await store.get_by_contact_token(a.contact_token)
    assert await store.list_all() == [b]
    await store.insert(make_record(3, contact_token=a.contact_token))  # the token is free again


async def test_list_all_is_oldest_first(store: Store) -> None:
    """list_all orders by creation time."""
    recs = [make_record(n) for n in (5, 1, 3)]
    for rec in recs:
        await store.insert(rec)
    assert [r.created_at for r in await store.list_all()] == [T0 + 1, T0 + 3, T0 + 5]


async def test_closed_store_refuses_calls(store: Store) -> None:
    """After close, every call raises StoreError; closing again is harmless."""
    await store.close()
    await store.close()
    with pytest.raises(StoreError):
        await store.get("x")
    with pytest.raises(StoreError):
        await store.insert(make_record(1))


async def test_concurrent_inserts_are_all_stored(store: Store) -> None:
    """Inserts from many trio tasks at once are all stored."""
    recs = [make_record(n) for n in range(40)]
    async with trio.open_nursery() as nursery:
        for rec in recs:
            nursery.start_soon(store.insert, rec)
    assert await store.count() == 40
    assert sorted(await store.list_all(), key=lambda r: r.id) == sorted(recs, key=lambda r: r.id)


def test_both_stores_satisfy_the_store_protocol(tmp_path: Path) -> None:
    """Type-level check (mypy): both implementations are Stores."""
    stores: list[Store] = [SqliteStore(tmp_path / "x.db", KeyRing.ephemeral()), MemoryStore()]
    assert len(stores) == 2


# -- SQLite: files, durability, schema ----------------------------------------------------------


async def test_reopen_after_close_keeps_everything(db_path: Path, keyring: KeyRing) -> None:
    """Inserts, replaces, status changes and deletes are all there after a reopen."""
    store = SqliteStore(db_path, keyring)
    await store.open()
    a, b, c = make_record(1), make_record(2), make_record(3)
    for rec in (a, b, c):
        await store.insert(rec)
    a2 = attrs.evolve(a, password="new-password-1", last_heard_at=T0 + 99)
    await store.replace(a2)
    await store.set_registration(b.id, FULL_STATUS)
    await store.delete(c.id)
    await store.close()

    again = SqliteStore(db_path, keyring)
    await again.open()
    try:
        assert await again.list_all() == [a2, attrs.evolve(b, registration=FULL_STATUS)]
    finally:
        await again.close()


async def test_fresh_database_gets_the_latest_schema_version(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """A new file is created and migrated to SCHEMA_VERSION, in WAL mode."""
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_database_from_a_newer_sipis_is_refused(db_path: Path, keyring: KeyRing) -> None:
    """A user_version above what the code knows raises SchemaError and leaves it untouched."""
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SqliteStore(db_path, keyring)
    with pytest.raises(SchemaError, match="newer sipis"):
        await store.open()
    assert not store.is_open
    with pytest.raises(StoreError):
        await store.count()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    finally:
        conn.close()


async def test_version_1_database_is_migrated_in_place(db_path: Path, keyring: KeyRing) -> None:
    """A database written by the schema-1 code opens as the latest version, its rows intact,
    with no device realm and no HA1s (such instances cannot register a device); new rows get
    their HA1s stored."""
    old = make_record(1, device_realm="", device_ha1={})
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in sqlite_mod.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    row: dict[str, Any] = {
        name: getattr(old, name) for name in (
            "id", "secret_verifier", "app", "aor", "username", "registrar", "outbound_proxy",
            "expires", "push_provider", "push_environment", "contact_token", "instance_urn",
            "lifetime", "created_at", "last_heard_at", "expires_at")
    }
    row["password_key"], row["password_blob"] = keyring.encrypt(
        old.password, aad=f"{old.id}:password".encode())
    row["push_token_key"], row["push_token_blob"] = keyring.encrypt(
        old.push_token, aad=f"{old.id}:push_token".encode())
    row["reg_state"] = "registering"
    conn.execute(f"INSERT INTO instances ({', '.join(row)}) "
                 f"VALUES ({', '.join(':' + c for c in row)})", row)
    conn.close()

    store = SqliteStore(db_path, keyring)
    await store.open()
    try:
        got = await store.get(old.id)
        assert got == old
        assert got.device_realm == ""
        assert got.device_ha1 == {}
        new = make_record(2)
        await store.insert(new)
        assert await store.list_all() == [old, new]
    finally:
        await store.close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    finally:
        conn.close()


async def test_reopen_does_not_migrate_again(db_path: Path, keyring: KeyRing) -> None:
    """Opening a current database keeps its version and data."""
    for _ in range(2):
        store = SqliteStore(db_path, keyring)
        await store.open()
        await store.close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


async def test_a_file_that_is_not_a_database_is_a_store_error(
    db_path: Path, keyring: KeyRing
) -> None:
    """Garbage in the database file gives StoreError, not a sqlite3 exception."""
    db_path.write_bytes(b"this is not sqlite" * 100)
    os.chmod(db_path, 0o600)
    with pytest.raises(StoreError, match="SQLite") as info:
        await SqliteStore(db_path, keyring).open()
    assert not isinstance(info.value.__cause__, StoreError)
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_missing_directory_is_a_store_error(tmp_path: Path, keyring: KeyRing) -> None:
    """A database path in a missing directory gives StoreError."""
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path / "no" / "such.db", keyring).open()


async def test_database_files_are_private(db_path: Path, keyring: KeyRing) -> None:
    """The database, -wal and -shm files are mode 0600 even under a lax umask."""
    old_umask = os.umask(0o002)
    try:
        store = SqliteStore(db_path, keyring)
        await store.open()
        await store.insert(make_record(1))
        for suffix in ("", "-wal", "-shm"):
            assert mode_of(Path(f"{db_path}{suffix}")) == 0o600, suffix
        await store.close()
    finally:
        os.umask(old_umask)


async def test_existing_database_open_to_others_is_tightened(
    db_path: Path, keyring: KeyRing
) -> None:
    """An existing database file readable by others is set to 0600 on open."""
    sqlite3.connect(db_path).close()
    os.chmod(db_path, 0o644)
    store = SqliteStore(db_path, keyring)
    await store.open()
    await store.close()
    assert mode_of(db_path) == 0o600


async def test_writes_are_committed_before_the_call_returns(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """Another connection sees an insert as soon as insert() has returned."""
    rec = make_record(1)
    await sqlite_store.insert(rec)
    stored_blobs(db_path, rec.id)  # asserts the row is visible


# -- SQLite: encryption at rest ------------------------------------------------------------------


def plaintexts(rec: InstanceRecord) -> list[bytes]:
    """Every secret of ``rec`` as it would look stored in clear (HA1s as hex and as bytes)."""
    out = [rec.password.encode(), rec.push_token.encode()]
    for ha1 in rec.device_ha1.values():
        out += [ha1.encode(), ha1.upper().encode(), bytes.fromhex(ha1)]
    return out


async def test_password_push_token_and_device_ha1s_are_encrypted_at_rest(
    db_path: Path, keyring: KeyRing
) -> None:
    """The plaintext password, push token and device HA1s appear in no database file, open or
    closed; the device realm is stored in clear (it is public)."""
    store = SqliteStore(db_path, keyring)
    await store.open()
    recs = [make_record(n) for n in range(5)]
    for rec in recs:
        await store.insert(rec)
    for rec in recs:
        data = raw_bytes(db_path)
        assert not [p for p in plaintexts(rec) if p in data]
        pw_blob, _, ha1_blob = stored_blobs(db_path, rec.id)
        assert pw_blob in data  # what is there is the ciphertext
        assert ha1_blob in data
    await store.close()
    data = raw_bytes(db_path)
    for rec in recs:
        assert not [p for p in plaintexts(rec) if p in data]
    assert recs[0].contact_token.encode() in data  # the search does find plain values
    assert b"sipis.example.org" in data


async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(
    db_path: Path, keyring: KeyRing
) -> None:
    """The AAD binds a ciphertext to its instance: swapping passwords between rows fails."""
    store = SqliteStore(db_path, keyring)
    await store.open()
    a, b = make_record(1), make_record(2)
    await store.insert(a)
    await store.insert(b)
    await store.close()
    conn = sqlite3.connect(db_path)
    blob_a = conn.execute("SELECT password_blob FROM instances WHERE id = ?", (a.id,)).fetchone()
    conn.execute("UPDATE instances SET password_blob = ? WHERE id = ?", (blob_a[0], b.id))
    conn.commit()
    conn.close()
    await store.open()
    try:
        assert await store.get(a.id) == a
        with pytest.raises(CryptoError, match="password") as info:
            await store.get(b.id)
        assert a.password not in str(info.value)
    finally:
        await store.close()


async def test_a_device_ha1_blob_moved_to_another_row_does_not_decrypt(
    db_path: Path, keyring: KeyRing
) -> None:
    """The HA1 ciphertext is bound to its instance too (AAD "<id>:device_ha1")."""
    store = SqliteStore(db_path, keyring)
    await store.open()
    a, b = make_record(1), make_record(2)
    await store.insert(a)
    await store.insert(b)
    await store.close()
    conn = sqlite3.connect(db_path)
    blob_a = conn.execute("SELECT device_ha1_blob FROM instances WHERE id = ?", (a.id,)).fetchone()
    conn.execute("UPDATE instances SET device_ha1_blob = ? WHERE id = ?", (blob_a[0], b.id))
    conn.commit()
    conn.close()
    await store.open()
    try:
        assert await store.get(a.id) == a
        with pytest.raises(CryptoError, match="device_ha1") as info:
            await store.get(b.id)
        assert not [ha1 for ha1 in a.device_ha1.values() if ha1 in str(info.value)]
    finally:
        await store.close()


async def test_records_under_an_old_key_decrypt_after_a_key_is_added(tmp_path: Path) -> None:
    """Key rotation: after key B is appended, key-A records still read; new ones use B."""
    key_file = tmp_path / "keys"
    ring_a = KeyRing.generate_file(key_file)
    db = tmp_path / "sipis.db"
    store = SqliteStore(db, ring_a)
    await store.open()
    old = make_record(1)
    await store.insert(old)
    await store.close()

    new_key = KeyRing.add_key_to_file(key_file)
    store = SqliteStore(db, KeyRing.load(key_file))
    await store.open()
    try:
        assert await store.get(old.id) == old
        new = make_record(2)
        await store.insert(new)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        keys = {row[0]: row[1:] for row in conn.execute(
            "SELECT id, password_key, push_token_key, device_ha1_key FROM instances")}
        conn.close()
        assert keys == {old.id: (ring_a.active_key_id,) * 3, new.id: (new_key,) * 3}
    finally:
        await store.close()


async def test_rekey_moves_every_value_to_the_active_key(tmp_path: Path) -> None:
    """After rekey(), the old key can be dropped and its ciphertexts are gone from the files."""
    key_file = tmp_path / "keys"
    ring_a = KeyRing.generate_file(key_file)
    db = tmp_path / "sipis.db"
    store = SqliteStore(db, ring_a)
    await store.open()
    recs = [make_record(n) for n in range(4)]
    recs.append(make_record(4, device_realm="", device_ha1={}))  # NULL HA1: nothing to move
    for rec in recs:
        await store.insert(rec)
    old_blobs = [stored_blobs(db, rec.id) for rec in recs[:4]]
    await store.close()

    KeyRing.add_key_to_file(key_file)
    ring_ab = KeyRing.load(key_file)
    store = SqliteStore(db, ring_ab)
    await store.open()
    assert await store.rekey() == 5
    assert await store.rekey() == 0
    data = raw_bytes(db)
    for pw_blob, pt_blob, ha1_blob in old_blobs:
        assert pw_blob not in data
        assert pt_blob not in data
        assert ha1_blob not in data
    await store.close()

    ring_b_only = KeyRing([(ring_ab.active_key_id, _key_of(key_file, ring_ab.active_key_id))])
    store = SqliteStore(db, ring_b_only)
    await store.open()
    try:
        assert await store.list_all() == recs
    finally:
        await store.close()


def _key_of(key_file: Path, key_id: str) -> bytes:
    import base64

    for line in key_file.read_text().splitlines():
        if line.startswith(f"{key_id} "):
            return base64.b64decode(line.split()[1])
    raise AssertionError(key_id)


async def test_unchanged_secrets_keep_their_ciphertext_on_replace(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """A replace that only moves timestamps writes no new copy of the password."""
    rec = make_record(1)
    await sqlite_store.insert(rec)
    before = stored_blobs(db_path, rec.id)
    await sqlite_store.replace(attrs.evolve(rec, last_heard_at=T0 + 500, expires_at=T0 + 900))
    assert stored_blobs(db_path, rec.id) == before


# -- SQLite: wiping -------------------------------------------------------------------------------


async def test_delete_leaves_no_trace_in_db_wal_or_shm(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """After each of several deletes, nothing of the wiped instances is in any file,
    while the instances still stored are (so the search itself works)."""
    recs = [make_record(n) for n in range(12)]
    for rec in recs:
        await sqlite_store.insert(rec)
    blobs = {rec.id: stored_blobs(db_path, rec.id) for rec in recs}
    wiped: list[InstanceRecord] = []
    for index in (3, 0, 11, 7, 5, 6):
        rec = recs[index]
        assert await sqlite_store.delete(rec.id)
        wiped.append(rec)
        data = raw_bytes(db_path)
        for gone in wiped:
            assert found(data, traces(gone, blobs[gone.id])) == [], gone.id
        for kept in recs:
            if kept not in wiped:
                assert blobs[kept.id][0] in data
                assert kept.contact_token.encode() in data
    assert os.path.getsize(f"{db_path}-wal") < 4096 * 2  # only the flags page was written since


async def test_replace_with_a_new_password_leaves_no_trace_of_the_old_one(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """A changed password or push token: the old plaintext and ciphertext are gone at once."""
    recs = [make_record(n) for n in range(6)]
    for rec in recs:
        await sqlite_store.insert(rec)
    rec = recs[2]
    old = traces(rec, stored_blobs(db_path, rec.id))
    new = attrs.evolve(rec, password="brand-new-password-42", push_token=secrets.token_hex(32))
    await sqlite_store.replace(new)
    data = raw_bytes(db_path)
    kept = ("id", "contact_token", "device_ha1")  # unchanged: still stored
    assert found(data, {k: v for k, v in old.items() if not k.startswith(kept)}) == []
    assert await sqlite_store.get(rec.id) == new
    assert stored_blobs(db_path, rec.id)[0] in data


async def test_replace_with_new_device_ha1s_leaves_no_trace_of_the_old_ones(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """New HA1s (a new realm): the old HA1s and their ciphertext are gone when replace returns;
    the password and push token ciphertexts are kept as they were."""
    recs = [make_record(n) for n in range(6)]
    for rec in recs:
        await sqlite_store.insert(rec)
    rec = recs[3]
    before = stored_blobs(db_path, rec.id)
    old = {k: v for k, v in traces(rec, before).items() if k.startswith("device_ha1")}
    new = attrs.evolve(rec, device_realm="new.example.org",
                       device_ha1={"MD5": secrets.token_hex(16), "SHA-256": secrets.token_hex(32)})
    await sqlite_store.replace(new)
    assert found(raw_bytes(db_path), old) == []
    assert await sqlite_store.get(rec.id) == new
    after = stored_blobs(db_path, rec.id)
    assert after[:2] == before[:2]
    assert after[2] != before[2]


async def test_replace_dropping_the_device_ha1s_stores_null_and_wipes_them(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    """A record replaced with no HA1s keeps no HA1 ciphertext at all; adding them back works."""
    recs = [make_record(n) for n in range(3)]
    for rec in recs:
        await sqlite_store.insert(rec)
    rec = recs[1]
    old = {k: v for k, v in traces(rec, stored_blobs(db_path, rec.id)).items()
           if k.startswith("device_ha1")}
    bare = attrs.evolve(rec, device_realm="", device_ha1={})
    await sqlite_store.replace(bare)
    assert found(raw_bytes(db_path), old) == []
    assert await sqlite_store.get(rec.id) == bare
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT device_ha1_key, device_ha1_blob, device_realm FROM instances"
                           " WHERE id = ?", (rec.id,)).fetchone()
    finally:
        conn.close()
    assert row == (None, None, "")
    await sqlite_store.replace(rec)
    assert await sqlite_store.get(rec.id) == rec


async def test_wipe_holds_under_churn(sqlite_store: SqliteStore, db_path: Path) -> None:
    """Many rows, status updates that resize rows (page splits and merges), password changes
    and deletes: no wiped or replaced secret survives anywhere. The workload is seeded: with
    secure_delete and a WAL checkpoint alone (no VACUUM), it leaves copies of wiped values
    behind, because b-tree rebalancing copies cells without zeroing where they were."""
    rng = random.Random(CHURN_SEED)
    recs = {n: make_record(n, rng=rng) for n in range(N_CHURN)}
    for rec in recs.values():
        await sqlite_store.insert(rec)
    blobs = {rec.id: stored_blobs(db_path, rec.id) for rec in recs.values()}
    must_be_gone: dict[str, bytes] = {}
    for _ in range(N_CHURN):
        n = rng.randrange(N_CHURN)
        error = "x" * rng.randrange(400) or None
        await sqlite_store.set_registration(recs[n].id, attrs.evolve(FULL_STATUS,
                                                                     last_error=error))
    for n in range(1, N_CHURN, 10):  # password changes
        old = recs[n]
        for name, needle in traces(old, blobs[old.id]).items():
            if name.startswith("password"):  # the push token is unchanged, so kept
                must_be_gone[f"{old.id} {name}"] = needle
        recs[n] = attrs.evolve(old, password=f"changed-{rng.randbytes(10).hex()}")
        await sqlite_store.replace(recs[n])
    doomed = rng.sample(list(recs.values()), N_CHURN // 2)
    for rec in doomed:
        assert await sqlite_store.delete(rec.id)
        for name, needle in traces(rec, blobs[rec.id]).items():
            must_be_gone[f"{rec.id} {name}"] = needle
        must_be_gone[f"{rec.id} current password"] = rec.password.encode()
    assert found(raw_bytes(db_path), must_be_gone) == []
    assert await sqlite_store.count() == N_CHURN - len(doomed)


async def test_concurrent_deletes_share_scrubs(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wipes that arrive together are covered by fewer VACUUMs than wipes."""
    calls: list[int] = []
    real_scrub: Callable[[sqlite3.Connection], bool] = sqlite_mod._scrub

    def counting_scrub(conn: sqlite3.Connection) -> bool:
        calls.append(1)
        return real_scrub(conn)

    monkeypatch.setattr(sqlite_mod, "_scrub", counting_scrub)
    recs = [make_record(n) for n in range(10)]
    for rec in recs:
        await sqlite_store.insert(rec)
    async with trio.open_nursery() as nursery:
        for rec in recs:
            nursery.start_soon(sqlite_store.delete, rec.id)
    assert await sqlite_store.count() == 0
    assert 1 <= len(calls) < 10


async def test_interrupted_wipe_is_finished_at_open(db_path: Path, keyring: KeyRing) -> None:
    """A delete committed without its scrub (a crash in between) is scrubbed by open()."""
    store = SqliteStore(db_path, keyring)
    await store.open()
    recs = [make_record(n) for n in range(8)]
    for rec in recs:
        await store.insert(rec)
    victim = recs[4]
    needles = traces(victim, stored_blobs(db_path, victim.id))
    await store.close()
    # What a crash right after the DELETE commit leaves: the row gone, the flag set, no scrub.
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA secure_delete = OFF")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM instances WHERE id = ?", (victim.id,))
    conn.execute("UPDATE store_flags SET value = 1 WHERE name = 'scrub_pending'")
    conn.execute("COMMIT")
    conn.close()
    assert found(raw_bytes(db_path), needles) != []  # the bytes really were still there

    await store.open()
    try:
        assert found(raw_bytes(db_path), needles) == []
        assert await store.count() == 7
    finally:
        await store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM store_flags").fetchone()[0] == 0
    conn.close()


async def test_cancelled_delete_still_wipes(
    sqlite_store: SqliteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled while its DELETE runs does not skip the scrub that follows it."""
    recs = [make_record(n) for n in range(5)]
    for rec in recs:
        await sqlite_store.insert(rec)
    victim = recs[1]
    needles = traces(victim, stored_blobs(db_path, victim.id))
    gate = threading.Event()
    in_delete = trio.Event()
    real_mapped = sqlite_mod._mapped
    calls = 0

    def gated_mapped(op: Callable[[sqlite3.Connection], Any], conn: sqlite3.Connection) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the DELETE: hold it until the caller has been cancelled
            trio.from_thread.run_sync(in_delete.set)
            gate.wait(5)
        return real_mapped(op, conn)

    monkeypatch.setattr(sqlite_mod, "_mapped", gated_mapped)
    scope = trio.CancelScope()

    async def wipe() -> None:
        with scope:
            await sqlite_store.delete(victim.id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wipe)
        await in_delete.wait()
        scope.cancel()
        gate.set()
    assert calls == 2  # the DELETE and its scrub
    with pytest.raises(NotFound):
        await sqlite_store.get(victim.id)
    assert found(raw_bytes(db_path), needles) == []


async def test_integrity_errors_other_than_duplicates_are_store_errors(
    sqlite_store: SqliteStore,
) -> None:
    """A record that breaks a NOT NULL column is a StoreError (a bug), not a Conflict."""
    with pytest.raises(StoreError) as info:
        await sqlite_store.insert(make_record(1, username=None))
    assert not isinstance(info.value, Conflict)
