"""Prometheus metrics: every metric declared once, on a registry of our own, served by our own
small listener (STYLE.md item 14).

Why a non-global ``CollectorRegistry``: tests and several daemons in one process each get their
own numbers, and nothing leaks in from libraries that register on the default registry.

Two kinds of metric live here:

- **events** the components report through the typed methods below (a REGISTER transaction
  ended, a push request was answered, an HTTP request was served, a store call returned, an
  instance was wiped). The components see these methods through small Protocols of their own
  (or plain callables), so none of them imports this module or ``prometheus_client``.
- **read at scrape time** from the components' own counters and state (instances by state,
  pushes by provider and result, calls by outcome), through functions given to
  :meth:`Metrics.watch`. Those counters exist anyway (``statistics()``, STYLE.md item 7), so
  counting twice would only let the two drift apart. The functions run in the trio thread
  (the scrape is served by a trio task), so they may read trio-side state without locks.

Label values are bounded sets (results, reasons, states, route templates, status codes): never
an instance id, a token, a URI or anything a client chooses.

Why our own HTTP responder instead of ``start_http_server()`` or a second hypercorn: the
former runs a thread outside the nursery tree, which would read trio-side state from another
thread; the latter brings a whole ASGI server (and its TLS and HTTP/2 code paths) to answer
one plain-HTTP GET from a scraper. ``serve()`` answers one request per connection with
``Connection: close``, reads at most ``MAX_REQUEST_HEAD`` bytes within ``REQUEST_TIMEOUT``,
serves at most ``MAX_CONNECTIONS`` connections at once (more are closed at once), and turns
anything it cannot parse into a 4xx: a bad client never ends the listener.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from sipis import __version__

log = logging.getLogger(__name__)

#: The request line and headers of a scrape must fit in this (Prometheus sends ~300 bytes).
MAX_REQUEST_HEAD: Final = 8192
#: A client must have sent its request and read the answer within this many seconds.
REQUEST_TIMEOUT: Final = 10.0
#: After the answer, unread input is drained (so the close is not a reset) for this long.
DRAIN_TIMEOUT: Final = 1.0
DRAIN_LIMIT: Final = 65536
#: Connections served at once; more are closed unanswered (a scraper needs one).
MAX_CONNECTIONS: Final = 64
METRICS_PATH: Final = "/metrics"

#: HTTP methods kept as label values; anything else is counted as "other".
HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Buckets in seconds. A REGISTER transaction may take up to Timer F (32 s); a push request is
# bounded by the push request timeout (~10 s); INVITE-to-push adds retries within the ring time;
# a store call is a local SQLite write with fsync.
REGISTER_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 32.0)
PUSH_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INVITE_TO_PUSH_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STORE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5)

InstanceCounts = Callable[[], Mapping[str, int]]
PushCounts = Callable[[], Mapping[tuple[str, str], int]]
CallCounts = Callable[[], Mapping[str, int]]


class _Watched:
    """The collector of the metrics read at scrape time from the components."""

    def __init__(self) -> None:
        self.instances: InstanceCounts | None = None
        self.pushes: PushCounts | None = None
        self.calls: CallCounts | None = None

    def collect(self) -> Iterable[Metric]:
        yield from self._safely("instances", self._instances)
        yield from self._safely("pushes", self._pushes)
        yield from self._safely("calls", self._calls)

    def _safely(self, what: str, build: Callable[[], Iterator[Metric]]) -> Iterator[Metric]:
        # A failing source must not fail the whole scrape (the other metrics still count).
        try:
            families = list(build())
        except Exception:
            log.exception("metrics: reading %s failed", what)
            return
        yield from families

    def _instances(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sipis_instances", "Push instances by upstream registration state.",
            labels=["state"])
        if self.instances is not None:
            for state, count in sorted(self.instances().items()):
                family.add_metric([state], count)
        yield family

    def _pushes(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "sipis_push_sent", "Pushes by provider and result (retried: a retry wait began).",
            labels=["provider", "result"])
        if self.pushes is not None:
            for (provider, result), count in sorted(self.pushes().items()):
                family.add_metric([provider, result], count)
        yield family

    def _calls(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "sipis_calls", "Incoming calls by outcome.", labels=["outcome"])
        if self.calls is not None:
            for outcome, count in sorted(self.calls().items()):
                family.add_metric([outcome], count)
        yield family


class Metrics:
    """The daemon's metrics: one registry, the recording methods, and the ``/metrics`` listener.

    Metric names (``sipis_`` prefix, base units, ``_total`` on counters):

    - ``sipis_instances{state}`` gauge (read at scrape time)
    - ``sipis_register_transactions_total{result}``, ``sipis_register_duration_seconds``
    - ``sipis_push_sent_total{provider,result}`` (read at scrape time),
      ``sipis_push_request_duration_seconds{provider}``
    - ``sipis_invite_to_push_seconds``
    - ``sipis_calls_total{outcome}`` (read at scrape time)
    - ``sipis_instance_wipes_total{reason}``
    - ``sipis_http_requests_total{route,method,status}``,
      ``sipis_http_request_duration_seconds{route}``
    - ``sipis_store_operation_duration_seconds{operation}``
    - ``sipis_build_info{version}``, and the standard ``process_*`` and ``python_info``.
    """

    def __init__(self) -> None:
        # The text format has no place for ``*_created``: the library would expose each as one
        # more gauge series. A process-wide switch, and sipis is the process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        reg = self.registry
        Info("sipis_build", "The running sipis.", registry=reg).info({"version": __version__})
        self._watched = _Watched()
        reg.register(self._watched)
        self.register_transactions = Counter(
            "sipis_register_transactions", "Upstream REGISTER transactions by result "
            "(SIP status or class, timeout, transport-error, resolve-error).",
            ["result"], registry=reg)
        self._register_results: dict[str, Any] = {}  # result → its child counter
        self.register_duration = Histogram(
            "sipis_register_duration_seconds",
            "Time from sending an upstream REGISTER (RFC 3263 lookup included) to its final "
            "answer; transactions without an answer are not observed.",
            buckets=REGISTER_BUCKETS, registry=reg)
        self.push_request_duration = Histogram(
            "sipis_push_request_duration_seconds",
            "Time for the push service to answer one push request, whatever the answer.",
            ["provider"], buckets=PUSH_BUCKETS, registry=reg)
        self.invite_to_push = Histogram(
            "sipis_invite_to_push_seconds",
            "Time from an incoming INVITE to the push service accepting its call push.",
            buckets=INVITE_TO_PUSH_BUCKETS, registry=reg)
        self.wipes = Counter(
            "sipis_instance_wipes", "Push instances ended and wiped, by reason.",
            ["reason"], registry=reg)
        self.http_requests = Counter(
            "sipis_http_requests", "HTTPS API requests by route template, method and status.",
            ["route", "method", "status"], registry=reg)
        self.http_duration = Histogram(
            "sipis_http_request_duration_seconds",
            "Time to answer an HTTPS API request, by route template.",
            ["route"], buckets=HTTP_BUCKETS, registry=reg)
        self.store_duration = Histogram(
            "sipis_store_operation_duration_seconds",
            "Time a store call took, waiting for the store's lock included.",
            ["operation"], buckets=STORE_BUCKETS, registry=reg)

    # -- read at scrape time -------------------------------------------------------------------

    def watch(
        self,
        *,
        instances: InstanceCounts | None = None,
        pushes: PushCounts | None = None,
        calls: CallCounts | None = None,
    ) -> None:
        """Give the functions read at each scrape (those not given stay as they were).

        Args:
            instances: registration state → number of instances.
            pushes: (provider, result) → pushes so far (``PushDispatcher.statistics().counts``).
            calls: outcome → calls so far (``CallDriver.outcomes``).
        """
        if instances is not None:
            self._watched.instances = instances
        if pushes is not None:
            self._watched.pushes = pushes
        if calls is not None:
            self._watched.calls = calls

    # -- events --------------------------------------------------------------------------------

    def register_done(self, result: str, seconds: float | None) -> None:
        """An upstream REGISTER transaction ended; ``seconds`` is None when nothing answered."""
        child = self._register_results.get(result)
        if child is None:  # a bounded set of results (``register_result``)
            child = self._register_results[result] = self.register_transactions.labels(result)
        child.inc()
        if seconds is not None:
            self.register_duration.observe(seconds)

    def push_request_done(self, provider: str, seconds: float) -> None:
        """A push service answered one push request (accepted or not)."""
        self.push_request_duration.labels(provider).observe(seconds)

    def call_push_accepted(self, seconds: float) -> None:
        """The call push of an incoming INVITE was accepted ``seconds`` after the INVITE."""
        self.invite_to_push.observe(seconds)

    def instance_wiped(self, instance_id: str, reason: str) -> None:
        """A wipe listener (``InstanceService.wipe_listeners``): counts by reason only."""
        del instance_id  # never a label
        self.wipes.labels(reason).inc()

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """An API request was answered; ``route`` is the route template, not the path."""
        method = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_duration.labels(route).observe(seconds)

    def store_call(self, operation: str, seconds: float) -> None:
        """A store call returned (or raised) after ``seconds``; ``operation`` is its name."""
        self.store_duration.labels(operation).observe(seconds)

    # -- exposition ----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text exposition format (``/metrics``)."""
        return generate_latest(self.registry)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``GET /metrics`` on ``host:port`` (plain HTTP) until cancelled.

        ``task_status.started(port)`` gets the bound port (so port 0 reports the real one).

        Raises:
            OSError: the address cannot be bound.
        """
        limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        handler = functools.partial(self._connection, limiter)
        # Bound before the nursery opens, so a taken port is a plain OSError for the caller.
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            bound = listeners[0].socket.getsockname()[1]
            log.info("metrics listening on http://%s:%d%s", host, bound, METRICS_PATH)
            task_status.started(bound)

    async def _connection(self, limiter: trio.CapacityLimiter, stream: trio.SocketStream) -> None:
        """One connection, one request. Never raises: a bad client must not end the listener."""
        try:
            async with stream:
                try:
                    limiter.acquire_nowait()
                except trio.WouldBlock:
                    return
                try:
                    with trio.move_on_after(REQUEST_TIMEOUT):
                        head = await _read_head(stream)
                        if head is None:
                            return
                        await stream.send_all(self._answer(head))
                        await _finish(stream)
                finally:
                    limiter.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("metrics: error while serving a connection")

    def _answer(self, head: bytes) -> bytes:
        request = _parse_request_line(head)
        if isinstance(request, int):
            return _response(request, b"")
        method, path = request
        if path != METRICS_PATH:
            return _response(404, b"not found\n", head_only=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return _response(405, b"method not allowed\n", extra=(("Allow", "GET, HEAD"),))
        body = self.exposition()
        return _response(200, body, content_type=CONTENT_TYPE_PLAIN_0_0_4,
                         head_only=method == "HEAD")


# --- the HTTP/1.x responder ------------------------------------------------------------------

_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET_RE: Final = re.compile(rb"/[\x21-\x7e]*")
_VERSION_RE: Final = re.compile(rb"HTTP/(\d)\.(\d)")
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head up to its blank line (longer than MAX_REQUEST_HEAD: too long, answer
    431), or None if the peer left first."""
    buffer = bytearray()
    while True:
        end = _head_end(buffer)
        if end is not None:
            return bytes(buffer[:end])
        if len(buffer) > MAX_REQUEST_HEAD:
            return bytes(buffer)
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buffer += chunk


def _head_end(buffer: bytearray) -> int | None:
    for sep in (b"\r\n\r\n", b"\n\n"):
        index = buffer.find(sep)
        if index >= 0:
            return index
    return None


def _parse_request_line(head: bytes) -> tuple[str, str] | int:
    """(method, path without query) of an HTTP/1.x request, or the error status to answer."""
    if len(head) > MAX_REQUEST_HEAD:
        return 431
    if not head:
        return 400
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3:
        return 400
    method, target, version = parts
    match = _VERSION_RE.fullmatch(version)
    if not _TOKEN_RE.fullmatch(method) or match is None:
        return 400
    if match.group(1) != b"1":
        return 505
    if not _TARGET_RE.fullmatch(target):
        return 400
    path = target.split(b"?", 1)[0]
    return method.decode("ascii"), path.decode("ascii")


def _response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body


async def _finish(stream: trio.SocketStream) -> None:
    """Half-close, then drop what the client still sends (a close with unread input would
    reset the connection and could cut the answer short)."""
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(DRAIN_TIMEOUT):
        while drained < DRAIN_LIMIT:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            drained += len(chunk)
