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


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_instance_and_call_become_fields_of_their_own(fmt: str) -> None:
    """A line naming instance=… and call=… carries them as fields journald/Loki can select
    on, in both formats; a line naming neither has none."""
    formatter = JsonFormatter() if fmt == "json" else LogfmtFormatter()

    def line(msg: str, *args: object) -> str:
        return formatter.format(logging.LogRecord("sipis.calls", logging.INFO, __file__, 1,
                                                  msg, args, None))

    named = line("call instance=%s call=%s outcome=%s", "Ab3dE-9x", "c0ffee0123456789", "missed")
    plain = line("store: schema migrated to version %d", 3)
    if fmt == "json":
        import json

        assert json.loads(named)["instance"] == "Ab3dE-9x"
        assert json.loads(named)["call"] == "c0ffee0123456789"
        assert "instance" not in json.loads(plain) and "call" not in json.loads(plain)
    else:
        assert " instance=Ab3dE-9x call=c0ffee0123456789 msg=" in named
        assert "instance=" not in plain.split("msg=")[0]
