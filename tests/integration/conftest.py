"""Integration fixtures: every daemon's log lines are checked for secrets at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import DEFAULT_USERS
from tests.integration import harness


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """After the whole suite: no log line holds a password, secret or full push token."""
    handler = harness.install_log_capture()
    yield
    import logging

    logging.getLogger().removeHandler(handler)
    harness.SENSITIVE.update(DEFAULT_USERS.values())
    texts = list(harness.LOG_LINES)
    for path in harness.SUBPROCESS_LOGS:
        if path.exists():
            texts.extend(path.read_text(errors="replace").splitlines())
    assert texts, "no daemon log lines were captured"
    leaks = [(s, line) for line in texts for s in harness.SENSITIVE if s and s in line]
    assert not leaks, f"{len(leaks)} log lines hold a secret, e.g. {leaks[0][1][:200]!r}"
