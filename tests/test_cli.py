"""The ``sipis`` command line and the embedded ``make run`` defaults."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
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


@pytest.mark.parametrize("problem", ["store-not-a-database", "port-taken"])
def test_run_that_cannot_start_exits_69_with_one_clear_line_and_no_traceback(
    tmp_path: Path, problem: str
) -> None:
    """A store file that is not a database, or an API port another process holds: exit 69
    (EX_UNAVAILABLE: systemd retries later) with the reason, not a Python traceback."""
    import socket

    from tests.integration.harness import daemon_settings, write_config

    settings = daemon_settings(tmp_path, api_port=free_port("tcp"))
    holder = socket.socket()
    try:
        if problem == "store-not-a-database":
            (tmp_path / "sipis.db").write_bytes(b"this is not an SQLite database, " * 64)
        else:
            holder.bind(("127.0.0.1", settings["api"]["listen"]["port"]))
            holder.listen()
        done = sipis("run", "-c", str(write_config(tmp_path, settings)))
    finally:
        holder.close()
    assert done.returncode == 69, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert ("cannot open the store" if problem == "store-not-a-database"
            else "cannot start") in done.stderr


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


# -- admin commands (issue 6): keygen, instances delete and rotate-key without a daemon --------


def test_a_usage_error_exits_64() -> None:
    """An unknown command or a missing argument: EX_USAGE (64), as sysexits says."""
    assert sipis("no-such-command").returncode == 64
    assert sipis("instances", "delete").returncode == 64


def test_keygen_writes_a_private_key_file_and_never_overwrites(tmp_path: Path) -> None:
    """keygen -o: a 0600 file with one key (not printed); a second run exits 73, untouched."""
    key = tmp_path / "store.key"
    done = sipis("keygen", "-o", str(key))
    assert done.returncode == 0, done.stderr
    ring = KeyRing.load(key)
    assert len(ring.key_ids) == 1 and ring.active_key_id in done.stdout
    assert key.stat().st_mode & 0o777 == 0o600
    secret_part = key.read_text().split()[-1]
    assert secret_part not in done.stdout + done.stderr
    before = key.read_bytes()
    again = sipis("keygen", "-o", str(key))
    assert again.returncode == 73 and "refusing to overwrite" in again.stderr
    assert key.read_bytes() == before


def test_keygen_defaults_to_the_configured_key_file(tmp_path: Path) -> None:
    """Without -o, keygen writes store.key_file of the config."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"key_file": str(tmp_path / "k")},
                                   "api": {"tls": {"enabled": False}}}))
    assert sipis("keygen", "-c", str(cfg)).returncode == 0
    assert len(KeyRing.load(tmp_path / "k").key_ids) == 1


def record(n: int) -> InstanceRecord:
    return InstanceRecord(
        id=f"rot-{n:05d}", secret_verifier=make_verifier("s"), app="com.example.phone",
        aor=f"sip:user{n}@sip.test", username=f"user{n}", password=f"rotate-pw-{n:05d}",
        registrar=None, outbound_proxy=None, expires=600, push_provider="fcm",
        push_token=f"rotate-push-token-{n:05d}", push_environment=None,
        contact_token=f"rottok{n:05d}", instance_urn="urn:uuid:1", lifetime=3600,
        created_at=float(n), last_heard_at=0.0, expires_at=4_000_000_000.0,
        device_ha1={"MD5": "0" * 32, "SHA-256": "1" * 64},
    )


async def seeded(directory: Path, count: int) -> Path:
    """A store of ``count`` instances written as a running sipis would; returns the config."""
    store = SqliteStore(directory / "sipis.db", KeyRing.generate_file(directory / "sipis.key"))
    await store.open()
    try:
        for n in range(count):
            await store.insert(record(n))
    finally:
        await store.close()
    cfg = directory / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": {"path": str(directory / "sipis.db"), "key_file": str(directory / "sipis.key")},
        "api": {"tls": {"enabled": False}}}))
    return cfg


async def passwords(directory: Path) -> dict[str, str]:
    """Every stored password, decrypted with the key file as it is on disk now."""
    store = SqliteStore(directory / "sipis.db", KeyRing.load(directory / "sipis.key"))
    await store.open()
    try:
        return {rec.id: rec.password for rec in await store.list_all()}
    finally:
        await store.close()


