"""The admin control socket (protocol, binding rules) and rotate-key's steps, in process."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import yaml

from sipis.admin import (
    MAX_REQUEST,
    AdminError,
    ControlSocket,
    ControlSocketInUse,
    DaemonAdmin,
    DaemonFailed,
    DaemonNotRunning,
    KeyMissing,
    Refused,
    RekeyOutcome,
    RotationBusy,
    answer_request,
    ask_daemon,
    control_socket_path,
    delete_instance,
    rotate_key,
)
from sipis.config import Config, load_config
from sipis.store.crypto import KeyRing, make_verifier
from sipis.store.errors import StoreError
from sipis.store.models import HeldMessage, InstanceRecord
from sipis.store.sqlite import SqliteStore


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: pytest's tmp_path can come near the 107-byte socket path limit."""
    with tempfile.TemporaryDirectory(prefix="sipis-adm-", dir="/tmp") as name:
        yield Path(name)


@attrs.define
class FakeBackend:
    """Records what the socket asked; ``fail`` makes every call raise it."""

    wiped: list[str] = attrs.Factory(list)
    rekeys: int = 0
    fail: Exception | None = None

    async def status(self) -> dict[str, Any]:
        if self.fail:
            raise self.fail
        return {"instances": 3, "registered": 2, "active_key": "k-1",
                "keys_in_use": {"k-1": 9}}

    async def wipe(self, instance_id: str) -> bool:
        if self.fail:
            raise self.fail
        self.wiped.append(instance_id)
        return instance_id == "known"

    async def rekey(self) -> RekeyOutcome:
        if self.fail:
            raise self.fail
        self.rekeys += 1
        return RekeyOutcome(rewritten=4, active_key="k-2", keys_in_use={"k-2": 12})


async def ask(line: bytes, backend: FakeBackend | None = None) -> dict[str, Any]:
    return await answer_request(line, backend or FakeBackend())


# -- the protocol -------------------------------------------------------------------------------


async def test_each_op_answers_with_ok_and_its_fields() -> None:
    """status, wipe and rekey reach the backend and answer one object with "ok": true."""
    backend = FakeBackend()
    assert await ask(b'{"op": "status"}', backend) == {
        "ok": True, "instances": 3, "registered": 2, "active_key": "k-1",
        "keys_in_use": {"k-1": 9}}
    assert await ask(b'{"op": "wipe", "id": "known"}', backend) == {"ok": True, "deleted": True}
    assert await ask(b'{"op": "wipe", "id": "other"}', backend) == {"ok": True,
                                                                    "deleted": False}
    assert await ask(b'{"op": "rekey"}', backend) == {
        "ok": True, "rewritten": 4, "active_key": "k-2", "keys_in_use": {"k-2": 12}}
    assert backend.wiped == ["known", "other"] and backend.rekeys == 1


@pytest.mark.parametrize("line", [
    b"", b"not json", b"\xff\xfe", b"[1, 2]", b"42", b"null", b'{"op": 7}', b'{"id": "x"}',
    b"[" * 5000 + b"]" * 5000, b'{"op": "wipe"}', b'{"op": "wipe", "id": ""}',
    b'{"op": "wipe", "id": 12}', b'{"op": "wipe", "id": "a\\nb"}', b'{"op": "wipe", "id": " x"}',
    b'{"op": "wipe", "id": "' + b"x" * 300 + b'"}',
])
async def test_garbage_gets_a_bad_request_answer(line: bytes) -> None:
    """Anything but a well-formed request: an error answer, the backend is not called."""
    backend = FakeBackend()
    answer = await ask(line, backend)
    assert answer["ok"] is False and answer["error"] == "bad-request", answer
    assert backend.wiped == [] and backend.rekeys == 0


async def test_an_unknown_op_is_named_as_such() -> None:
    """An op the daemon does not know: error "unknown-op" listing the ones it does."""
    answer = await ask(b'{"op": "shutdown"}')
    assert answer == {"ok": False, "error": "unknown-op",
                      "message": "op must be one of: status, wipe, rekey"}


@pytest.mark.parametrize(("error", "message"), [
    (StoreError("SQLite: disk I/O error"), "SQLite: disk I/O error"),
    (Refused("the key file lacks the key k-1"), "the key file lacks the key k-1"),
    (RuntimeError("secret-looking internals"), "internal error (see the daemon's log)"),
])
async def test_a_failing_backend_gives_a_failed_answer(error: Exception, message: str) -> None:
    """Store errors and refusals are passed on by message; anything else is not shown."""
    answer = await ask(b'{"op": "rekey"}', FakeBackend(fail=error))
    assert answer == {"ok": False, "error": "failed", "message": message}


