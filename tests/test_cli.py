"""The ``sipis`` command line and the embedded ``make run`` defaults."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from sipis.store.crypto import KeyRing, make_verifier
from sipis.store.models import InstanceRecord
from sipis.store.sqlite import SqliteStore
from tests.integration.harness import SUBPROCESS_LOGS
from tests.peers.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def sipis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipis", *args], capture_output=True, text=True, timeout=60,
        check=False,
    )


def test_check_config_accepts_the_shipped_files() -> None:
    """Both example configs are valid: exit 0 and a short confirmation."""
    for name in ("sipis.yaml", "dev.yaml"):
        done = sipis("check-config", "-c", str(ROOT / "conf" / name))
        assert done.returncode == 0, done.stderr
        assert "configuration OK" in done.stdout


def test_check_config_names_the_key_path_and_line_and_exits_78(tmp_path: Path) -> None:
    """A bad value: EX_CONFIG, and the message says where."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("sip:\n  listen:\n    - {transport: udp, host: 127.0.0.1, port: 99999}\n")
    done = sipis("check-config", "-c", str(bad))
    assert done.returncode == 78
    assert "sip.listen[0].port" in done.stderr and "line 3" in done.stderr


def test_run_with_a_missing_config_file_fails_before_starting(tmp_path: Path) -> None:
    """No file, no daemon: EX_CONFIG with the file named."""
    done = sipis("run", "-c", str(tmp_path / "nope.yaml"))
    assert done.returncode == 78
    assert "nope.yaml" in done.stderr


async def test_instances_list_and_show_print_no_secrets(tmp_path: Path) -> None:
    """The admin view: ids, AORs and state; never the password or the full push token."""
    key = tmp_path / "sipis.key"
    store = SqliteStore(tmp_path / "sipis.db", KeyRing.generate_file(key))
    await store.open()
    await store.insert(InstanceRecord(
        id="cli-instance-0001", secret_verifier=make_verifier("s"), app="com.example.phone",
        aor="sip:alice@sip.test", username="alice", password="cli-password-never-shown",
        registrar=None, outbound_proxy=None, expires=600, push_provider="apns",
        push_token="cli-push-token-0123456789abcdef", push_environment="production",
        contact_token="clitok", instance_urn="urn:uuid:1", lifetime=3600, created_at=0.0,
        last_heard_at=0.0, expires_at=4_000_000_000.0,
    ))
    await store.close()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": {"path": str(tmp_path / "sipis.db"), "key_file": str(key)},
        "api": {"tls": {"enabled": False}},
    }))
    listing = sipis("instances", "-c", str(cfg), "list")
    assert listing.returncode == 0, listing.stderr
    assert "cli-instance-0001" in listing.stdout and "sip:alice@sip.test" in listing.stdout
    shown = sipis("instances", "-c", str(cfg), "show", "cli-instance-0001")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["aor"] == "sip:alice@sip.test"
    for out in (listing.stdout, shown.stdout):
        assert "cli-password-never-shown" not in out
        assert "cli-push-token-0123456789abcdef" not in out
    assert sipis("instances", "-c", str(cfg), "show", "unknown").returncode == 1


def test_embedded_defaults_start_with_nothing_but_the_config(tmp_path: Path) -> None:
    """conf/dev.yaml (what ``make run`` uses) starts on a bare directory: it generates the
    store key and a self-signed TLS certificate, logs the certificate's path, and serves."""
    settings = yaml.safe_load((ROOT / "conf" / "dev.yaml").read_text())
    sip_port, api_port = free_port("both"), free_port("tcp")
    for item in settings["sip"]["listen"]:
        item["port"] = sip_port
    settings["api"]["listen"]["port"] = api_port
    settings["metrics"]["listen"]["port"] = free_port("tcp")
    var = tmp_path / "var"
    settings["store"]["path"] = str(var / "sipis.db")
    settings["store"]["key_file"] = str(var / "sipis.key")
    settings["api"]["tls"]["self_signed_dir"] = str(var / "tls")
    cfg = tmp_path / "dev.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    log_path = tmp_path / "daemon.log"
    SUBPROCESS_LOGS.append(log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sipis", "run", "-c", str(cfg)], stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            certs: list[Path] = []
            while time.monotonic() < deadline and proc.poll() is None:
                certs = sorted((var / "tls").glob("*.crt")) if (var / "tls").exists() else []
                if certs:
                    ctx = ssl.create_default_context(cafile=str(certs[0]))
                    try:
                        r = httpx.get(f"https://127.0.0.1:{api_port}/readyz", verify=ctx,
                                      timeout=1)
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                time.sleep(0.2)
            else:
                raise AssertionError(log_path.read_text()[-2000:])
            assert (var / "sipis.key").stat().st_mode & 0o077 == 0
            assert str(certs[0]) in log_path.read_text()
        finally:
            proc.terminate()
            assert proc.wait(timeout=20) == 0
