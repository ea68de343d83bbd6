"""The ``Store`` protocol: async CRUD of push instances, implemented by SQLite and in memory.

Every method may raise :class:`~sipis.store.errors.StoreError` (closed store, I/O failure);
the more specific errors are listed per method. Records are frozen, so callers change them
with ``attrs.evolve`` and write them back with ``replace``.
"""

from __future__ import annotations

from typing import Protocol

from sipis.store.errors import Conflict, NotFound, StoreError
from sipis.store.models import InstanceRecord, RegistrationStatus

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

    async def delete(self, instance_id: str) -> bool:
        """Wipe the instance so that no copy of its credentials stays; False if it was absent."""

    async def count(self) -> int:
        """How many instances are stored."""