# -- the socket ---------------------------------------------------------------------------------


@asynccontextmanager
async def serving(path: Path, backend: FakeBackend) -> AsyncIterator[ControlSocket]:
    control = ControlSocket.bind(path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, backend)
            yield control
            nursery.cancel_scope.cancel()
    finally:
        control.close()


def raw_exchange(path: Path, data: bytes, *, shut: bool = True) -> bytes:
    """Send raw bytes, read until the daemon closes (blocking: run it in a thread)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(path))
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


async def test_the_socket_serves_requests_with_mode_0600(short_dir: Path) -> None:
    """A bound socket is private to its owner, answers a client, and is gone after close."""
    path = short_dir / "sipis.ctl"
    backend = FakeBackend()
    async with serving(path, backend):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert (await ask_daemon(path, {"op": "wipe", "id": "known"}, timeout=5)
                == {"ok": True, "deleted": True})
        with pytest.raises(DaemonFailed) as info:
            await ask_daemon(path, {"op": "nope"}, timeout=5)
        assert info.value.code == "unknown-op"
    assert not path.exists()
    assert [p.name for p in short_dir.iterdir()] == []  # no temporary name left behind


async def test_garbage_on_the_socket_is_answered_and_the_server_keeps_serving(
    short_dir: Path,
) -> None:
    """Bad JSON, binary noise, an over-long line, a silent probe: answers, never a crash."""
    path = short_dir / "sipis.ctl"
    async with serving(path, FakeBackend()):
        for data in (b"hello\n", os.urandom(300) + b"\n", b'{"op":"status"}',
                     b'{"op":"status"', b"\n"):
            out = await trio.to_thread.run_sync(raw_exchange, path, data)
            answer = json.loads(out)
            assert out.endswith(b"\n") and out.count(b"\n") == 1
            assert answer["ok"] is (data == b'{"op":"status"}'), (data, answer)
        out = await trio.to_thread.run_sync(raw_exchange, path, b"x" * (MAX_REQUEST * 4))
        assert json.loads(out)["error"] == "bad-request" and b"longer than" in out
        assert await trio.to_thread.run_sync(raw_exchange, path, b"") == b""  # a probe
        status = await ask_daemon(path, {"op": "status"}, timeout=5)
        assert status["instances"] == 3


async def test_a_second_daemon_on_a_live_socket_is_refused(short_dir: Path) -> None:
    """Another daemon answering: ControlSocketInUse, and the live socket is left alone."""
    path = short_dir / "sipis.ctl"
    async with serving(path, FakeBackend()):
        before = os.stat(path).st_ino
        with pytest.raises(ControlSocketInUse):
            ControlSocket.bind(path)
        assert os.stat(path).st_ino == before
        assert (await ask_daemon(path, {"op": "status"}, timeout=5))["ok"] is True


async def test_a_stale_socket_is_replaced_and_other_files_are_refused(short_dir: Path) -> None:
    """A killed daemon's socket file is taken over; a regular file at the path is never."""
    path = short_dir / "sipis.ctl"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with pytest.raises(DaemonNotRunning):
        await ask_daemon(path, {"op": "status"}, timeout=5)
    async with serving(path, FakeBackend()):
        assert (await ask_daemon(path, {"op": "status"}, timeout=5))["ok"] is True
    other = short_dir / "precious.db"
    other.write_bytes(b"data")
    with pytest.raises(AdminError, match="not a socket"):
        ControlSocket.bind(other)
    assert other.read_bytes() == b"data"


async def test_no_socket_file_means_no_daemon(short_dir: Path) -> None:
    """A missing socket is DaemonNotRunning: the CLI may then work on the store itself."""
    with pytest.raises(DaemonNotRunning):
        await ask_daemon(short_dir / "absent.ctl", {"op": "status"}, timeout=5)


async def test_close_leaves_a_newer_daemons_socket_alone(short_dir: Path) -> None:
    """Stopping removes the socket file only if it is still the one this daemon bound."""
    path = short_dir / "sipis.ctl"
    old = ControlSocket.bind(path)
    old._sock.close()  # as if the old daemon hung; a new one replaced its stale socket
    new = ControlSocket.bind(path)
    old.close()
    assert path.exists()
    new.close()
    assert not path.exists()


