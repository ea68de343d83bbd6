"""The module map's import rules (docs/DESIGN.md), enforced: dependencies point down.

Reads each module's imports with ``ast`` (no import side effects), including imports inside
functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sipis"

#: Sans-IO core: no event loop, no sockets, no database, no HTTP.
CORE = (
    "sipis.sip.errors", "sipis.sip.headers", "sipis.sip.message", "sipis.sip.digest",
    "sipis.sip.transaction", "sipis.sip.proxy", "sipis.registrar.binding", "sipis.push.base",
    "sipis.store.models", "sipis.calls.call", "sipis.calls.device",
)
IO_LIBRARIES = ("trio", "httpx", "httpcore", "h2", "hypercorn", "sqlite3", "socket", "ssl",
                "starlette", "dns", "asyncio", "anyio")

#: (importing package, packages it must not import)
FORBIDDEN = (
    ("sipis.sip", ("sipis.registrar", "sipis.push", "sipis.store", "sipis.api", "sipis.calls",
                   "sipis.instances")),
    ("sipis.push", ("sipis.sip", "sipis.registrar", "sipis.store", "sipis.api", "sipis.calls")),
    ("sipis.store", ("sipis.registrar", "sipis.push", "sipis.api", "sipis.calls",
                     "sipis.instances")),
    ("sipis.registrar", ("sipis.api", "sipis.calls", "sipis.push", "sipis.instances")),
    ("sipis.config", ("sipis.",)),
    ("sipis.logs", ("sipis.",)),
    ("sipis.randomness", ("sipis.",)),
    ("sipis.fastenum", ("sipis.",)),
    ("sipis.notify", ("sipis.",)),
    ("sipis.metrics", ("sipis.api", "sipis.calls", "sipis.registrar", "sipis.instances",
                       "sipis.daemon", "sipis.cli")),
)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, package: str) -> bool:
    return name == package.rstrip(".") or name.startswith(package.rstrip(".") + ".")


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_io_library(module: str) -> None:
    """The sans-IO core never touches trio, sockets, HTTP or the database."""
    if module not in MODULES:
        pytest.skip(f"{module} not written yet")
    bad = sorted(i for i in MODULES[module]
                 if any(within(i, lib) for lib in IO_LIBRARIES))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize(("package", "forbidden"), FORBIDDEN)
def test_lower_layers_never_import_higher_ones(package: str, forbidden: tuple[str, ...]) -> None:
    """Dependencies point down the module map."""
    offenders = []
    for module, imported in MODULES.items():
        if not within(module, package):
            continue
        for name in imported - {"sipis.__version__"}:
            if any(name.startswith(f) if f.endswith(".") else within(name, f)
                   for f in forbidden):
                offenders.append(f"{module} -> {name}")
    assert not offenders, offenders


def test_nothing_imports_the_composition_root() -> None:
    """Only the CLI starts the daemon; nothing imports the CLI."""
    for module, imported in MODULES.items():
        if module in ("sipis.cli", "sipis.__main__"):
            continue
        assert not any(within(i, "sipis.daemon") or within(i, "sipis.cli") for i in imported), \
            module
