"""Issue 3 end to end: the HTTPS API keeps real registrations at a real Kamailio."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from tests.integration.harness import SENSITIVE, instance_body, running_daemon
from tests.peers.dnsserver import SRV, A
from tests.peers.ports import free_port

pytestmark = pytest.mark.kamailio

T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], *, timeout: float = 10.0,
                     interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy (or fail with its last value)."""
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            last = check()
            if isinstance(last, Awaitable):
                last = await last
            if last:
                return last  # type: ignore[no-any-return]
            await trio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def contacts_of(kamailio: Any, token: str) -> list[Any]:
    return [b for b in kamailio.location("alice") if f"sip:{token}@" in b.contact]


def contact_token(daemon: Any, instance_id: str) -> str:
    return str(daemon.daemon.keeper._entries[instance_id].record.contact_token)


@pytest.mark.parametrize(("transport", "algorithm"), [
    ("udp", "MD5"), ("tcp", "MD5"), ("udp", "SHA-256"), ("tcp", "SHA-256"),
])
async def test_create_registers_sipis_contact_at_kamailio(
    tmp_path: Path, kamailio_factory: Any, transport: str, algorithm: str
) -> None:
    """POST → 201, and Kamailio's location table holds sipis's contact for the AOR."""
    kamailio = kamailio_factory(algorithm=algorithm, fix_nated_register=True)
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio, transport=transport))
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["registration"]["state"] == "registered"
        assert body["device"]["username"] == body["id"]
        token = contact_token(d, body["id"])
        [binding] = contacts_of(kamailio, token)
        assert binding.transport == transport
        assert binding.instance and binding.instance.startswith("<urn:uuid:")
        assert f"127.0.0.1:{d.sip_port}" in binding.contact
        assert f"transport={transport}" in binding.contact
        entries = [e for e in kamailio.register_log() if e.authorization]
        assert entries and all(e.transport == transport for e in entries)
        assert algorithm in (kamailio.register_log()[0].www_authenticate or "")
        got = await d.client.get(f"/v1/instances/{body['id']}",
                                 headers={"authorization": f"Bearer {body['secret']}"})
        assert got.status_code == 200
        assert got.json()["registration"]["state"] == "registered"
        assert "password" not in got.text and "alice-secret-pw" not in got.text


async def test_wrong_password_is_422_and_nothing_is_stored(
    tmp_path: Path, kamailio: Any
) -> None:
    """The provider refuses the credentials: 422 naming its status, no row, no binding."""
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio, password="not-the-password"))
        assert resp.status_code == 422, resp.text
        problem = resp.json()
        assert problem["provider_status"] == 401
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert d.daemon.store is not None and await d.daemon.store.count() == 0
        assert kamailio.location("alice") == []


async def test_unanswered_registrar_is_504_and_nothing_is_stored(tmp_path: Path) -> None:
    """A registrar that never answers: 504 after create_timeout, nothing stored."""
    silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    async with running_daemon(tmp_path, api={"create_timeout": "2s"}) as d:
        body = {
            "app": "com.example.phone",
            "sip": {"aor": "sip:alice@sip.test", "password": "pw-unanswered",
                    "registrar": f"sip:127.0.0.1:{port}"},
            "push": {"provider": "fcm", "token": "fcm-token-unanswered-0123456789"},
        }
        resp = await d.create(body)
        assert resp.status_code == 504, resp.text
        assert d.daemon.store is not None and await d.daemon.store.count() == 0
    silent.close()


async def test_domain_outside_the_allow_list_is_403(tmp_path: Path, kamailio: Any) -> None:
    """An AOR domain not allowed by config is refused before any REGISTER."""
    async with running_daemon(tmp_path, api={"allowed_domains": ["example.net"]}) as d:
        resp = await d.create(instance_body(kamailio))
        assert resp.status_code == 403, resp.text
        assert kamailio.register_log(settle=0.2) == []


