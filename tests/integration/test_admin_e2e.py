"""Issue 6 end to end: the admin CLI against a running daemon and a real Kamailio.

``sipis instances delete`` while the daemon runs goes through its control socket and the one
wipe path (unREGISTER at Kamailio, store wipe, one log line); ``sipis rotate-key`` makes the
running daemon re-encrypt and use the new key; a second daemon on the same store is refused.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from sipis.admin import ControlSocketInUse, control_socket_path
from sipis.daemon import Daemon
from sipis.store.crypto import KeyRing
from tests.integration.harness import LOG_LINES, SENSITIVE, instance_body, running_daemon
from tests.integration.test_registration import contact_token, contacts_of, eventually

pytestmark = pytest.mark.kamailio


async def sipis(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a child process, without blocking the daemon's event loop."""
    def go() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sipis", *args], capture_output=True,
                              text=True, timeout=120, check=False)

    return await trio.to_thread.run_sync(go)


async def test_instances_delete_while_the_daemon_runs_is_a_full_wipe(
    tmp_path: Path, kamailio: Any
) -> None:
    """delete ID -c FILE with the daemon up: exit 0, the API says 404, Kamailio has no
    binding left, exactly one wipe log line (reason admin); a second delete exits 1."""
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio))
        assert resp.status_code == 201, resp.text
        instance_id, secret = resp.json()["id"], resp.json()["secret"]
        token = contact_token(d, instance_id)
        assert contacts_of(kamailio, token)
        # "--": ids are base64url and may start with "-"
        done = await sipis("instances", "delete", "-c", str(d.config_path), "--", instance_id)
        assert done.returncode == 0, done.stderr
        assert "running daemon" in done.stdout
        got = await d.client.get(f"/v1/instances/{instance_id}",
                                 headers={"authorization": f"Bearer {secret}"})
        assert got.status_code == 404
        await eventually(lambda: kamailio.location("alice") == [])
        wipes = [line for line in LOG_LINES
                 if f"instance={instance_id[:8]} wiped" in line]
        assert len(wipes) == 1 and "reason=admin" in wipes[0], wipes
        again = await sipis("instances", "-c", str(d.config_path), "delete", "--", instance_id)
        assert again.returncode == 1 and "no instance" in again.stderr
        assert d.daemon.store is not None and await d.daemon.store.count() == 0


async def test_rotate_key_goes_through_the_running_daemon(
    tmp_path: Path, kamailio: Any
) -> None:
    """rotate-key with the daemon up: the daemon re-encrypts and encrypts new values with the
    new key, the old key leaves the file, and the instance keeps working."""
    async with running_daemon(tmp_path) as d:
        resp = await d.create(instance_body(kamailio))
        assert resp.status_code == 201, resp.text
        instance_id, secret = resp.json()["id"], resp.json()["secret"]
        key_file = tmp_path / "sipis.key"
        old = KeyRing.load(key_file).active_key_id
        done = await sipis("rotate-key", "-c", str(d.config_path))
        assert done.returncode == 0, done.stderr
        assert "by the running daemon" in done.stdout
        ring = KeyRing.load(key_file)
        assert ring.key_ids == (ring.active_key_id,) and ring.active_key_id != old
        store = d.daemon.store
        assert store is not None and store.keyring.active_key_id == ring.active_key_id
        assert set(await store.key_usage()) == {ring.active_key_id}
        auth = {"authorization": f"Bearer {secret}"}
        SENSITIVE.add("apns-token-after-rotation")
        patched = await d.client.patch(f"/v1/instances/{instance_id}",
                                       json={"push": {"token": "apns-token-after-rotation"}},
                                       headers=auth)
        assert patched.status_code == 200, patched.text
        assert set(await store.key_usage()) == {ring.active_key_id}
        reread = await store.get(instance_id)  # decrypts with the new key only
        assert reread.push_token == "apns-token-after-rotation"


async def test_the_daemon_survives_garbage_and_a_second_daemon_is_refused(
    tmp_path: Path,
) -> None:
    """Noise on the control socket gets an error answer and the daemon stays up; a second
    daemon with the same store stops before touching it."""
    async with running_daemon(tmp_path) as d:
        path = control_socket_path(d.daemon.config)

        def exchange(data: bytes) -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                out = b""
                while chunk := sock.recv(4096):
                    out += chunk
                return out

        for data in (b"\x00\xffnoise\n", b'{"op": "wipe", "id": null}\n', b"{" * 10000):
            answer = json.loads(await trio.to_thread.run_sync(exchange, data))
            assert answer["ok"] is False
        status = json.loads(await trio.to_thread.run_sync(exchange, b'{"op": "status"}\n'))
        assert status["ok"] is True and status["instances"] == 0
        with pytest.raises(ControlSocketInUse):
            await Daemon(config=d.daemon.config).run()
        assert (await d.client.get("/readyz")).status_code == 200
    assert not path.exists()  # removed on stop
