"""Held MESSAGEs and call records in the store (SQLite and in-memory), and SQLite's at-rest
guarantees for them: message text encrypted, gone from the files once delivered or purged, and
everything of an instance gone with its wipe."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipis.store.base import Store
from sipis.store.crypto import KeyRing
from sipis.store.errors import NotFound
from sipis.store.memory import MemoryStore
from sipis.store.models import CallRecord, HeldMessage
from sipis.store.sqlite import SqliteStore
from tests.store.test_sqlite import T0, make_record, raw_bytes


def make_message(instance_id: str, n: int = 0, *, text: str | None = None,
                 received_at: float = T0, retention: float = 7 * 86400) -> HeldMessage:
    return HeldMessage(
        id=secrets.token_hex(8), instance_id=instance_id, received_at=received_at + n,
        expires_at=received_at + n + retention, from_=f'"Bob" <sip:bob{n}@example.net>',
        to="<sip:alice@example.net>", content_type="text/plain;charset=utf-8",
        body=(text or f"secret text {secrets.token_hex(12)}").encode())


def make_call(instance_id: str, n: int = 0, *, outcome: str = "missed",
              ended_at: float = T0 + 30) -> CallRecord:
    return CallRecord(instance_id=instance_id, call=f"ref{n:04d}", sip_call_id=f"cid{n}@x",
                      from_uri=f"sip:bob{n}@example.net", from_name="Bob",
                      to_uri="sip:alice@example.net", started_at=T0 + n, ended_at=ended_at + n,
                      outcome=outcome)


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (SqliteStore(tmp_path / "sipis.db", KeyRing.ephemeral())
                if request.param == "sqlite" else MemoryStore())
    await s.open()
    yield s
    await s.close()


async def test_held_messages_come_back_oldest_first_and_drop_one_by_one(store: Store) -> None:
    rec = make_record(1)
    await store.insert(rec)
    msgs = [make_message(rec.id, n) for n in (2, 0, 1)]
    for msg in msgs:
        assert await store.hold_message(msg, max_per_instance=10)
    held = await store.held_messages(rec.id)
    assert held == sorted(msgs, key=lambda m: m.received_at)
    assert await store.drop_message(held[0].id)
    assert not await store.drop_message(held[0].id)
    assert await store.held_messages(rec.id) == held[1:]
    assert await store.held_messages("someone-else") == []


async def test_holding_stops_at_the_per_instance_maximum(store: Store) -> None:
    """A flood of MESSAGEs cannot fill the disk: past the maximum, nothing more is kept."""
    rec = make_record(1)
    await store.insert(rec)
    results = [await store.hold_message(make_message(rec.id, n), max_per_instance=3)
               for n in range(5)]
    assert results == [True, True, True, False, False]
    assert len(await store.held_messages(rec.id)) == 3


async def test_holding_for_an_unknown_instance_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.hold_message(make_message("nobody"), max_per_instance=3)


async def test_call_records_newest_first_limited_and_not_kept_for_unknown_instances(
    store: Store,
) -> None:
    rec = make_record(1)
    await store.insert(rec)
    outcomes = ["answered", "missed", "cancelled", "answered-elsewhere", "declined"]
    for n, outcome in enumerate(outcomes):
        await store.add_call_records([make_call(rec.id, n, outcome=outcome)])
    await store.add_call_records([make_call("gone", 9)])
    got = await store.call_records(rec.id)
    assert [r.outcome for r in got] == outcomes[::-1]
    assert got[0] == make_call(rec.id, 4, outcome="declined")
    assert len(await store.call_records(rec.id, limit=2)) == 2
    assert await store.call_records("gone") == []


async def test_purge_drops_expired_messages_and_old_records_only(store: Store) -> None:
    rec = make_record(1)
    await store.insert(rec)
    old = make_message(rec.id, 0, retention=60)
    new = make_message(rec.id, 1, retention=3600)
    for msg in (old, new):
        await store.hold_message(msg, max_per_instance=10)
    await store.add_call_records([make_call(rec.id, 0, ended_at=T0)])
    await store.add_call_records([make_call(rec.id, 1, ended_at=T0 + 1000)])
    dropped = await store.purge(now=T0 + 120, records_ended_before=T0 + 500)
    assert dropped == (1, 1)
    assert await store.held_messages(rec.id) == [new]
    assert [r.call for r in await store.call_records(rec.id)] == ["ref0001"]
    assert await store.purge(now=T0 + 120, records_ended_before=T0 + 500) == (0, 0)


async def test_wiping_an_instance_takes_its_messages_and_records(store: Store) -> None:
    a, b = make_record(1), make_record(2)
    for rec in (a, b):
        await store.insert(rec)
        await store.hold_message(make_message(rec.id), max_per_instance=10)
        await store.add_call_records([make_call(rec.id)])
    await store.delete(a.id)
    assert await store.held_messages(a.id) == []
    assert await store.call_records(a.id) == []
    assert len(await store.held_messages(b.id)) == 1
    assert len(await store.call_records(b.id)) == 1


# -- SQLite at rest -----------------------------------------------------------------------------


def message_blob(db: Path, message_id: str) -> bytes:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (blob,) = conn.execute("SELECT content_blob FROM messages WHERE id = ?",
                               (message_id,)).fetchone()
    finally:
        conn.close()
    return bytes(blob)


async def test_message_text_is_encrypted_and_scrubbed_after_delivery_purge_and_wipe(
    tmp_path: Path,
) -> None:
    """The text and sender never appear in clear in the files; once a message is dropped
    (delivered), purged or its instance wiped, not even its ciphertext is left."""
    db = tmp_path / "sipis.db"
    store = SqliteStore(db, KeyRing.ephemeral())
    await store.open()
    try:
        recs = [make_record(n) for n in range(3)]
        msgs = []
        for n, rec in enumerate(recs):
            await store.insert(rec)
            msg = make_message(rec.id, text=f"meet me at {secrets.token_hex(10)}",
                               retention=60 if n < 2 else 10**6)
            assert await store.hold_message(msg, max_per_instance=10)
            msgs.append((msg, message_blob(db, msg.id)))
        kept = make_message(recs[1].id, 5, retention=10**6)
        await store.hold_message(kept, max_per_instance=10)
        data = raw_bytes(db)
        for msg, _blob in msgs:
            assert msg.body not in data
            assert b"bob0@example.net" not in data
        # the first is delivered, the second purged, the third wiped with its instance
        assert await store.drop_message(msgs[0][0].id)
        assert await store.purge(now=T0 + 100, records_ended_before=0) == (1, 0)
        await store.delete(recs[2].id)
        assert await store.held_messages(recs[1].id) == [kept]
        data = raw_bytes(db)
        for msg, blob in msgs:
            assert blob not in data and blob[-16:] not in data, msg.id
            assert msg.id.encode() not in data
    finally:
        await store.close()


async def test_rekey_moves_held_messages_to_the_new_key(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    KeyRing.generate_file(key_file)
    db = tmp_path / "sipis.db"
    store = SqliteStore(db, KeyRing.load(key_file))
    await store.open()
    rec = make_record(1)
    await store.insert(rec)
    msg = make_message(rec.id)
    await store.hold_message(msg, max_per_instance=10)
    await store.close()
    KeyRing.add_key_to_file(key_file)
    ring = KeyRing.load(key_file)
    store = SqliteStore(db, ring)
    await store.open()
    try:
        assert await store.rekey() == 2  # the instance and its message
        KeyRing.drop_keys_from_file(key_file, keep=())  # what rotate-key does last
        only_new = KeyRing.load(key_file)
        assert only_new.key_ids == (ring.active_key_id,)
    finally:
        await store.close()
    store = SqliteStore(db, only_new)
    await store.open()
    try:
        assert await store.held_messages(rec.id) == [msg]
    finally:
        await store.close()

