"""The ``Store`` protocol: async CRUD of push instances, implemented by SQLite and in memory.

Every method may raise :class:`~sipis.store.errors.StoreError` (closed store, I/O failure);
the more specific errors are listed per method. Records are frozen, so callers change them
with ``attrs.evolve`` and write them back with ``replace``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sipis.store.errors import Conflict, NotFound, StoreError
from sipis.store.models import CallRecord, HeldMessage, InstanceRecord, RegistrationStatus

__all__ = ["Conflict", "NotFound", "Store", "StoreError"]


class Store(Protocol):
    """Persistent home of :class:`InstanceRecord` s; each call is atomic and durable on return."""

    async def open(self) -> None:
        """Open (and create or migrate) the store. Raises SchemaError, CryptoError, StoreError."""

    async def close(self) -> None:
        """Release the store; later calls raise StoreError. Closing twice is harmless."""

    async def insert(self, rec: InstanceRecord) -> None:
        """Store a new instance. Raises Conflict if its id or contact token is taken."""

    async def get(self, instance_id: str) -> InstanceRecord:
        """The instance with this id. Raises NotFound."""

    async def get_by_contact_token(self, token: str) -> InstanceRecord:
        """The instance whose upstream Contact carries ``token``. Raises NotFound."""

    async def list_all(self) -> list[InstanceRecord]:
        """Every stored instance, oldest first."""

    async def replace(self, rec: InstanceRecord) -> None:
        """Overwrite the whole stored record with id ``rec.id``.

        A changed password, push token or set of device HA1s leaves no copy of the old value in
        the store.
        Raises NotFound, or Conflict if the new contact token belongs to another instance.
        """

    async def set_registration(self, instance_id: str, status: RegistrationStatus) -> None:
        """Replace only the registration status. Raises NotFound."""

    async def set_registrations(
        self, items: Sequence[tuple[str, RegistrationStatus]],
    ) -> int:
        """Replace many statuses at once (one transaction); unknown ids are skipped. Returns
        how many were stored."""

    async def delete(self, instance_id: str) -> bool:
        """Wipe the instance so that no copy of its credentials stays; False if it was absent."""

    async def count(self) -> int:
        """How many instances are stored."""

    async def hold_message(self, msg: HeldMessage, *, max_per_instance: int) -> bool:
        """Keep a MESSAGE for the device (encrypted); False if the instance holds the maximum
        already. Raises NotFound if the instance is gone."""

    async def held_messages(self, instance_id: str) -> list[HeldMessage]:
        """The messages held for an instance, oldest first."""

    async def drop_message(self, message_id: str) -> bool:
        """Forget a message for good (delivered); False if it was not held."""

    async def add_call_records(self, records: Sequence[CallRecord]) -> None:
        """Record finished calls (those of instances that are gone are dropped)."""

    async def call_records(self, instance_id: str, *, limit: int = 500) -> list[CallRecord]:
        """The instance's call records, newest first."""

    async def purge(self, *, now: float, records_ended_before: float) -> tuple[int, int]:
        """Drop expired messages and old call records: ``(messages, records)`` dropped."""
