"""In-memory :class:`~sipis.store.base.Store` for the unit tests of other layers.

Same contract as the SQLite store (Conflict on a taken id or contact token, NotFound, whole
record replace, StoreError after ``close()``), without persistence or encryption; every field,
the device realm and HA1s included, comes back as stored. For convenience it is usable before
``open()``. Python strings cannot be zeroed, so a "wipe" here only forgets the record.
"""

from __future__ import annotations

import attrs
import trio

from sipis.store.errors import Conflict, NotFound, StoreError
from sipis.store.models import InstanceRecord, RegistrationStatus


class MemoryStore:
    """Records in two dicts (by id, by contact token). Each call yields once to the scheduler,
    like a real store would, so tests see the same interleavings."""

    def __init__(self, records: list[InstanceRecord] | None = None) -> None:
        self._by_id: dict[str, InstanceRecord] = {}
        self._by_token: dict[str, str] = {}
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

    async def delete(self, instance_id: str) -> bool:
        await self._enter()
        old = self._by_id.pop(instance_id, None)
        if old is None:
            return False
        del self._by_token[old.contact_token]
        return True

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
