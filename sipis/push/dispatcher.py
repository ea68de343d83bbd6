"""Route a push to its provider's client and retry what may be retried, within a deadline.

Why here and not in the clients: a client knows whether one request may be re-sent (it raises
``PushRetryable`` only then); the caller knows how long the push is still worth sending (the
call's ring timer). The dispatcher joins the two: capped exponential backoff with jitter, the
provider's ``Retry-After`` honoured, and never a wait or a send past the deadline.
"""

from __future__ import annotations

import logging
import random
import types
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Final, cast

import attrs
import trio

from sipis.push.base import (
    InvalidToken,
    PushAuthError,
    PushClient,
    PushConfigError,
    PushError,
    PushRequest,
    PushResult,
    PushRetryable,
    PushStart,
    StartingPushClient,
)

logger = logging.getLogger(__name__)

#: The ``result`` label values of :class:`DispatcherStatistics` (and of
#: ``sipis_push_sent_total{provider,result}``).
RESULTS: Final = ("accepted", "invalid-token", "retryable", "auth-error", "config-error",
                  "error", "timeout", "retried")

# Full jitter would sometimes retry at once; keep at least half the computed backoff.
_JITTER_FLOOR: Final = 0.5


@attrs.frozen
class DispatcherStatistics:
    """Outcome counts: ``counts[(provider, result)]``; ``retried`` counts retry waits."""

    counts: Mapping[tuple[str, str], int]

    def get(self, provider: str, result: str) -> int:
        return self.counts.get((provider, result), 0)


