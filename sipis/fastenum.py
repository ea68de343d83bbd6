"""``Enum`` hashed by identity, for the tables the state machines look up on every event."""

from __future__ import annotations

import enum


class Enum(enum.Enum):
    """``enum.Enum`` with the identity hash.

    Members are singletons compared by identity, so the identity hash keeps the hash contract.
    ``enum.Enum.__hash__`` hashes the member's name in Python code: with every transaction,
    call and registration step looking up ``(state, input)``, that was ~1.5 % of an INVITE's
    CPU (``make bench``).
    """

    __hash__ = object.__hash__
