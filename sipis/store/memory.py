"""In-memory :class:`~sipis.store.base.Store` for the unit tests of other layers.

Same contract as the SQLite store (Conflict on a taken id or contact token, NotFound, whole
record replace, StoreError after ``close()``), without persistence or encryption; every field,
the device realm and HA1s included, comes back as stored. For convenience it is usable before
``open()``. Python strings cannot be zeroed, so a "wipe" here only forgets the record.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from sipis.store.errors import Conflict, NotFound, StoreError
from sipis.store.models import CallRecord, HeldMessage, InstanceRecord, RegistrationStatus


class MemoryStore:
    """Records in two dicts (by id, by contact token). Each call yields once to the scheduler,
    like a real store would, so tests see the same interleavings."""

    def __init__(self, records: list[InstanceRecord] | None = None) -> None:
        self._by_id: dict[str, InstanceRecord] = {}
        self._by_token: dict[str, str] = {}
        self._messages: dict[str, HeldMessage] = {}
        self._records: dict[tuple[str, str], CallRecord] = {}
        self._closed = False
        for rec in records or ():
            self._add(rec)

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._by_id)} instances, open={self.is_open})"

    @property
    def is_open(self) -> bool:
        return not self._closed

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True

    async def insert(self, rec: InstanceRecord) -> None:
        await self._enter()
        self._add(rec)

    async def get(self, instance_id: str) -> InstanceRecord:
        await self._enter()
        try:
            return self._by_id[instance_id]
        except KeyError:
            raise NotFound("no such instance") from None

    async def get_by_contact_token(self, token: str) -> InstanceRecord:
        await self._enter()
        instance_id = self._by_token.get(token)
        if instance_id is None:
            raise NotFound("no instance has this contact token")
        return self._by_id[instance_id]

    async def list_all(self) -> list[InstanceRecord]:
        await self._enter()
        return sorted(self._by_id.values(), key=lambda r: (r.created_at, r.id))

    async def replace(self, rec: InstanceRecord) -> None:
        await self._enter()
        old = self._by_id.get(rec.id)
        if old is None:
            raise NotFound("no such instance")
        owner = self._by_token.get(rec.contact_token)
        if owner is not None and owner != rec.id:
            raise Conflict("an instance with this contact token is already stored")
        del self._by_token[old.contact_token]
        self._by_token[rec.contact_token] = rec.id
        self._by_id[rec.id] = rec

    async def set_registration(self, instance_id: str, status: RegistrationStatus) -> None:
        await self._enter()
        old = self._by_id.get(instance_id)
        if old is None:
            raise NotFound("no such instance")
        self._by_id[instance_id] = attrs.evolve(old, registration=status)

    async def set_registrations(
        self, items: Sequence[tuple[str, RegistrationStatus]],
    ) -> int:
        await self._enter()
        stored = 0
        for instance_id, status in items:
            old = self._by_id.get(instance_id)
            if old is not None:
                self._by_id[instance_id] = attrs.evolve(old, registration=status)
                stored += 1
        return stored

    async def delete(self, instance_id: str) -> bool:
        await self._enter()
        old = self._by_id.pop(instance_id, None)
        if old is None:
            return False
        del self._by_token[old.contact_token]
        self._messages = {k: m for k, m in self._messages.items() if m.instance_id != instance_id}
        self._records = {k: r for k, r in self._records.items() if k[0] != instance_id}
        return True

    async def hold_message(self, msg: HeldMessage, *, max_per_instance: int) -> bool:
        await self._enter()
        if msg.instance_id not in self._by_id:
            raise NotFound("no such instance")
        held = sum(1 for m in self._messages.values() if m.instance_id == msg.instance_id)
        if held >= max_per_instance:
            return False
        self._messages[msg.id] = msg
        return True

    async def held_messages(self, instance_id: str) -> list[HeldMessage]:
        await self._enter()
        return sorted((m for m in self._messages.values() if m.instance_id == instance_id),
                      key=lambda m: (m.received_at, m.id))

    async def drop_message(self, message_id: str) -> bool:
        await self._enter()
        return self._messages.pop(message_id, None) is not None

    async def add_call_records(self, records: Sequence[CallRecord]) -> None:
        await self._enter()
        for rec in records:
            if rec.instance_id in self._by_id:
                self._records[(rec.instance_id, rec.call)] = rec

    async def call_records(self, instance_id: str, *, limit: int = 500) -> list[CallRecord]:
        await self._enter()
        mine = [r for r in self._records.values() if r.instance_id == instance_id]
        return sorted(mine, key=lambda r: (-r.started_at, r.call))[:limit]

    async def purge(self, *, now: float, records_ended_before: float) -> tuple[int, int]:
        await self._enter()
        old_messages = [k for k, m in self._messages.items() if m.expires_at <= now]
        old_records = [k for k, r in self._records.items() if r.ended_at < records_ended_before]
        for key in old_messages:
            del self._messages[key]
        for rkey in old_records:
            del self._records[rkey]
        return len(old_messages), len(old_records)

    async def count(self) -> int:
        await self._enter()
        return len(self._by_id)

    async def _enter(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StoreError("the store is closed")

    def _add(self, rec: InstanceRecord) -> None:
        if rec.id in self._by_id:
            raise Conflict("an instance with this id is already stored")
        if rec.contact_token in self._by_token:
            raise Conflict("an instance with this contact token is already stored")
        self._by_id[rec.id] = rec
        self._by_token[rec.contact_token] = rec.id
