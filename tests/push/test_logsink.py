"""LogPushClient: the `make run` provider writes one log line per push, without secrets."""

from __future__ import annotations

import logging

import pytest

from sipis.logs import redact
from sipis.push.base import PushKind, PushRequest, PushTarget
from sipis.push.logsink import LogPushClient, format_push
from tests.integration.harness import SENSITIVE

TOKEN = "a1b2c3" + "d" * 58
SENSITIVE.add(TOKEN)  # the session-wide log check must never find it
CALL = PushRequest(kind=PushKind.CALL,
                   target=PushTarget("apns", TOKEN, "com.example.phone", "sandbox"),
                   instance="inst-1", call="call-9", from_uri="sip:bob@example.net",
                   from_name='Bob "the builder" Smith', sip_call_id="abc@host", sent_at=17)


def test_line_starts_with_type_instance_call_provider() -> None:
    """The SPEC.md shape: `push type=call instance=<id> call=<ref> provider=apns ...`."""
    line = format_push(CALL)
    assert line.startswith("push type=call instance=inst-1 call=call-9 provider=apns ")
    assert " from_uri=sip:bob@example.net " in line
    assert ' from_name="Bob \\"the builder\\" Smith" ' in line
    assert " sip_call_id=abc@host " in line and " sent_at=17 " in line
    assert " app=com.example.phone environment=sandbox " in line


def test_line_carries_every_payload_key_but_the_body() -> None:
    """Same keys as the payload; a MESSAGE body never reaches the log."""
    message = PushRequest(kind=PushKind.MESSAGE, target=CALL.target, instance="inst-1",
                          from_uri="sip:bob@example.net", body="secret words", sent_at=3)
    line = format_push(message)
    for key in message.payload():
        if key != "body":
            assert f" {key}=" in f" {line.removeprefix('push ')}"
    assert "secret words" not in line and "body=" not in line


def test_line_never_holds_the_full_token() -> None:
    """Only the redacted token hint, which the log redactor leaves readable."""
    line = format_push(CALL)
    assert TOKEN not in line and TOKEN[6:20] not in line
    assert "token_hint=a1b2c3…(64)" in line
    assert redact(line) == line


async def test_send_logs_one_line_and_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    """Each send: one INFO line on sipis.push.log, a result with a local id."""
    client = LogPushClient()
    with caplog.at_level(logging.INFO, logger="sipis.push.log"):
        first = await client.send(CALL)
        second = await client.send(CALL)
    lines = [r.getMessage() for r in caplog.records if r.name == "sipis.push.log"]
    assert lines == [format_push(CALL)] * 2
    assert (first.provider, first.id, second.id) == ("apns", "log-1", "log-2")
    assert client.statistics().logged == 2
    await client.aclose()
