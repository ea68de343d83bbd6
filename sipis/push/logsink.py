"""The ``log`` push provider: each push becomes one log line instead of a network send.

It is the ``make run`` default (SPEC.md, "The embedded default") so that sipis runs with no
APNs/FCM credentials and a developer can watch what would have been pushed:

    push type=call instance=<id> call=<ref> provider=apns app=… token_hint=a1b2c3…(64) …

The keys are the payload's (``PushRequest.payload``) minus ``body``: logs never hold a message
body, nor a full push token (only :func:`redacted_token`, under a key the log redactor leaves
alone). Values with spaces or quotes are logfmt-quoted.
"""

from __future__ import annotations

import itertools
import logging
import re

import attrs

from sipis.logs import redacted_token
from sipis.push.base import PushRequest, PushResult

# The keys that open the line, in this order (SPEC.md's example), then the rest of the payload.
_LEADING = ("type", "instance", "call")
_NEVER_LOGGED = frozenset({"body"})
_BARE = re.compile(r"^[^\s\"=\\]+$")


def _logfmt_value(value: str) -> str:
    if _BARE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def format_push(request: PushRequest) -> str:
    """The log line for ``request`` (pure; see the module docstring for the shape)."""
    payload = request.payload()
    fields: list[tuple[str, str]] = [(k, payload[k]) for k in _LEADING if k in payload]
    fields.append(("provider", request.target.provider))
    fields += [(k, v) for k, v in payload.items() if k not in _LEADING and k not in _NEVER_LOGGED]
    fields.append(("app", request.target.app))
    if request.target.environment:
        fields.append(("environment", request.target.environment))
    fields.append(("token_hint", redacted_token(request.target.token)))
    if request.collapse_id:
        fields.append(("collapse_id", request.collapse_id))
    return "push " + " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields)


@attrs.frozen
class LogPushStatistics:
    logged: int


class LogPushClient:
    """A ``PushClient`` that logs every push (at INFO) and always succeeds.

    Args:
        logger: where the lines go (default ``sipis.push.log``).
    """

    def __init__(self, *, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("sipis.push.log")
        self._ids = itertools.count(1)
        self._logged = 0

    async def send(self, request: PushRequest) -> PushResult:
        """Log ``request``; the result's ``id`` is ``log-<n>``."""
        self._logger.info("%s", format_push(request))
        self._logged += 1
        return PushResult(provider=request.target.provider, id=f"log-{next(self._ids)}")

    async def aclose(self) -> None:
        """Nothing to close."""

    def statistics(self) -> LogPushStatistics:
        return LogPushStatistics(logged=self._logged)
