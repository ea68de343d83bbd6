"""sipis.metrics: names and units, the /metrics listener, and the components that feed it."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import sipis.metrics as metrics_mod
from sipis.api.app import UNMATCHED_ROUTE, build_app
from sipis.api.schemas import ExpiresPolicy
from sipis.metrics import Metrics
from sipis.push.base import InvalidToken
from sipis.push.dispatcher import PushDispatcher
from sipis.registrar.keeper import RegistrationKeeper, register_result
from sipis.store.crypto import KeyRing
from sipis.store.sqlite import SqliteStore
from tests.api.fakes import FakeCallControl, FakeInstanceService, api_config
from tests.push.test_dispatcher import REQUEST, ScriptedClient
from tests.registrar.test_keeper import (
    CONFIG,
    FakeRegistrar,
    FakeResolver,
    FakeStatusStore,
    record,
)
from tests.store.test_sqlite import make_record

SIPIS_FAMILIES = {
    "sipis_instances": "gauge",
    "sipis_register_transactions": "counter",
    "sipis_register_duration_seconds": "histogram",
    "sipis_push_sent": "counter",
    "sipis_push_request_duration_seconds": "histogram",
    "sipis_invite_to_push_seconds": "histogram",
    "sipis_calls": "counter",
    "sipis_instance_wipes": "counter",
    "sipis_http_requests": "counter",
    "sipis_http_request_duration_seconds": "histogram",
    "sipis_store_operation_duration_seconds": "histogram",
    "sipis_build_info": "gauge",  # an Info, as the text format shows it
}


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly these labels (0 when absent: a counter not yet moved)."""
    for sample in samples(text):
        if sample.name == name and sample.labels == labels:
            return sample.value
    return 0.0


def scrape(metrics: Metrics) -> str:
    return metrics.exposition().decode()


# --- names and units --------------------------------------------------------------------------


def test_every_sipis_metric_is_declared_with_its_type_and_unit() -> None:
    """The families, their types, the sipis_ prefix, _total counters and _seconds histograms."""
    m = Metrics()
    families = {f.name: f for f in text_string_to_metric_families(scrape(m))}
    for name, kind in SIPIS_FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].documentation, name
    ours = [name for name in families if name.startswith("sipis_")]
    assert sorted(ours) == sorted(SIPIS_FAMILIES)
    for name in ours:
        if families[name].type == "histogram":
            assert name.endswith("_seconds"), name
    # The exposed counter samples carry _total; the info carries _info.
    m.wipes.labels("deleted").inc()
    names = {s.name for s in samples(scrape(m))}
    assert "sipis_instance_wipes_total" in names
    assert "sipis_build_info" in names


def test_process_metrics_are_on_the_registry() -> None:
    """ProcessCollector and PlatformCollector report on the daemon's own registry."""
    names = {f.name for f in text_string_to_metric_families(scrape(Metrics()))}
    assert "process_cpu_seconds" in names
    assert "process_resident_memory_bytes" in names
    assert "python_info" in names


def test_two_metrics_objects_do_not_share_numbers() -> None:
    """Each Metrics has its own registry (several daemons and tests in one process)."""
    a, b = Metrics(), Metrics()
    a.wipes.labels("expired").inc()
    assert value(scrape(a), "sipis_instance_wipes_total", reason="expired") == 1
    assert value(scrape(b), "sipis_instance_wipes_total", reason="expired") == 0


def test_events_move_their_metrics() -> None:
    """Each recording method moves its metric; the instance id of a wipe is never a label."""
    m = Metrics()
    m.register_done("2xx", 0.02)
    m.register_done("timeout", None)
    m.push_request_done("apns", 0.1)
    m.call_push_accepted(0.3)
    m.instance_wiped("inst-secret-id", "push-token-invalid")
    m.http_request("/v1/instances/{id}", "GET", 401, 0.001)
    m.http_request("/v1/instances/{id}", "BREW", 405, 0.001)
    m.store_call("get", 0.002)
    text = scrape(m)
    assert value(text, "sipis_register_transactions_total", result="2xx") == 1
    assert value(text, "sipis_register_transactions_total", result="timeout") == 1
    assert value(text, "sipis_register_duration_seconds_count") == 1  # no answer: not timed
    assert value(text, "sipis_push_request_duration_seconds_count", provider="apns") == 1
    assert value(text, "sipis_invite_to_push_seconds_sum") == pytest.approx(0.3)
    assert value(text, "sipis_instance_wipes_total", reason="push-token-invalid") == 1
    assert value(text, "sipis_http_requests_total", route="/v1/instances/{id}", method="GET",
                 status="401") == 1
    assert value(text, "sipis_http_requests_total", route="/v1/instances/{id}", method="other",
                 status="405") == 1
    assert value(text, "sipis_store_operation_duration_seconds_count", operation="get") == 1
    assert "inst-secret-id" not in text