async def test_bad_bodies_get_field_errors(tmp_path: Path, kamailio: Any) -> None:
    """Malformed JSON, missing fields, wrong types → 400 with errors; huge body → 413."""
    async with running_daemon(tmp_path) as d:
        post = d.client.post
        r = await post("/v1/instances", content=b"{not json",
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["status"] == 400
        r = await post("/v1/instances", json={"app": "com.example.phone"})
        assert r.status_code == 400
        fields = {e["field"] for e in r.json()["errors"]}
        assert {"sip", "push"} <= fields or {"sip.aor", "push.provider"} <= fields
        body = instance_body(kamailio)
        body["sip"]["expires"] = "600"
        body["push"]["provider"] = 7
        r = await post("/v1/instances", json=body)
        assert r.status_code == 400
        fields = {e["field"] for e in r.json()["errors"]}
        assert {"sip.expires", "push.provider"} <= fields
        r = await post("/v1/instances", content=b"{" + b" " * 100_000 + b"}",
                       headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert kamailio.register_log(settle=0.2) == []


async def test_423_is_answered_with_min_expires_and_the_binding_kept(
    tmp_path: Path, kamailio_factory: Any
) -> None:
    """Kamailio's min_expires above what sipis asks → 423 → REGISTER again with Min-Expires."""
    kamailio = kamailio_factory(min_expires=900)
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio, sip={"expires": 120}))
        assert resp.status_code == 201, resp.text
        log = kamailio.register_log()
        assert any(e.status == 423 for e in log)
        assert log[-1].status == 200 and log[-1].requested_expires == 900
        token = contact_token(d, resp.json()["id"])
        [binding] = contacts_of(kamailio, token)
        assert binding.expires is not None and binding.expires > 600


async def test_short_granted_expiry_is_refreshed_for_three_periods(
    tmp_path: Path, kamailio_factory: Any
) -> None:
    """Kamailio grants 4 s: the binding is present at every check over three periods."""
    kamailio = kamailio_factory(max_expires=4)
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio))
        assert resp.status_code == 201, resp.text
        token = contact_token(d, resp.json()["id"])
        for _ in range(26):  # 13 s: more than three 4 s periods
            assert contacts_of(kamailio, token), "binding lapsed"
            await trio.sleep(0.5)
        refreshes = [e for e in kamailio.register_log() if e.status == 200]
        assert len(refreshes) >= 4
        assert all(e.granted_expires == 4 for e in refreshes)


async def test_provider_outage_backs_off_with_jitter_then_reregisters_paced(
    tmp_path: Path, kamailio_factory: Any
) -> None:
    """Kamailio down → GET shows backoff, last error and (jittered) next attempts; back up →
    every instance registered again within the backoff cap, never above the REGISTER rate."""
    from tests.integration.test_restart import max_per_second

    rate, burst = 4, 2
    kamailio = kamailio_factory(max_expires=30)
    async with running_daemon(tmp_path, registrar={"register_rate": rate,
                                                   "register_burst": burst}) as d:
        made = [(await d.create(instance_body(kamailio, transport="tcp"))).json()
                for _ in range(4)]
        assert all("id" in m for m in made), made
        kamailio.stop()  # the TCP flows drop: each binding tries again, fails, backs off

        async def all_in_backoff() -> list[dict[str, Any]] | None:
            regs = []
            for m in made:
                r = await d.client.get(f"/v1/instances/{m['id']}",
                                       headers={"authorization": f"Bearer {m['secret']}"})
                reg = r.json()["registration"]
                if reg["state"] != "backoff":
                    return None
                regs.append(reg)
            return regs

        regs = await eventually(all_in_backoff, timeout=20)
        assert all(reg["last_error"] and reg["next_attempt_at"] for reg in regs)
        assert len({reg["next_attempt_at"] for reg in regs}) == len(regs), "no jitter"
        kamailio.start()
        restarted = trio.current_time()
        mark = __import__("time").time()
        tokens = [contact_token(d, m["id"]) for m in made]
        # Within the backoff cap (4 s) plus pacing and a transaction, all are back.
        await eventually(lambda: all(contacts_of(kamailio, t) for t in tokens), timeout=12)
        assert trio.current_time() - restarted < 12
        times = [e.time for e in kamailio.register_log() if e.time >= mark]
        assert max_per_second(times, window=3.0) <= 3 * rate + burst


