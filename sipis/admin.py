"""Admin operations: the daemon's control socket, and ``instances delete`` / ``rotate-key``.

Why a control socket: ``sipis instances delete`` must end an instance the way the daemon does
(``InstanceService.wipe``: unREGISTER upstream, scrub the store, drop device bindings, one log
line), and ``sipis rotate-key`` must make the *running* daemon encrypt with the new key before
an old key may leave the key file. Both need the live daemon; a Unix socket reaches it with no
network listener and no credentials of its own.

Control socket
    ``store.admin_socket`` (default ``sipis.ctl`` beside the database): a Unix stream socket,
    mode 0600. Only its file permissions guard it — whoever can connect (the daemon's user and
    root) may wipe instances — so it lives in the daemon's private state directory. The daemon
    binds it first thing, before it reads the key file or opens the store, and refuses to start
    if another daemon answers on it (a cheap guard against two daemons on one store); a socket
    file nobody listens on (a killed daemon's) is replaced, anything else at that path is
    refused. Requests are answered once every service is up (earlier ones wait in the backlog).
    On stop the daemon removes the file, if it is still its own.

Protocol
    One request per connection: one JSON object on one line (at most :data:`MAX_REQUEST`
    bytes, sent within :data:`REQUEST_TIMEOUT` seconds), answered with one JSON object on one
    line, then the daemon closes the connection::

        {"op": "status"}           {"ok": true, "version": "…", "pid": 123, "instances": 5,
                                    "registered": 4, "active_key": "k-…",
                                    "keys_in_use": {"k-…": 15}}
        {"op": "wipe", "id": "…"}  {"ok": true, "deleted": true}     (false: no such instance)
        {"op": "rekey"}            {"ok": true, "rewritten": 12, "active_key": "k-…",
                                    "keys_in_use": {"k-…": 15}}
        anything else              {"ok": false, "error": "bad-request" | "unknown-op" |
                                    "failed", "message": "…"}

    ``wipe`` is ``InstanceService.wipe(id, "admin")``. ``rekey`` re-reads the key file, refuses
    it unless it holds every key a stored value uses and the key the daemon encrypts with now,
    swaps it into the store and re-encrypts every value under its active key. Answers never
    hold a password, secret or push token; key ids are not secret.

rotate-key (:func:`rotate_key`)
    1. Take an exclusive lock on the key file's directory (two rotations never interleave) and
       delete temporary key files a killed writer left behind.
    2. Read the key file and which keys the stored values use. A value under a key missing
       from the file stops everything (:class:`KeyMissing`): no step here can repair that.
    3. If the file holds one key, append a new one (written aside, renamed over): it becomes
       the active key. If it holds more, an earlier rotation was interrupted: finish that one
       instead, so reruns never pile up keys (the file holds at most two).
    4. Re-encrypt every stored value under the active key in one SQLite transaction, followed
       by a scrub of the old ciphertexts: through the daemon when it answers (so it also
       encrypts new values with the new key from then on), else directly on the store file.
       After a direct rekey the socket is asked once more: a daemon started meanwhile must
       reload too before a key leaves the file.
    5. Drop from the file every key that no stored value uses (again an atomic rename).

    Safe to kill at any point: a key leaves the file only in step 5, after step 4 saw that no
    value uses it and that the daemon (if any) encrypts with the new key; the file changes only
    by atomic rename; the rekey is one transaction (every value moves, or none). A rerun finds
    one key (finished, or never started: it rotates) or two (it finishes steps 4 and 5).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from sipis import __version__
from sipis.config import Config
from sipis.instances import InstanceService, WipeReason, short_id
from sipis.registrar.keeper import RegistrationKeeper
from sipis.store.crypto import KeyRing
from sipis.store.errors import CryptoError, StoreError
from sipis.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: Longest request line the daemon reads; a request is a few dozen bytes.
MAX_REQUEST = 4096
#: Longest answer line the client reads (``keys_in_use`` is the only list in an answer).
MAX_ANSWER = 65536
#: Seconds a client has to send its request line before the daemon hangs up.
REQUEST_TIMEOUT = 10.0
#: Seconds the client waits for ``status``.
STATUS_TIMEOUT = 10.0
#: Seconds the client waits for ``wipe``: the unREGISTER may wait out SIP timer F (32 s).
WIPE_TIMEOUT = 90.0
#: Seconds the client waits for ``rekey``: one transaction over every row, then a VACUUM.
REKEY_TIMEOUT = 900.0
#: Seconds the daemon reads (and drops) what a client sends after its request line.
DRAIN_TIMEOUT = 1.0
#: Connections queued while the daemon starts (before it answers).
BACKLOG = 16
#: Seconds the start-up probe of an existing socket waits to connect.
PROBE_TIMEOUT = 2.0


class AdminError(Exception):
    """An admin operation could not be done; the message says why, for the operator."""


class ControlSocketInUse(AdminError):
    """Another daemon answers on the control socket: this one must not start."""


class DaemonNotRunning(AdminError):
    """No daemon listens on the control socket (no file, or a stale one): the caller may act
    on the store directly."""


class DaemonUnreachable(AdminError):
    """The socket exists but cannot be used (permissions, no answer): a daemon may be running,
    so the caller must NOT act on the store behind its back."""


class DaemonFailed(AdminError):
    """The daemon answered with an error (``code`` is the protocol's ``error`` field)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Refused(AdminError):
    """The daemon refuses the request as asked (answered as ``failed`` with the message)."""


class KeyMissing(AdminError):
    """Stored values use keys that are not in the key file, or do not decrypt with them:
    restore the key file (from a backup) first; rotating cannot repair it."""


class RotationBusy(AdminError):
    """Another ``sipis rotate-key`` holds the key directory's lock: wait for it."""


def control_socket_path(config: Config) -> Path:
    """``store.admin_socket``, or ``sipis.ctl`` beside the database for a hand-built config."""
    return config.store.admin_socket or Path(config.store.path).parent / "sipis.ctl"


# -- the daemon's side --------------------------------------------------------------------------


@attrs.frozen
class RekeyOutcome:
    """What a ``rekey`` did: values rewritten, the key they are under, what each key protects."""

    rewritten: int
    active_key: str
    keys_in_use: Mapping[str, int]


class AdminBackend(Protocol):
    """What the control socket asks of the daemon (a fake one in tests)."""

    async def status(self) -> dict[str, Any]: ...

    async def wipe(self, instance_id: str) -> bool: ...

    async def rekey(self) -> RekeyOutcome: ...


class DaemonAdmin:
    """:class:`AdminBackend` on the daemon's components."""

    def __init__(self, *, service: InstanceService, store: SqliteStore,
                 keeper: RegistrationKeeper, key_file: Path) -> None:
        self._service = service
        self._store = store
        self._keeper = keeper
        self._key_file = key_file
        self._rekey_lock = trio.Lock()  # two rekeys at once would race on the key ring swap

    async def status(self) -> dict[str, Any]:
        return {
            "version": __version__, "pid": os.getpid(),
            "instances": await self._store.count(),
            "registered": self._keeper.statistics().by_state.get("registered", 0),
            "active_key": self._store.keyring.active_key_id,
            "keys_in_use": await self._store.key_usage(),
        }

    async def wipe(self, instance_id: str) -> bool:
        return await self._service.wipe(instance_id, WipeReason.ADMIN)

    async def rekey(self) -> RekeyOutcome:
        """Re-read the key file, encrypt with its active key, move every value under it."""
        async with self._rekey_lock:
            ring = await trio.to_thread.run_sync(KeyRing.load, self._key_file)
            current = self._store.keyring.active_key_id
            if current not in ring.key_ids:
                raise Refused(f"the key file {self._key_file} lacks the key {current} this "
                              "daemon encrypts with; not reloaded")
            missing = sorted(set(await self._store.key_usage()) - set(ring.key_ids))
            if missing:
                raise Refused(f"the key file {self._key_file} lacks key(s) {', '.join(missing)} "
                              "that stored values use; not reloaded")
            self._store.use_keyring(ring)
            rewritten = await self._store.rekey()
            usage = await self._store.key_usage()
        log.info("admin: store rekeyed to key %s, %d values rewritten", ring.active_key_id,
                 rewritten)
        return RekeyOutcome(rewritten=rewritten, active_key=ring.active_key_id,
                            keys_in_use=usage)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


def _valid_id(value: object) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= 256
            and value.isprintable() and value.strip() == value)