def test_watched_sources_are_read_at_each_scrape() -> None:
    """Instances by state, pushes and calls come from the components' own counters."""
    m = Metrics()
    state = {"registered": 2}
    m.watch(instances=lambda: state, pushes=lambda: {("fcm", "accepted"): 3},
            calls=lambda: {"missed": 1})
    text = scrape(m)
    assert value(text, "sipis_instances", state="registered") == 2
    assert value(text, "sipis_push_sent_total", provider="fcm", result="accepted") == 3
    assert value(text, "sipis_calls_total", outcome="missed") == 1
    state["registered"] = 5
    assert value(scrape(m), "sipis_instances", state="registered") == 5


def test_a_failing_source_does_not_fail_the_scrape() -> None:
    """A source that raises loses its own family only."""
    m = Metrics()

    def broken() -> dict[str, int]:
        raise RuntimeError("boom")

    m.watch(instances=broken, calls=lambda: {"answered": 4})
    text = scrape(m)
    assert value(text, "sipis_calls_total", outcome="answered") == 4
    assert "sipis_instances" not in text


def test_register_result_is_a_bounded_set() -> None:
    """Challenges and refusals by code, everything else by class."""
    assert register_result(200) == "2xx"
    assert register_result(202) == "2xx"
    assert register_result(401) == "401"
    assert register_result(407) == "407"
    assert register_result(423) == "423"
    assert register_result(403) == "403"
    assert register_result(480) == "4xx"
    assert register_result(503) == "5xx"
    assert register_result(603) == "6xx"
    assert register_result(999) == "6xx"
    assert register_result(0) == "1xx"


# --- the listener -----------------------------------------------------------------------------


async def start(nursery: trio.Nursery, m: Metrics) -> int:
    port: int = await nursery.start(m.serve, "127.0.0.1", 0)
    return port


async def raw(port: int, data: bytes, *, close_write: bool = True) -> bytes:
    """Send ``data`` on a new connection and read until the server closes (or resets)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        try:
            await stream.send_all(data)
            if close_write:
                await stream.send_eof()
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    out += chunk
        except trio.BrokenResourceError:
            pass
    return out


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, int]]:
    m = Metrics()
    async with trio.open_nursery() as nursery:
        port = await start(nursery, m)
        yield m, port
        nursery.cancel_scope.cancel()


async def test_get_metrics_serves_the_text_format(served: tuple[Metrics, int]) -> None:
    """GET /metrics → 200, the 0.0.4 text format that Prometheus's own parser reads."""
    m, port = served
    m.wipes.labels("deleted").inc()
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"http://127.0.0.1:{port}/metrics?x=1")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(resp.text, "sipis_instance_wipes_total", reason="deleted") == 1