class PushDispatcher:
    """Sends a ``PushRequest`` with the client of ``request.target.provider``.

    Args:
        clients: provider name (``"apns"``, ``"fcm"``) → client. The ``make run`` default
            maps both to one ``LogPushClient``.
        backoff_base: first retry delay in seconds (doubled per retry).
        backoff_cap: longest retry delay.
        rng: jitter source (tests pass a seeded ``random.Random``).
        on_request_done: told ``(provider, seconds)`` after each try the client finished
            (answered or failed, not cut off by the deadline): the push latency metric.
    """

    def __init__(self, clients: Mapping[str, PushClient], *, backoff_base: float = 0.5,
                 backoff_cap: float = 8.0, rng: random.Random | None = None,
                 on_request_done: Callable[[str, float], None] | None = None) -> None:
        self._clients = dict(clients)
        self._starting = _starting_clients(self._clients)
        self._on_request_done = on_request_done
        self._base = backoff_base
        self._cap = backoff_cap
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._counts: Counter[tuple[str, str]] = Counter()
        self._in_use: Counter[int] = Counter()  # id(client) → sends in progress on it

    def backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Delay before retry number ``retry`` (1-based).

        ``min(cap, base * 2**(retry-1))`` jittered into its upper half; a provider's
        ``retry_after`` is a floor (never retry earlier than asked, and a ``Retry-After: 0``
        from a struggling service does not turn into a tight loop).
        """
        delay = min(self._cap, self._base * 2.0 ** (retry - 1))
        delay *= self._rng.uniform(_JITTER_FLOOR, 1.0)
        return max(delay, retry_after or 0.0)

    def start(self, request: PushRequest) -> PushStart | None:
        """Send ``request`` at once, from the caller's task, if its client can (see
        ``StartingPushClient``); pass the result to ``send``, which waits for the answer.
        None: ``send`` does all of it."""
        client = self._starting.get(request.target.provider)
        if client is None:
            return None
        try:
            inner = client.start(request)
        except Exception:  # only a head start: whatever went wrong, send will meet it again
            logger.exception("push start failed provider=%s; sending the usual way",
                             request.target.provider)
            return None
        if inner is None:
            return None
        self._in_use[id(client)] += 1  # from now on: a SIGHUP retire waits for this push too
        return _DispatchStart(self, client, inner)

    async def send(self, request: PushRequest, *, deadline: float,
                   started: PushStart | None = None) -> PushResult:
        """Send ``request``, retrying ``PushRetryable`` until ``deadline`` (trio time).

        Returns:
            the client's result, ``attempts`` counting every try of every retry.

        Raises:
            PushConfigError: no client for the provider.
            InvalidToken, PushAuthError, PushError: at once, never retried.
            PushRetryable: the last one, when the next try would start after ``deadline``.
            PushError("deadline reached"): the deadline passed while a try was in flight and
                no earlier try had failed retryably (else that error is raised).
        """
        provider = request.target.provider
        client: PushClient | None
        first: PushStart | None = None
        if isinstance(started, _DispatchStart) and started.claim(self):
            # Its answer is awaited from the client that sent it, even if SIGHUP has swapped
            # the clients since: sending afresh could ring the phone twice. ``start`` has
            # counted it in use already.
            client, first = started.client, started.inner
        else:
            if started is not None:
                started.abandon()
            client = self._clients.get(provider)
            if client is None:
                self._count(provider, "config-error")
                raise PushConfigError(f"no push client for provider {provider!r}")
            # One client for the whole send, retries included, even if SIGHUP swaps the
            # clients meanwhile: the old one is closed only once no send uses it (``retire``).
            self._in_use[id(client)] += 1
        try:
            return await self._send_with(client, request, deadline, first)
        finally:
            self._done_with(client)

    def _done_with(self, client: PushClient) -> None:
        self._in_use[id(client)] -= 1
        if not self._in_use[id(client)]:
            del self._in_use[id(client)]

    async def _send_with(self, client: PushClient, request: PushRequest,
                         deadline: float, first: PushStart | None) -> PushResult:
        provider = request.target.provider
        attempts = 0
        last: PushRetryable | None = None
        while True:
            if trio.current_time() >= deadline:  # move_on_at would let a quick send through
                if first is not None:
                    first.abandon()
                self._count(provider, "timeout")
                raise PushError("deadline reached")
            with trio.move_on_at(deadline) as scope:
                started = trio.current_time()
                try:
                    if first is not None:
                        # (``first`` came from ``start``: the client is a StartingPushClient.)
                        pending, first = first, None
                        result = await cast(StartingPushClient, client).send(
                            request, pending)
                    else:
                        result = await client.send(request)
                except PushRetryable as exc:
                    self._timed(provider, started)
                    last = exc
                except PushError as exc:
                    self._timed(provider, started)
                    self._count(provider, _result_of(exc))
                    raise
                else:
                    self._timed(provider, started)
                    self._count(provider, "accepted")
                    return attrs.evolve(result, attempts=attempts + result.attempts)
            attempts += 1
            if scope.cancelled_caught:
                self._count(provider, "timeout" if last is None else "retryable")
                if last is not None:
                    raise last
                raise PushError("deadline reached")
            assert last is not None
            wake = trio.current_time() + self.backoff(attempts, last.retry_after)
            if wake >= deadline:
                self._count(provider, "retryable")
                raise last
            self._count(provider, "retried")
            logger.info("push retry provider=%s type=%s instance=%s reason=%s in=%.2fs",
                        provider, request.kind.value, request.instance, last.reason,
                        wake - trio.current_time())
            await trio.sleep_until(wake)

    def _count(self, provider: str, result: str) -> None:
        self._counts[(provider, result)] += 1

    def _timed(self, provider: str, started: float) -> None:
        if self._on_request_done is not None:
            self._on_request_done(provider, trio.current_time() - started)

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(types.MappingProxyType(dict(self._counts)))

    def configure_backoff(self, base: float, cap: float) -> None:
        """SIGHUP: new retry delays for the retries that follow."""
        self._base = base
        self._cap = cap

    def replace_clients(self, clients: Mapping[str, PushClient]) -> list[PushClient]:
        """SIGHUP: new clients (new credentials, endpoints, CA) for the sends that start from
        now on. Returns the old clients that are no longer used, for :meth:`retire`."""
        old = {id(c): c for c in self._clients.values()}
        self._clients = dict(clients)
        self._starting = _starting_clients(self._clients)
        kept = {id(c) for c in self._clients.values()}
        return [c for key, c in old.items() if key not in kept]

    async def retire(self, clients: Sequence[PushClient], *, timeout: float) -> None:
        """Close replaced clients once the sends still using them are done (or ``timeout``
        has passed: a call push never outlives its ring timer)."""
        with trio.move_on_after(timeout):
            while any(self._in_use.get(id(c)) for c in clients):
                await trio.sleep(0.1)
        for client in clients:
            await client.aclose()

    async def aclose(self) -> None:
        """Close every distinct client once."""
        seen: set[int] = set()
        for client in self._clients.values():
            if id(client) not in seen:
                seen.add(id(client))
                await client.aclose()


def _result_of(exc: PushError) -> str:
    if isinstance(exc, InvalidToken):
        return "invalid-token"
    if isinstance(exc, PushAuthError):
        return "auth-error"
    if isinstance(exc, PushConfigError):
        return "config-error"
    return "error"


class _DispatchStart(PushStart):
    """A started push, the client that started it, and the dispatcher that counts it in use
    until ``send`` takes it over (``claim``) or it is abandoned."""

    __slots__ = ("client", "inner", "owner")

    def __init__(self, owner: PushDispatcher, client: StartingPushClient,
                 inner: PushStart) -> None:
        self.owner: PushDispatcher | None = owner
        self.client = client
        self.inner = inner

    def claim(self, dispatcher: PushDispatcher) -> bool:
        """Hand the in-use count over to ``dispatcher.send`` (once, and only its own)."""
        if self.owner is not dispatcher:
            return False
        self.owner = None
        return True

    def abandon(self) -> None:
        self.inner.abandon()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner._done_with(self.client)


def _starting_clients(clients: Mapping[str, PushClient]) -> dict[str, StartingPushClient]:
    """The clients that can ``start`` a push, by provider: asked once per set of clients,
    since isinstance() against a runtime-checkable Protocol walks its members (it took
    ~2 % of an INVITE's CPU, twice per push)."""
    return {provider: client for provider, client in clients.items()
            if isinstance(client, StartingPushClient)}
