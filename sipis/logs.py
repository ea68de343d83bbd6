"""Log set-up: one line per event, logfmt or JSON, to stdout (journald picks it up).

Secrets never reach a log line by construction (records and configs hide them in ``repr``);
``RedactingFilter`` is the second line of defence: it masks anything that looks like a digest
response, a bearer secret or a password field, whichever module logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_REDACTIONS = (
    # "Bearer <secret>" in any shape: a header line, or h2/hpack's b'Bearer …' tuples.
    (re.compile(r'(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+'), r"\1[redacted]"),
    (re.compile(r'(?i)((?:proxy-)?authorization:\s*digest\s+)[^\r\n]*'), r"\1[redacted]"),
    (re.compile(r'(?i)(response=")[0-9a-f]+(")'), r"\1[redacted]\2"),
    (re.compile(r'(?i)("?(?:password|secret|token)"?\s*[:=]\s*)("[^"]*"|\S+)'), r"\1[redacted]"),
)


#: How much of a push token logs and the API may show, and from which length on.
_SHOWN_PREFIX = 6
_MIN_LEN_TO_SHOW_PREFIX = 24


def redacted_token(token: str) -> str:
    """A push token (or other long credential) shortened for logs: ``"a1b2c3…(64)"``.

    The first 6 characters and the length identify a token among a user's devices without
    making it usable. Tokens shorter than 24 characters show only their length, because 6
    characters would be too large a share of them.
    """
    if len(token) < _MIN_LEN_TO_SHOW_PREFIX:
        return f"…({len(token)})"
    return f"{token[:_SHOWN_PREFIX]}…({len(token)})"


def redact(text: str) -> str:
    """Mask credentials in a finished log line."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


#: ``instance=<short id>`` and ``call=<ref>`` as the modules write them into messages; the
#: formatters lift them into fields of their own, so journald/Loki can select by them.
_CONTEXT = re.compile(r"(?<![\w.-])(instance|call)=([A-Za-z0-9_-]{1,64})\b")


def context_fields(msg: str) -> dict[str, str]:
    """The instance id (short) and call reference a message names, first of each."""
    fields: dict[str, str] = {}
    for name, value in _CONTEXT.findall(msg):
        fields.setdefault(name, value)
    return fields


class LogfmtFormatter(logging.Formatter):
    """``ts=… level=… logger=… [instance=… call=…] msg="…"``: one line, greppable,
    journald-friendly."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += " exc=" + self.formatException(record.exc_info).replace("\n", "\\n")
        msg = redact(msg)
        context = "".join(f"{k}={v} " for k, v in context_fields(msg).items())
        msg = msg.replace('"', '\\"').replace("\n", "\\n")
        return f'ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} ' \
               f'logger={record.name} {context}msg="{msg}"'


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``instance`` and ``call`` fields when named."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        msg = redact(msg)
        return json.dumps({
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            **context_fields(msg),
            "msg": msg,
        })


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    """Route every logger to stdout in the chosen format (idempotent: SIGHUP calls it again)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    for old in list(root.handlers):
        if getattr(old, "_sipis", False):
            root.removeHandler(old)
    handler._sipis = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    quiet_header_loggers()


#: Libraries that log whole HTTP headers (bearer secrets, push tokens) at debug level.
HEADER_LOGGERS = ("hpack", "h2", "httpx", "httpcore", "hypercorn.access")


def quiet_header_loggers() -> None:
    """Keep header-dumping libraries at WARNING whatever the root level is."""
    for name in HEADER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