def test_the_socket_defaults_beside_the_database(tmp_path: Path) -> None:
    """store.admin_socket: sipis.ctl in the database's directory unless set."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("store: {path: db/x.db}\napi: {tls: {enabled: false}}\n")
    assert control_socket_path(load_config(cfg)) == tmp_path / "db" / "sipis.ctl"
    cfg.write_text("store: {admin_socket: /run/sipis/ctl}\napi: {tls: {enabled: false}}\n")
    assert control_socket_path(load_config(cfg)) == Path("/run/sipis/ctl")
    assert control_socket_path(Config()) == Path("var/sipis.ctl")


# -- key files ----------------------------------------------------------------------------------


def test_drop_keys_keeps_the_active_key_and_comments(tmp_path: Path) -> None:
    """Unused old keys leave the file atomically; the active key and comments never do."""
    key_file = tmp_path / "k"
    first = KeyRing.generate_file(key_file).active_key_id
    second = KeyRing.add_key_to_file(key_file)
    third = KeyRing.add_key_to_file(key_file)
    os.chmod(key_file, 0o640)
    assert KeyRing.drop_keys_from_file(key_file, keep={second}) == (first,)
    ring = KeyRing.load(key_file)
    assert ring.key_ids == (second, third) and ring.active_key_id == third
    assert key_file.read_text().startswith("# sipis store keys")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o640
    assert KeyRing.drop_keys_from_file(key_file, keep=set()) == (second,)
    assert KeyRing.load(key_file).key_ids == (third,)
    assert KeyRing.drop_keys_from_file(key_file, keep=set()) == ()


def test_stale_temporary_key_files_are_removed(tmp_path: Path) -> None:
    """Temp copies a killed writer left (they hold keys) go; other files stay."""
    key_file = tmp_path / "sipis.key"
    KeyRing.generate_file(key_file)
    (tmp_path / ".sipis.key.1234abcd.tmp").write_text("k")
    (tmp_path / ".other.key.1234abcd.tmp").write_text("k")
    assert KeyRing.remove_stale_temp_files(key_file) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.key.1234abcd.tmp",
                                                          "sipis.key"]


# -- rotate-key and delete without a daemon ----------------------------------------------------


def record(n: int) -> InstanceRecord:
    return InstanceRecord(
        id=f"adm-{n:04d}", secret_verifier=make_verifier("s"), app="com.example.phone",
        aor=f"sip:u{n}@sip.test", username=f"u{n}", password=f"admin-test-pw-{n}",
        registrar=None, outbound_proxy=None, expires=600, push_provider="apns",
        push_token=f"admin-test-token-{n}", push_environment=None, contact_token=f"adm{n}",
        instance_urn="urn:uuid:1", lifetime=3600, created_at=float(n), last_heard_at=0.0,
        expires_at=4e9, device_ha1={"MD5": "ab" * 16},
    )


async def seed(directory: Path, count: int) -> Config:
    store = SqliteStore(directory / "sipis.db", KeyRing.generate_file(directory / "sipis.key"))
    await store.open()
    for n in range(count):
        await store.insert(record(n))
    await store.hold_message(HeldMessage(
        id="m1", instance_id="adm-0000", received_at=0.0, expires_at=4e9, from_="sip:a@b",
        to="sip:c@d", content_type="text/plain", body=b"held text"), max_per_instance=5)
    await store.close()
    cfg = directory / "c.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"path": str(directory / "sipis.db"),
                                             "key_file": str(directory / "sipis.key")},
                                   "api": {"tls": {"enabled": False}}}))
    return load_config(cfg)


async def stored(config: Config) -> tuple[dict[str, str], dict[str, int]]:
    """Every password, decrypted with the key file now on disk, and the keys in use."""
    store = SqliteStore(config.store.path, KeyRing.load(config.store.key_file))
    await store.open()
    try:
        assert [m.body for m in await store.held_messages("adm-0000")] == [b"held text"]
        return ({r.id: r.password for r in await store.list_all()}, await store.key_usage())
    finally:
        await store.close()


async def test_rotate_key_moves_everything_to_one_new_key(short_dir: Path) -> None:
    """Without a daemon: a new key, every value under it, the old key gone from the file."""
    config = await seed(short_dir, 5)
    old = KeyRing.load(config.store.key_file).active_key_id
    lines: list[str] = []
    done = await rotate_key(config, report=lines.append)
    assert done.added is not None and done.added != old and done.active == done.added
    assert done.dropped == (old,) and done.rewritten == 6 and not done.through_daemon
    assert KeyRing.load(config.store.key_file).key_ids == (done.active,)
    passwords, usage = await stored(config)
    assert passwords == {f"adm-{n:04d}": f"admin-test-pw-{n}" for n in range(5)}
    assert usage == {done.active: 16}  # 3 per instance, 1 message
    assert any("added key" in line for line in lines)
    again = await rotate_key(config)  # each run rotates again: still one key in the file
    assert again.added not in (None, done.active) and again.dropped == (done.active,)
    assert KeyRing.load(config.store.key_file).key_ids == (again.active,)


async def test_an_interrupted_rotation_is_finished_not_restarted(short_dir: Path) -> None:
    """Two keys in the file (a run killed after adding one): no third key is added."""
    config = await seed(short_dir, 3)
    old = KeyRing.load(config.store.key_file).active_key_id
    new = KeyRing.add_key_to_file(config.store.key_file)
    done = await rotate_key(config)
    assert done.added is None and done.active == new and done.dropped == (old,)
    assert KeyRing.load(config.store.key_file).key_ids == (new,)
    assert (await stored(config))[1] == {new: 10}


async def test_a_key_missing_from_the_file_stops_rotation_before_any_change(
    short_dir: Path,
) -> None:
    """Values under a key the file lacks: KeyMissing, and the key file is not touched."""
    config = await seed(short_dir, 2)
    key_file = config.store.key_file
    os.unlink(key_file)
    KeyRing.generate_file(key_file)  # a different key: the stored values are orphans
    before = key_file.read_bytes()
    with pytest.raises(KeyMissing):
        await rotate_key(config)
    assert key_file.read_bytes() == before


async def test_a_second_rotation_at_once_is_refused(short_dir: Path) -> None:
    """The key directory's lock is held: RotationBusy, nothing changes."""
    config = await seed(short_dir, 1)
    before = config.store.key_file.read_bytes()
    fd = os.open(short_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RotationBusy):
            await rotate_key(config)
    finally:
        os.close(fd)
    assert config.store.key_file.read_bytes() == before