async def answer_request(line: bytes, backend: AdminBackend) -> dict[str, Any]:
    """The answer to one request line. Never raises: garbage gets an error answer."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return _error("bad-request", "the request is not one line of JSON")
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return _error("bad-request", 'the request must be a JSON object with a string "op"')
    op = request["op"]
    try:
        if op == "status":
            return {"ok": True, **await backend.status()}
        if op == "wipe":
            instance_id = request.get("id")
            if not _valid_id(instance_id):
                return _error("bad-request", '"wipe" needs "id": an instance id')
            assert isinstance(instance_id, str)
            log.info("admin: wipe of instance=%s asked", short_id(instance_id))
            return {"ok": True, "deleted": await backend.wipe(instance_id)}
        if op == "rekey":
            outcome = await backend.rekey()
            return {"ok": True, "rewritten": outcome.rewritten,
                    "active_key": outcome.active_key, "keys_in_use": dict(outcome.keys_in_use)}
    except (Refused, StoreError) as exc:  # their messages hold no secrets
        log.error("admin: %s failed: %s", op, exc)
        return _error("failed", str(exc))
    except Exception:
        log.exception("admin: %s failed", op)
        return _error("failed", "internal error (see the daemon's log)")
    return _error("unknown-op", "op must be one of: status, wipe, rekey")


class _TooLong(Exception):
    pass


async def _read_line(stream: trio.abc.ReceiveStream, limit: int) -> bytes | None:
    """One line (without its newline); None if the peer closed before sending anything."""
    buf = bytearray()
    while b"\n" not in buf:
        if len(buf) > limit:
            raise _TooLong
        chunk = await stream.receive_some(4096)
        if not chunk:
            return bytes(buf) if buf else None
        buf += chunk
    line = bytes(buf.split(b"\n", 1)[0])
    if len(line) > limit:
        raise _TooLong
    return line


def _dump(answer: Mapping[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


class ControlSocket:
    """The daemon's bound control socket (see the module doc); :meth:`serve` answers on it."""

    def __init__(self, path: Path, sock: socket.socket, identity: tuple[int, int]) -> None:
        self.path = path
        self._sock = sock
        self._identity = identity  # (st_dev, st_ino) of our socket file, for a safe unlink

    @classmethod
    def bind(cls, path: Path) -> ControlSocket:
        """Bind and listen at ``path`` (mode 0600), replacing a stale socket file.

        Raises: ControlSocketInUse if a daemon answers there; AdminError if the path holds
        something that is not a socket, or cannot be bound.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # as the store's directory is
        except OSError as exc:
            raise AdminError(f"cannot create {path.parent}: {exc.strerror}") from exc
        _refuse_if_live(path)
        # Bound under a temporary name, made 0600, then renamed over: the socket is never
        # reachable with a looser mode, and a stale file is replaced in one step.
        tmp = path.with_name(f".{secrets.token_hex(3)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            try:
                os.chmod(tmp, 0o600)
                sock.listen(BACKLOG)
                os.replace(tmp, path)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise
            st = os.stat(path)
        except OSError as exc:
            sock.close()
            raise AdminError(f"cannot bind the admin socket {path}: "
                             f"{exc.strerror or exc}") from exc
        return cls(path, sock, (st.st_dev, st.st_ino))

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        self._sock.close()
        with suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)

    async def serve(self, backend: AdminBackend, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer requests until cancelled (one task per connection, in our own nursery)."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))

        async def handler(stream: trio.SocketStream) -> None:
            await self._handle(stream, backend)

        task_status.started()
        await trio.serve_listeners(handler, [listener])

    async def _handle(self, stream: trio.abc.Stream, backend: AdminBackend) -> None:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    line = await _read_line(stream, MAX_REQUEST)
            except _TooLong:
                line, answer = None, _error("bad-request",
                                            f"the request is longer than {MAX_REQUEST} bytes")
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            else:
                if line is None:
                    return  # a liveness probe: connected and closed
                answer = await answer_request(line, backend)
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(_dump(answer))
                # Read what the client sent beyond its line (bounded): closing with unread
                # bytes would reset the connection and could destroy the answer in flight.
                with trio.move_on_after(DRAIN_TIMEOUT):
                    drained = 0
                    while drained < MAX_ANSWER and (chunk := await stream.receive_some(4096)):
                        drained += len(chunk)


def _refuse_if_live(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AdminError(f"cannot check the admin socket {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise AdminError(f"{path} exists and is not a socket: refusing to replace it "
                         "(check store.admin_socket)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("admin: replacing the stale socket %s", path)
        return
    except OSError as exc:
        raise AdminError(f"cannot check the admin socket {path}: "
                         f"{exc.strerror or 'no answer'}") from exc
    finally:
        probe.close()
    raise ControlSocketInUse(f"another sipis daemon answers on {path}: not starting a second "
                             "one on the same store")


# -- the client's side --------------------------------------------------------------------------


async def ask_daemon(path: Path, request: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
    """Send one request to the daemon at ``path`` and return its ``ok`` answer.

    Raises: DaemonNotRunning (no socket file, or nobody listens); DaemonUnreachable (cannot
    connect, e.g. permissions, or no answer within ``timeout``); DaemonFailed (an error answer).
    """
    try:
        stream = await trio.open_unix_socket(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning(f"no sipis daemon listens on {path}") from exc
    except OSError as exc:
        hint = " (run as root or the daemon's user)" if exc.errno == errno.EACCES else ""
        raise DaemonUnreachable(f"cannot connect to the daemon at {path}: "
                                f"{exc.strerror or exc}{hint}") from exc
    async with stream:
        with trio.move_on_after(timeout) as scope:
            try:
                await stream.send_all(_dump(request))
                line = await _read_line(stream, MAX_ANSWER)
            except (trio.BrokenResourceError, _TooLong) as exc:
                raise DaemonUnreachable(f"the daemon at {path} broke off the answer") from exc
        if scope.cancelled_caught:
            raise DaemonUnreachable(f"the daemon at {path} did not answer within {timeout:g} s")
    try:
        answer = json.loads(line or b"")
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise DaemonUnreachable(f"the daemon at {path} gave no valid answer")
    if answer.get("ok") is not True:
        raise DaemonFailed(str(answer.get("error", "failed")),
                           str(answer.get("message", "the daemon refused")))
    return answer


# -- instances delete ---------------------------------------------------------------------------


@attrs.frozen
class Deletion:
    """The outcome of :func:`delete_instance`."""

    deleted: bool  # False: no such instance
    through_daemon: bool  # False: sipis was not running; the upstream binding was left


async def delete_instance(config: Config, instance_id: str) -> Deletion:
    """Wipe one instance: through the running daemon, else straight from the store.

    Through the daemon it is the full wipe (unREGISTER upstream, scrub, device bindings
    dropped). Without a daemon the row is deleted and scrubbed, but nothing can unREGISTER:
    the binding expires at the provider by itself. Raises DaemonUnreachable, DaemonFailed,
    StoreError.
    """
    path = control_socket_path(config)
    try:
        answer = await ask_daemon(path, {"op": "wipe", "id": instance_id},
                                  timeout=WIPE_TIMEOUT)
        return Deletion(deleted=answer.get("deleted") is True, through_daemon=True)
    except DaemonNotRunning:
        pass
    db = Path(config.store.path)
    deleted = False
    if db.exists():  # never create a database here (it would belong to the wrong user)
        # Deleting decrypts nothing, so no key is needed: this works even with a lost key file.
        store = SqliteStore(db, KeyRing.ephemeral())
        await store.open()
        try:
            deleted = await store.delete(instance_id)
        finally:
            await store.close()
    # A daemon that started meanwhile may have loaded the instance: let it forget it too.
    with suppress(DaemonNotRunning):
        await ask_daemon(path, {"op": "wipe", "id": instance_id}, timeout=WIPE_TIMEOUT)
        return Deletion(deleted=deleted, through_daemon=True)
    return Deletion(deleted=deleted, through_daemon=False)


# -- rotate-key ---------------------------------------------------------------------------------


@attrs.frozen
class Rotation:
    """The outcome of :func:`rotate_key`."""

    added: str | None  # the key added; None when an interrupted rotation was finished
    active: str  # the key every stored value is under now
    rewritten: int  # instances and held messages re-encrypted
    through_daemon: bool
    dropped: tuple[str, ...]  # keys removed from the key file


async def rotate_key(config: Config, *, report: Callable[[str], None] = lambda _: None,
                     ) -> Rotation:
    """Rotate the store key; see the module doc for the steps and why a kill is harmless.

    ``report`` is told one line per step (no key material). Raises RotationBusy, KeyMissing,
    DaemonUnreachable, DaemonFailed, AdminError, StoreError (CryptoError: key file unusable or
    a value does not decrypt).
    """
    key_file = Path(config.store.key_file)
    with _locked(key_file.parent):
        if removed := KeyRing.remove_stale_temp_files(key_file):
            report(f"removed {removed} temporary key file(s) left by an interrupted run")
        ring = KeyRing.load(key_file)
        usage = await _key_usage(config, ring)
        missing = sorted(set(usage) - set(ring.key_ids))
        if missing:
            raise KeyMissing(f"stored values use key(s) {', '.join(missing)}, which the key "
                             f"file {key_file} lacks: restore them before rotating")
        added = None
        if len(ring.key_ids) == 1:
            added = KeyRing.add_key_to_file(key_file)
            report(f"added key {added} to {key_file}")
        else:
            report(f"{key_file} holds {len(ring.key_ids)} keys: finishing the interrupted "
                   f"rotation to {ring.active_key_id}")
        ring = KeyRing.load(key_file)
        rewritten, through_daemon, usage = await _reencrypt(config, ring)
        where = "by the running daemon" if through_daemon else "in the store (sipis not running)"
        report(f"re-encrypted {rewritten} instance(s)/message(s) under {ring.active_key_id} "
               f"{where}")
        stale = sorted(k for k in usage if k != ring.active_key_id)
        if stale:  # a rekey leaves nothing behind; something else is wrong: keep every key
            raise AdminError(f"values still use key(s) {', '.join(stale)} after the rekey; "
                             "no key was dropped")
        dropped = KeyRing.drop_keys_from_file(key_file, keep=set(usage))
        if dropped:
            report(f"dropped key(s) {', '.join(dropped)} from {key_file}")
    return Rotation(added=added, active=ring.active_key_id, rewritten=rewritten,
                    through_daemon=through_daemon, dropped=dropped)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive flock on ``directory`` (released by the kernel if we are killed)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise AdminError(f"cannot open {directory}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationBusy(f"another sipis rotate-key is running on {directory}") from None
        yield
    finally:
        os.close(fd)


def _usage_from(answer: Mapping[str, Any]) -> dict[str, int]:
    usage = answer.get("keys_in_use")
    if not isinstance(usage, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in usage.items()):
        raise DaemonFailed("failed", "the daemon's answer lacks keys_in_use")
    return dict(usage)


async def _key_usage(config: Config, ring: KeyRing) -> dict[str, int]:
    try:
        return _usage_from(await ask_daemon(control_socket_path(config), {"op": "status"},
                                            timeout=STATUS_TIMEOUT))
    except DaemonNotRunning:
        pass
    db = Path(config.store.path)
    if not db.exists():
        return {}
    store = SqliteStore(db, ring)
    await store.open()
    try:
        return await store.key_usage()
    finally:
        await store.close()


async def _reencrypt(config: Config, ring: KeyRing) -> tuple[int, bool, dict[str, int]]:
    """Step 4: ``(values rewritten, through the daemon?, keys in use afterwards)``."""
    path = control_socket_path(config)
    rewritten = 0
    try:
        answer = await ask_daemon(path, {"op": "rekey"}, timeout=REKEY_TIMEOUT)
    except DaemonNotRunning:
        usage: dict[str, int] = {}
        db = Path(config.store.path)
        if db.exists():
            store = SqliteStore(db, ring)
            await store.open()
            try:
                try:
                    rewritten = await store.rekey()
                except CryptoError as exc:
                    raise KeyMissing(f"a stored value does not decrypt: {exc}") from exc
                usage = await store.key_usage()
            finally:
                await store.close()
        try:  # a daemon started meanwhile must reload before a key leaves the file
            answer = await ask_daemon(path, {"op": "rekey"}, timeout=REKEY_TIMEOUT)
        except DaemonNotRunning:
            return rewritten, False, usage
    if answer.get("active_key") != ring.active_key_id:
        raise AdminError(f"the daemon encrypts with key {answer.get('active_key')!r}, not "
                         f"{ring.active_key_id} (the key file's active key): does it use "
                         "another key file? No key was dropped")
    rewritten += int(answer.get("rewritten", 0))
    return rewritten, True, _usage_from(answer)
