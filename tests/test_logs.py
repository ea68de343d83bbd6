"""The log redaction filter masks credentials whatever module logged them."""

from __future__ import annotations

import logging

import pytest

from sipis.logs import JsonFormatter, LogfmtFormatter, quiet_header_loggers, redact


@pytest.mark.parametrize("line", [
    "Authorization: Bearer abcDEF123_-xyz",
    "Decoded (b'authorization', b'Bearer abcDEF123_-xyz'), total consumed 43 bytes",
    'Authorization: Digest username="alice", response="abcDEF123_-xyz"',
    '{"password": "abcDEF123_-xyz"}',
    "password=abcDEF123_-xyz",
])
def test_credentials_are_masked(line: str) -> None:
    """Bearer secrets, digest responses and password fields never survive formatting."""
    assert "abcDEF123_-xyz" not in redact(line)


@pytest.mark.parametrize("formatter", [LogfmtFormatter(), JsonFormatter()])
def test_formatters_apply_the_redaction(formatter: logging.Formatter) -> None:
    """Both output formats go through the same filter."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1,
                               "got %s", ("Bearer abcDEF123_-xyz",), None)
    assert "abcDEF123_-xyz" not in formatter.format(record)


def test_header_dumping_libraries_are_kept_quiet() -> None:
    """hpack logs decoded headers (bearer secrets) at debug: it stays at WARNING."""
    logging.getLogger().setLevel(logging.DEBUG)
    quiet_header_loggers()
    assert not logging.getLogger("hpack").isEnabledFor(logging.DEBUG)
