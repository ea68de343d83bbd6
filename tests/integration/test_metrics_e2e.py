"""/metrics of a whole daemon: it parses with Prometheus's own parser, and its counters move as
a registration (Kamailio) and a call (sipp through Kamailio) happen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sipis import __version__
from tests.integration.harness import SENSITIVE, RunningDaemon, instance_body, running_daemon
from tests.peers.caller import Scenario

pytestmark = pytest.mark.kamailio

METRICS_ON = {"enabled": True, "listen": {"host": "127.0.0.1", "port": 0}}


async def scrape(d: RunningDaemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics, parsed: (sample name, labels) → value."""
    port = d.daemon.metrics_port
    assert port is not None
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    for secret in SENSITIVE:  # passwords, push tokens, instance secrets of this session
        assert secret not in resp.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def get(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
        **labels: str) -> float:
    """One sample; 0 when absent (a labelled counter before its first increment)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)


def total(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    """The sum of a family's samples over all label values."""
    return sum(v for (n, _), v in metrics.items() if n == name)


async def test_metrics_parse_and_move_with_a_registration_and_a_call(
    tmp_path: Path, kamailio_factory: Any, caller_factory: Any
) -> None:
    """Create → REGISTER counters, latency and the instances gauge move; a call → pushes and
    calls by outcome move; DELETE → a wipe by reason. Never an instance id in a label."""
    kamailio = kamailio_factory(fix_nated_register=True, fr_inv_timer=30000)
    async with running_daemon(tmp_path, metrics=METRICS_ON,
                              calls={"ring_timeout": "2s"}) as d:
        before = await scrape(d)
        assert total(before, "sipis_instances") == 0
        assert total(before, "sipis_register_transactions_total") == 0
        assert get(before, "process_cpu_seconds_total") > 0
        assert get(before, "sipis_build_info", version=__version__) == 1

        resp = await d.create(instance_body(kamailio, transport="udp"))
        assert resp.status_code == 201, resp.text
        body = resp.json()
        registered = await scrape(d)
        assert body["id"] not in str(registered.keys())
        # Kamailio challenges the first REGISTER: 401, then 200.
        assert get(registered, "sipis_register_transactions_total", result="401") >= 1
        assert get(registered, "sipis_register_transactions_total", result="2xx") >= 1
        assert get(registered, "sipis_register_duration_seconds_count") >= 2
        assert get(registered, "sipis_instances", state="registered") == 1
        assert get(registered, "sipis_http_requests_total", route="/v1/instances",
                   method="POST", status="201") == 1
        assert get(registered, "sipis_store_operation_duration_seconds_count",
                   operation="insert") >= 1

        caller = caller_factory(kamailio.address, domain=kamailio.domain)
        trace = await caller.run_async(Scenario.REJECTED, to_user="alice", timeout=15)
        assert trace.ok, trace.describe()
        with trio.fail_after(5):  # the call-ended push is sent after the 480
            while get(after := await scrape(d), "sipis_push_sent_total", provider="apns",
                      result="accepted") < 2:
                await trio.sleep(0.1)
        # The call push and the call-ended push, both through the log sink (make run default).
        assert get(after, "sipis_push_request_duration_seconds_count", provider="apns") >= 2
        assert get(after, "sipis_calls_total", outcome="missed") == 1

        gone = await d.client.delete(f"/v1/instances/{body['id']}",
                                     headers={"authorization": f"Bearer {body['secret']}"})
        assert gone.status_code == 204
        wiped = await scrape(d)
        assert get(wiped, "sipis_instance_wipes_total", reason="deleted") == 1
        assert total(wiped, "sipis_instances") == 0
        assert get(wiped, "sipis_http_requests_total", route="/v1/instances/{id}",
                   method="DELETE", status="204") == 1

        # INVITE-to-push latency: the call's accepted push was observed.
        assert get(after, "sipis_invite_to_push_seconds_count") == 1
