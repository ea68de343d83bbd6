"""Errors of the store layer. No sqlite3 (or other driver) exception leaves ``sipis.store``.

::

    StoreError          the store failed (I/O, corrupt file, closed): log it, answer 503
     ├── NotFound       no instance with that id / contact token: answer 404 (SIP: 404)
     ├── Conflict       the id or contact token is already stored: draw new ones and retry
     ├── CryptoError    key file unusable or a ciphertext does not decrypt: the operator must
     │                  fix the key file (a key was removed, or the file is wrong/too open)
     └── SchemaError    the database was written by a newer sipis: upgrade sipis

Messages never contain a password, secret, push token or key material.
"""

from __future__ import annotations


class StoreError(Exception):
    """The store could not do what was asked; nothing partial was committed."""


class NotFound(StoreError):
    """No stored instance matches: the caller answers 404 (or a SIP 404)."""


class Conflict(StoreError):
    """An instance with the same id or contact token is already stored: retry with new ones."""


class CryptoError(StoreError):
    """The key file is unusable, or a stored ciphertext does not decrypt: the operator acts."""


class SchemaError(StoreError):
    """The database schema is newer than this code knows: run a newer sipis on it."""