async def test_rotation_without_a_database_rotates_the_file_only(short_dir: Path) -> None:
    """No store yet: the key is rotated and no database file is created."""
    KeyRing.generate_file(short_dir / "sipis.key")
    cfg = short_dir / "c.yaml"
    cfg.write_text(f"store: {{path: {short_dir}/sipis.db, key_file: {short_dir}/sipis.key}}\n"
                   "api: {tls: {enabled: false}}\n")
    done = await rotate_key(load_config(cfg))
    assert done.rewritten == 0 and len(done.dropped) == 1
    assert not (short_dir / "sipis.db").exists()


async def test_delete_without_a_daemon_scrubs_the_row(short_dir: Path) -> None:
    """No daemon: the row goes from the store (no key needed); unknown ids are reported."""
    config = await seed(short_dir, 2)
    outcome = await delete_instance(config, "adm-0001")
    assert outcome.deleted and not outcome.through_daemon
    assert b"adm-0001" not in config.store.path.read_bytes()
    assert not (await delete_instance(config, "adm-0001")).deleted
    assert list((await stored(config))[0]) == ["adm-0000"]


# -- the daemon's rekey -------------------------------------------------------------------------


async def test_daemon_rekey_reloads_the_key_file_and_refuses_a_bad_one(short_dir: Path) -> None:
    """rekey swaps in the re-read key ring; a file lacking keys in use is refused unchanged."""
    config = await seed(short_dir, 2)
    key_file = config.store.key_file
    store = SqliteStore(config.store.path, KeyRing.load(key_file))
    await store.open()
    try:
        admin = DaemonAdmin(service=None, store=store, keeper=None,  # type: ignore[arg-type]
                            key_file=key_file)
        new = KeyRing.add_key_to_file(key_file)
        outcome = await admin.rekey()
        assert outcome.active_key == new and outcome.keys_in_use == {new: 7}
        assert outcome.rewritten == 3 and store.keyring.active_key_id == new
        os.unlink(key_file)
        KeyRing.generate_file(key_file)  # lacks the key in use
        with pytest.raises(Refused, match="lacks the key"):
            await admin.rekey()
        assert store.keyring.active_key_id == new
        assert len(await store.list_all()) == 2
    finally:
        await store.close()