async def test_a_dropped_tcp_flow_is_noticed_and_the_binding_restored(
    tmp_path: Path, kamailio_factory: Any
) -> None:
    """Kamailio restarts (TCP connection gone, bindings forgotten): sipis registers again at
    once, minutes before the refresh would have."""
    kamailio = kamailio_factory(fix_nated_register=True)
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio, transport="tcp"))
        assert resp.status_code == 201, resp.text
        token = contact_token(d, resp.json()["id"])
        assert contacts_of(kamailio, token)[0].expires > 300  # next refresh: minutes away
        kamailio.restart()
        assert contacts_of(kamailio, token) == []
        await eventually(lambda: contacts_of(kamailio, token), timeout=8)
        [binding] = contacts_of(kamailio, token)
        assert binding.transport == "tcp"


async def test_delete_unregisters_and_leaves_no_ciphertext(
    tmp_path: Path, kamailio: Any
) -> None:
    """DELETE → Expires: 0 at Kamailio, binding gone, and the password's ciphertext is in no
    byte of the database files (db, -wal, -shm)."""
    async with running_daemon(tmp_path) as d:
        created = [await d.create(instance_body(kamailio)) for _ in range(3)]
        assert all(r.status_code == 201 for r in created)
        victim = created[1].json()
        token = contact_token(d, victim["id"])
        db = tmp_path / "sipis.db"
        with sqlite3.connect(db) as conn:
            blobs = _secret_blobs(conn, victim["id"])
        assert blobs, "the store holds no encrypted values for the instance?"
        r = await d.client.delete(f"/v1/instances/{victim['id']}",
                                  headers={"authorization": f"Bearer {victim['secret']}"})
        assert r.status_code == 204
        assert contacts_of(kamailio, token) == []
        dereg = [e for e in kamailio.register_log() if e.is_deregister]
        assert dereg and any(token in e.contacts[0] for e in dereg)
        r = await d.client.get(f"/v1/instances/{victim['id']}",
                               headers={"authorization": f"Bearer {victim['secret']}"})
        assert r.status_code == 404
        for suffix in ("", "-wal", "-shm"):
            path = Path(str(db) + suffix)
            if path.exists():
                data = path.read_bytes()
                for blob in blobs:
                    assert blob not in data, f"ciphertext left in {path.name}"
                assert victim["id"].encode() not in data
        others = [contact_token(d, r.json()["id"]) for r in (created[0], created[2])]
        assert all(contacts_of(kamailio, t) for t in others)


def _secret_blobs(conn: sqlite3.Connection, instance_id: str) -> list[bytes]:
    """Every BLOB column of the instance's row longer than 16 bytes (the ciphertexts)."""
    conn.row_factory = sqlite3.Row
    row = conn.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone()
    assert row is not None
    return [bytes(row[k]) for k in row.keys()  # noqa: SIM118
            if isinstance(row[k], bytes) and len(row[k]) > 16 and k != "secret_verifier"]


async def test_lifetime_expiry_wipes_and_patch_extends(
    tmp_path: Path, kamailio: Any
) -> None:
    """A short lifetime ends the instance (unREGISTER + wipe); a PATCH pushes it out."""
    async with running_daemon(tmp_path) as d:
        short = await d.create(instance_body(kamailio, lifetime=3))
        kept = await d.create(instance_body(kamailio, lifetime=3))
        assert short.status_code == kept.status_code == 201
        short_token = contact_token(d, short.json()["id"])
        kept_id, kept_secret = kept.json()["id"], kept.json()["secret"]
        auth = {"authorization": f"Bearer {kept_secret}"}
        for _ in range(4):
            await trio.sleep(1.0)
            r = await d.client.patch(f"/v1/instances/{kept_id}", json={}, headers=auth)
            assert r.status_code == 200, r.text
        r = await d.client.get(f"/v1/instances/{short.json()['id']}",
                               headers={"authorization": f"Bearer {short.json()['secret']}"})
        assert r.status_code == 404
        assert contacts_of(kamailio, short_token) == []
        assert any(e.is_deregister and short_token in e.contacts[0]
                   for e in kamailio.register_log())
        r = await d.client.get(f"/v1/instances/{kept_id}", headers=auth)
        assert r.status_code == 200
        assert any("wiped reason=expired" in line for line in _log_lines())