async def test_instances_delete_without_a_daemon_wipes_and_says_upstream_stays(
    tmp_path: Path,
) -> None:
    """No daemon: exit 0 and the row is gone (scrubbed); the upstream binding is left to
    expire, and the output says so; a second delete exits 1 (no such instance)."""
    cfg = await seeded(tmp_path, 2)
    done = sipis("instances", "delete", "rot-00001", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    assert "not running" in done.stdout and "expires at the provider" in done.stdout
    assert list(await passwords(tmp_path)) == ["rot-00000"]
    assert b"rot-00001" not in (tmp_path / "sipis.db").read_bytes()
    again = sipis("instances", "-c", str(cfg), "delete", "rot-00001")
    assert again.returncode == 1 and "no instance rot-00001" in again.stderr


async def test_rotate_key_without_a_daemon(tmp_path: Path) -> None:
    """rotate-key: one new key in the file, every password still readable, exit 0."""
    cfg = await seeded(tmp_path, 20)
    old = KeyRing.load(tmp_path / "sipis.key").active_key_id
    done = sipis("rotate-key", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    ring = KeyRing.load(tmp_path / "sipis.key")
    assert ring.key_ids == (ring.active_key_id,) and ring.active_key_id != old
    assert f"dropped key(s) {old}" in done.stdout
    assert await passwords(tmp_path) == {f"rot-{n:05d}": f"rotate-pw-{n:05d}" for n in range(20)}


ROTATE_SEEDED = 2000
#: (what to wait for, seconds to wait after it) before each SIGKILL. "key-file": the key file
#: was replaced (a key was added); "wal": the rekey transaction has started writing; "start":
#: the process was started.
KILL_PLAN = (
    ("key-file", 0.0), ("key-file", 0.002), ("wal", 0.0), ("key-file", 0.01),
    ("wal", 0.005), ("key-file", 0.03), ("wal", 0.02), ("key-file", 0.06), ("key-file", 0.1),
    ("wal", 0.05), ("key-file", 0.2), ("start", 0.5), ("start", 0.8),
)


def kill_at(proc: subprocess.Popen[bytes], directory: Path, trigger: str, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``trigger`` (polled every 0.5 ms); False if it ended
    first."""
    key_file, wal = directory / "sipis.key", directory / "sipis.db-wal"
    inode = key_file.stat().st_ino
    deadline = time.monotonic() + 60

    def fired() -> bool:
        if trigger == "start":
            return True
        try:
            replaced = key_file.stat().st_ino != inode
        except FileNotFoundError:
            replaced = True
        if trigger == "key-file":
            return replaced
        try:
            return wal.stat().st_size > 0
        except FileNotFoundError:
            return False

    while not fired():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    return True


@pytest.mark.slow
async def test_rotate_key_killed_half_way_and_run_again_leaves_every_password_readable(
    tmp_path: Path,
) -> None:
    """rotate-key SIGKILLed at many points (just after the key file changed, while the rekey
    transaction writes, shortly after): every password decrypts with the key file on disk after
    each kill, the file never holds more than two keys, and a final run completes: one key,
    every value under it."""
    cfg = await seeded(tmp_path, ROTATE_SEEDED)
    expected = {f"rot-{n:05d}": f"rotate-pw-{n:05d}" for n in range(ROTATE_SEEDED)}
    killed_mid_rotation = 0
    for trigger, delay in KILL_PLAN:
        proc = subprocess.Popen([sys.executable, "-m", "sipis", "rotate-key", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            killed = await trio.to_thread.run_sync(kill_at, proc, tmp_path, trigger, delay)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if not killed:
            assert proc.returncode == 0, (trigger, delay)
        keys = KeyRing.load(tmp_path / "sipis.key").key_ids
        assert 1 <= len(keys) <= 2, keys
        killed_mid_rotation += killed and len(keys) == 2
        wal = tmp_path / "sipis.db-wal"
        print(f"{trigger}+{delay}s: killed={killed} keys={len(keys)} "
              f"wal={wal.stat().st_size if wal.exists() else None}")
        assert await passwords(tmp_path) == expected, (trigger, delay)
    assert killed_mid_rotation >= 3  # the plan did interrupt rotations half-way
    done = sipis("rotate-key", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    ring = KeyRing.load(tmp_path / "sipis.key")
    assert ring.key_ids == (ring.active_key_id,)
    assert await passwords(tmp_path) == expected
    store = SqliteStore(tmp_path / "sipis.db", ring)
    await store.open()
    try:
        assert await store.key_usage() == {ring.active_key_id: 3 * ROTATE_SEEDED}
    finally:
        await store.close()
    assert not list(tmp_path.glob(".sipis.key.*.tmp"))
