"""Every enum of the package hashes by identity (``sipis.fastenum``)."""

from __future__ import annotations

import enum
import importlib
import pickle
import pkgutil

import sipis
from sipis import fastenum
from sipis.sip.transaction import InviteTxState


def _enums() -> list[type[enum.Enum]]:
    found: list[type[enum.Enum]] = []
    for info in pkgutil.walk_packages(sipis.__path__, "sipis."):
        if info.name.endswith("__main__"):
            continue  # runs the CLI
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, enum.Enum)
                    and value.__module__ == info.name and value is not fastenum.Enum):
                found.append(value)
    return found


def test_every_enum_of_the_package_hashes_by_identity() -> None:
    enums = _enums()
    assert len(enums) >= 10
    # An IntEnum hashes as its int, in C: as fast as identity.
    slow = [f"{cls.__module__}.{cls.__qualname__}" for cls in enums
            if cls.__hash__ is not object.__hash__ and cls.__hash__ is not int.__hash__]
    assert not slow, f"enum.Enum's hash (the name, in Python) on a hot path: {slow}"


def test_identity_hash_keeps_enum_behaviour() -> None:
    table = {(state, state): state.name for state in InviteTxState}
    assert table[(InviteTxState.COMPLETED, InviteTxState.COMPLETED)] == "COMPLETED"
    assert pickle.loads(pickle.dumps(InviteTxState.CONFIRMED)) is InviteTxState.CONFIRMED
    assert InviteTxState["PROCEEDING"] is InviteTxState(InviteTxState.PROCEEDING.value)