def _log_lines() -> list[str]:
    from tests.integration.harness import LOG_LINES

    return LOG_LINES


async def test_instance_refused_past_not_registered_max_age_is_wiped(
    tmp_path: Path, kamailio_factory: Any
) -> None:
    """The provider stops accepting the credentials: after not_registered_max_age, wiped."""
    kamailio = kamailio_factory(max_expires=2)
    async with running_daemon(tmp_path, lifetime={"not_registered_max_age": "4s"}) as d:
        resp = await d.create(instance_body(kamailio))
        assert resp.status_code == 201
        iid, secret = resp.json()["id"], resp.json()["secret"]
        kamailio.restart(users={"alice": "a-changed-password", "bob": "bob-secret-pw"})
        SENSITIVE.add("a-changed-password")
        auth = {"authorization": f"Bearer {secret}"}

        async def gone() -> bool:
            r = await d.client.get(f"/v1/instances/{iid}", headers=auth)
            return r.status_code == 404

        await eventually(gone, timeout=15, interval=0.5)
        assert any("wiped reason=not-registered" in line for line in _log_lines())


async def test_registrar_found_by_srv_with_failover_to_the_second_target(
    tmp_path: Path, kamailio: Any, dns_server_factory: Any
) -> None:
    """registrar given as a domain: SRV from a real DNS server; the first target is dead."""
    dead = free_port("both")
    dns = dns_server_factory([
        SRV("_sip._udp.sip.test", "dead.sip.test", dead, priority=10),
        SRV("_sip._udp.sip.test", "kam.sip.test", kamailio.port, priority=20),
        A("dead.sip.test", "127.0.0.1"),
        A("kam.sip.test", "127.0.0.1"),
    ])
    async with running_daemon(
        tmp_path, sip={"dns": {"nameservers": ["127.0.0.1"], "port": dns.port},
                       "timers": {"t1": "100ms"}},
    ) as d:
        body = instance_body(kamailio)
        body["sip"]["registrar"] = "sip:sip.test"
        resp = await d.create(body)
        assert resp.status_code == 201, resp.text
        assert contacts_of(kamailio, contact_token(d, resp.json()["id"]))
        queried = {name.rstrip(".") for _, name in dns.queries()}
        assert "_sip._udp.sip.test" in queried


async def test_foreground_hands_the_registration_to_the_app_and_background_takes_it_back(
    tmp_path: Path, kamailio: Any
) -> None:
    """foreground → sipis unREGISTERs (Expires: 0) and keeps the instance; background →
    registered again. Neither ends the instance."""
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio))
        assert resp.status_code == 201, resp.text
        iid, secret = resp.json()["id"], resp.json()["secret"]
        auth = {"authorization": f"Bearer {secret}"}
        token = contact_token(d, iid)
        r = await d.client.post(f"/v1/instances/{iid}/foreground", headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["registration"]["state"] == "unregistered"
        assert contacts_of(kamailio, token) == []
        assert any(e.is_deregister and token in e.contacts[0] for e in kamailio.register_log())
        r = await d.client.get(f"/v1/instances/{iid}", headers=auth)
        assert r.status_code == 200 and r.json()["registration"]["state"] == "unregistered"
        r = await d.client.post(f"/v1/instances/{iid}/background", headers=auth)
        assert r.status_code == 200, r.text
        await eventually(lambda: contacts_of(kamailio, token), timeout=10)
        r = await d.client.get(f"/v1/instances/{iid}", headers=auth)
        assert r.json()["registration"]["state"] == "registered"
