"""What the cyclic collector would free, for tests that show a path leaves no cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cyclic_garbage(module: str) -> Iterator[list[str]]:
    """Collect first, then keep what the collector frees while the block runs; at its end the
    list holds the type names of the freed objects defined in ``module`` (none: no cycle)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    left: list[str] = []
    try:
        yield left
        gc.collect()
        left.extend(type(o).__name__ for o in gc.garbage if type(o).__module__ == module)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