async def test_head_404_405_and_bad_requests(served: tuple[Metrics, int]) -> None:
    """HEAD has no body; another path is 404; POST is 405; garbage is a 4xx, not a crash."""
    _, port = served
    head = await raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert (await raw(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
    assert (await raw(port, b"GET /metricsx HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
    post = await raw(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
    assert (await raw(port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n")
            ).startswith(b"HTTP/1.1 400 ")
    assert (await raw(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")).startswith(b"HTTP/1.1 505 ")
    assert (await raw(port, b"GET  /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(port, b"GET metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(port, b"\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert await raw(port, b"GET /metrics HTTP/1.1\r\n") == b""  # left before the blank line


async def test_garbage_and_oversize_requests_do_not_end_the_listener(
    served: tuple[Metrics, int],
) -> None:
    """Random bytes, a huge head, resets and idle clients: /metrics still answers after."""
    _, port = served
    rng = random.Random(7)
    for _ in range(20):
        await raw(port, rng.randbytes(rng.randrange(1, 3000)))
    big = await raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
                    close_write=False)
    assert big.startswith(b"HTTP/1.1 431 ")
    # A client that resets at once.
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert resp.status_code == 200


async def test_a_silent_client_is_dropped_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that never sends a request is closed after REQUEST_TIMEOUT."""
    monkeypatch.setattr(metrics_mod, "REQUEST_TIMEOUT", 0.2)
    m = Metrics()
    async with trio.open_nursery() as nursery:
        port = await start(nursery, m)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_cap_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_CONNECTIONS a new connection is closed unanswered; capacity comes back."""
    monkeypatch.setattr(metrics_mod, "MAX_CONNECTIONS", 2)
    m = Metrics()
    async with trio.open_nursery() as nursery:
        port = await start(nursery, m)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.sleep(0.1)
        assert await raw(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
        for stream in idle:
            await stream.aclose()
        await trio.sleep(0.1)
        assert (await raw(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()


async def test_started_reports_the_bound_port() -> None:
    """Port 0 binds a free port and reports it; a taken port is an OSError."""
    m = Metrics()
    async with trio.open_nursery() as nursery:
        port = await start(nursery, m)
        assert port > 0
        with pytest.raises(OSError):
            await nursery.start(Metrics().serve, "127.0.0.1", port)
        nursery.cancel_scope.cancel()


# --- the components that feed it --------------------------------------------------------------


async def test_api_requests_are_counted_by_route_template_and_status() -> None:
    """The middleware labels the route template (never the id) and the status; no route →
    'unmatched'; a 405 keeps its route."""
    m = Metrics()
    app = build_app(service=FakeInstanceService(), config=api_config(), ready=lambda: True,
                    expires=ExpiresPolicy(), calls=FakeCallControl(), metrics=m)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://sipis.test") as client:
        assert (await client.get("/v1/instances/abc123")).status_code == 401
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/nowhere/abc123")).status_code == 404
        assert (await client.put("/v1/instances/abc123")).status_code == 405
    text = scrape(m)
    assert value(text, "sipis_http_requests_total", route="/v1/instances/{id}", method="GET",
                 status="401") == 1
    assert value(text, "sipis_http_requests_total", route="/healthz", method="GET",
                 status="200") == 1
    assert value(text, "sipis_http_requests_total", route=UNMATCHED_ROUTE, method="GET",
                 status="404") == 1
    assert value(text, "sipis_http_requests_total", route="/v1/instances/{id}", method="PUT",
                 status="405") == 1
    assert "abc123" not in text
    assert value(text, "sipis_http_request_duration_seconds_count", route="/healthz") == 1


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_keeper_counts_register_transactions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 401 challenge then a 200: two transactions, by result, both timed."""
    m = Metrics()
    registrar = FakeRegistrar()
    async with trio.open_nursery() as nursery:
        keeper = RegistrationKeeper(endpoint=registrar, resolver=FakeResolver(),
                                    store=FakeStatusStore(), config=CONFIG,
                                    rng=random.Random(3), metrics=m)
        await nursery.start(keeper.run)
        outcome = await keeper.register_first(record(1))
        assert outcome.registered
        nursery.cancel_scope.cancel()
    text = scrape(m)
    assert value(text, "sipis_register_transactions_total", result="401") == 1
    assert value(text, "sipis_register_transactions_total", result="2xx") == 1
    assert value(text, "sipis_register_duration_seconds_count") == 2


async def test_dispatcher_times_each_push_request(autojump_clock: trio.testing.MockClock) -> None:
    """Every finished try is timed by provider, accepted or refused."""
    m = Metrics()
    client = ScriptedClient(script=[None, InvalidToken("Unregistered")])
    dispatcher = PushDispatcher({"fcm": client}, on_request_done=m.push_request_done)
    m.watch(pushes=lambda: dispatcher.statistics().counts)
    await dispatcher.send(REQUEST, deadline=trio.current_time() + 10)
    with pytest.raises(InvalidToken):
        await dispatcher.send(REQUEST, deadline=trio.current_time() + 10)
    text = scrape(m)
    assert value(text, "sipis_push_request_duration_seconds_count", provider="fcm") == 2
    assert value(text, "sipis_push_sent_total", provider="fcm", result="accepted") == 1
    assert value(text, "sipis_push_sent_total", provider="fcm", result="invalid-token") == 1


async def test_store_calls_are_timed_by_operation(tmp_path: Path) -> None:
    """SqliteStore reports each call under its method's name."""
    m = Metrics()
    store = SqliteStore(tmp_path / "s.db", KeyRing.generate_file(tmp_path / "k.key"))
    store.on_call_done = m.store_call
    await store.open()
    try:
        rec = make_record(1)
        await store.insert(rec)
        await store.get(rec.id)
        await store.delete(rec.id)
    finally:
        await store.close()
    text = scrape(m)
    for operation in ("insert", "get", "delete"):
        assert value(text, "sipis_store_operation_duration_seconds_count",
                     operation=operation) == 1, operation


# --- the Grafana dashboard --------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[1] / "conf" / "grafana-sipis.json"


def test_the_dashboard_only_queries_metrics_that_exist() -> None:
    """Every sipis_/process_ series a panel queries is one /metrics exposes (no stale names)."""
    import json
    import re

    m = Metrics()
    m.register_done("2xx", 0.1)
    m.push_request_done("apns", 0.1)
    m.call_push_accepted(0.1)
    m.instance_wiped("x", "deleted")
    m.http_request("/healthz", "GET", 200, 0.1)
    m.store_call("get", 0.1)
    m.watch(instances=lambda: {"registered": 1}, pushes=lambda: {("apns", "accepted"): 1},
            calls=lambda: {"missed": 1})
    exposed = {s.name for s in samples(scrape(m))}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried = {name for e in exprs for name in re.findall(r"\b(?:sipis|process)_\w+", e)}
    assert queried - exposed == set()
    # Every sipis family is shown (sipis_build_info: by the job/instance variables).
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in exposed
                if n.startswith("sipis_")}
    used = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in queried}
    assert families - used == set()
