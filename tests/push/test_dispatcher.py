"""PushDispatcher: provider routing, retry with backoff within a deadline (autojump clock)."""

from __future__ import annotations

import random
from collections.abc import Iterable

import attrs
import pytest
import trio
import trio.testing

from sipis.push.base import (
    InvalidToken,
    PushAuthError,
    PushConfigError,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
    PushRetryable,
    PushTarget,
)
from sipis.push.dispatcher import PushDispatcher

REQUEST = PushRequest(kind=PushKind.CALL, target=PushTarget("fcm", "t" * 64, "com.example"),
                      instance="inst-1", call="call-1", sent_at=1)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps over sleeps: backoff tests run instantly."""
    return trio.testing.MockClock(autojump_threshold=0)


@attrs.define
class ScriptedClient:
    """Raises the scripted errors in order, then succeeds; records when it was called."""

    script: list[BaseException | None] = attrs.Factory(list)
    calls: list[float] = attrs.Factory(list)
    hang: bool = False
    closed: int = 0

    async def send(self, request: PushRequest) -> PushResult:
        self.calls.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        return PushResult(provider=request.target.provider, id=f"id-{len(self.calls)}")

    async def aclose(self) -> None:
        self.closed += 1


def _client(errors: Iterable[BaseException | None] = ()) -> ScriptedClient:
    return ScriptedClient(script=list(errors))


def _dispatcher(client: ScriptedClient, **kwargs: float) -> PushDispatcher:
    return PushDispatcher({"fcm": client}, rng=random.Random(7), **kwargs)


async def test_the_client_is_chosen_by_the_target_provider() -> None:
    """fcm targets go to the fcm client, apns targets to the apns client."""
    fcm, apns = _client(), _client()
    dispatcher = PushDispatcher({"fcm": fcm, "apns": apns})
    await dispatcher.send(REQUEST, deadline=trio.current_time() + 10)
    apns_request = attrs.evolve(REQUEST, target=attrs.evolve(REQUEST.target, provider="apns"))
    result = await dispatcher.send(apns_request, deadline=trio.current_time() + 10)
    assert (len(fcm.calls), len(apns.calls)) == (1, 1)
    assert result.provider == "apns" and result.attempts == 1


async def test_a_provider_without_a_client_is_a_config_error() -> None:
    """No client for the provider: PushConfigError, counted."""
    dispatcher = PushDispatcher({"apns": _client()})
    with pytest.raises(PushConfigError, match="fcm"):
        await dispatcher.send(REQUEST, deadline=trio.current_time() + 10)
    assert dispatcher.statistics().get("fcm", "config-error") == 1


async def test_retryable_errors_are_retried_with_growing_jittered_backoff(
        clock: trio.testing.MockClock) -> None:
    """Two 503s then success: waits in [0.25, 0.5] then [0.5, 1.0]; attempts = 3."""
    client = _client([PushRetryable("UNAVAILABLE"), PushRetryable("UNAVAILABLE")])
    dispatcher = _dispatcher(client, backoff_base=0.5)
    result = await dispatcher.send(REQUEST, deadline=trio.current_time() + 10)
    assert result.attempts == 3 and result.id == "id-3"
    first, second = (b - a for a, b in zip(client.calls, client.calls[1:], strict=False))
    assert 0.25 <= first <= 0.5
    assert 0.5 <= second <= 1.0
    stats = dispatcher.statistics()
    assert stats.get("fcm", "retried") == 2 and stats.get("fcm", "accepted") == 1


async def test_retry_after_is_honoured(clock: trio.testing.MockClock) -> None:
    """Retry-After 5 s: the next try is 5 s later, not after the 0.5 s backoff."""
    client = _client([PushRetryable("QUOTA_EXCEEDED", status=429, retry_after=5)])
    dispatcher = _dispatcher(client)
    await dispatcher.send(REQUEST, deadline=trio.current_time() + 10)
    assert client.calls[1] - client.calls[0] == pytest.approx(5)


async def test_retries_stop_at_the_deadline_with_the_last_error(
        clock: trio.testing.MockClock) -> None:
    """Always 503: tries until the next wait would pass the deadline, then raises it."""
    errors = [PushRetryable(f"UNAVAILABLE-{n}") for n in range(50)]
    client = _client(errors)
    dispatcher = _dispatcher(client, backoff_base=0.5, backoff_cap=2.0)
    start = trio.current_time()
    with pytest.raises(PushRetryable) as caught:
        await dispatcher.send(REQUEST, deadline=start + 6)
    assert trio.current_time() < start + 6
    assert 3 <= len(client.calls) <= 7
    assert caught.value.reason == f"UNAVAILABLE-{len(client.calls) - 1}"
    assert dispatcher.statistics().get("fcm", "retryable") == 1


async def test_a_retry_after_beyond_the_deadline_gives_up_at_once(
        clock: trio.testing.MockClock) -> None:
    """Retry-After 60 s with 10 s left: no pointless wait, the error comes back now."""
    client = _client([PushRetryable("QUOTA_EXCEEDED", retry_after=60)])
    dispatcher = _dispatcher(client)
    start = trio.current_time()
    with pytest.raises(PushRetryable):
        await dispatcher.send(REQUEST, deadline=start + 10)
    assert trio.current_time() == start and len(client.calls) == 1


@pytest.mark.parametrize("error", [InvalidToken("UNREGISTERED", status=404),
                                   PushAuthError("THIRD_PARTY_AUTH_ERROR", status=401),
                                   PushError("fcm connection lost: outcome unknown")])
async def test_permanent_errors_are_raised_at_once(error: PushError) -> None:
    """InvalidToken, PushAuthError and plain PushError are never retried."""
    client = _client([error])
    dispatcher = _dispatcher(client)
    with pytest.raises(type(error)) as caught:
        await dispatcher.send(REQUEST, deadline=trio.current_time() + 10)
    assert caught.value is error and len(client.calls) == 1


async def test_a_send_still_running_at_the_deadline_is_abandoned(
        clock: trio.testing.MockClock) -> None:
    """A hung send is cut at the deadline: PushError("deadline reached")."""
    client = ScriptedClient(hang=True)
    dispatcher = _dispatcher(client)
    start = trio.current_time()
    with pytest.raises(PushError, match="deadline"):
        await dispatcher.send(REQUEST, deadline=start + 3)
    assert trio.current_time() == pytest.approx(start + 3)
    assert dispatcher.statistics().get("fcm", "timeout") == 1


async def test_a_deadline_already_past_sends_nothing() -> None:
    """Deadline in the past: no send at all."""
    client = _client()
    with pytest.raises(PushError, match="deadline"):
        await _dispatcher(client).send(REQUEST, deadline=trio.current_time() - 1)


def test_backoff_is_capped_and_jittered_into_its_upper_half() -> None:
    """backoff(n) = min(cap, base·2^(n-1)) × U(0.5, 1); a retry_after is a floor."""
    dispatcher = PushDispatcher({}, backoff_base=0.5, backoff_cap=8.0, rng=random.Random(1))
    for retry in range(1, 12):
        full = min(8.0, 0.5 * 2 ** (retry - 1))
        assert full / 2 <= dispatcher.backoff(retry) <= full
    assert dispatcher.backoff(1, retry_after=2.5) == 2.5
    assert 4.0 <= dispatcher.backoff(5, retry_after=0) <= 8.0


async def test_statistics_count_by_provider_and_result() -> None:
    """Counts are kept per (provider, result)."""
    client = _client([InvalidToken("UNREGISTERED"), None])
    dispatcher = _dispatcher(client)
    with pytest.raises(InvalidToken):
        await dispatcher.send(REQUEST, deadline=trio.current_time() + 1)
    await dispatcher.send(REQUEST, deadline=trio.current_time() + 1)
    assert dict(dispatcher.statistics().counts) == {("fcm", "invalid-token"): 1,
                                                    ("fcm", "accepted"): 1}


async def test_aclose_closes_each_client_once() -> None:
    """One client serving two providers is closed once."""
    shared = _client()
    await PushDispatcher({"apns": shared, "fcm": shared}).aclose()
    assert shared.closed == 1


@attrs.define
class StartingClient(ScriptedClient):
    """A client that can start a push from the caller's task (``StartingPushClient``)."""

    started: list[str] = attrs.Factory(list)

    def start(self, request: PushRequest) -> object:
        self.started.append(request.call)
        return object()

    async def send(self, request: PushRequest, started: object = None) -> PushResult:
        return await super().send(request)


async def test_start_follows_the_clients_a_sighup_puts_in_place(
        clock: trio.testing.MockClock) -> None:
    """Whether a provider's client can start a push is known per set of clients: after
    ``replace_clients`` the new one starts it, or none does when the new one cannot."""
    first, second = StartingClient(), StartingClient()
    dispatcher = PushDispatcher({"fcm": first})
    started = dispatcher.start(REQUEST)
    assert started is not None and first.started == ["call-1"]
    await dispatcher.send(REQUEST, deadline=trio.current_time() + 5, started=started)
    dispatcher.replace_clients({"fcm": second})
    started = dispatcher.start(REQUEST)
    assert started is not None and second.started == ["call-1"] and first.started == ["call-1"]
    await dispatcher.send(REQUEST, deadline=trio.current_time() + 5, started=started)
    dispatcher.replace_clients({"fcm": _client()})
    assert dispatcher.start(REQUEST) is None
