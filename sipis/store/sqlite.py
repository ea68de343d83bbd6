"""SQLite implementation of the store: one file, durable writes, secrets encrypted, real wipes.

Strategy:

- One ``sqlite3`` connection, driven from worker threads (``trio.to_thread.run_sync``) one
  call at a time under a ``trio.Lock``. Worker calls are not abandoned on cancellation, so a
  started write always finishes and its outcome is known.
- ``journal_mode=WAL`` and ``synchronous=FULL``: a write is on disk before the call returns.
  The database, ``-wal`` and ``-shm`` files are mode 0600.
- The SIP password and the push token are stored as ``(key id, AES-GCM blob)`` with the AAD
  ``"<id>:password"`` / ``"<id>:push_token"`` (see ``crypto.py``); so are the device digest
  HA1s, as one JSON object ``{"<algorithm>": "<hex>"}`` under the AAD ``"<id>:device_ha1"``
  (NULL key and blob when there are none: rows from schema 1 and records made without them).
  The device realm they are bound to is plain text, like the rest.
- Schema versions live in ``PRAGMA user_version``; ``MIGRATIONS[n-1]`` takes a database from
  version n-1 to n inside one transaction. A database newer than the code is refused.

Wiping (``delete``, and ``replace`` when the password, push token, device HA1s or contact token
change):
``secure_delete=ON`` zeroes a freed cell or page, but it is NOT enough on its own: b-tree
balancing (of table and index pages) copies cells to other pages, and SQLite's ``rebuildPage``
does not zero the space the old copies occupied. A seeded workload of 150 rows
(``test_wipe_holds_under_churn``) leaves deleted ids, contact tokens and password blobs in
the file with secure_delete and a checkpoint alone. So every such change is followed by a
*scrub*: ``VACUUM`` (rebuilds every page from the live rows only, in memory with
``temp_store=MEMORY``, and shrinks the file) and then ``wal_checkpoint(TRUNCATE)`` (copies the
result into the main file and cuts the WAL to zero bytes, so no old frame survives). A
``scrub_pending`` flag is set in the same transaction as the change and cleared after the
scrub, so a crash in between is scrubbed at the next ``open()``. Concurrent wipes share one
scrub. A scrub costs about the time to copy the database once (~0.1 s for 20 000 instances).
``replace`` re-encrypts a value found under an older key with the active key (no scrub for
that: the plaintext did not change, and the next scrub removes the old ciphertext);
``rekey()`` moves every value at once and scrubs, after which old keys may be dropped.
Copies outside the files (disk blocks freed by truncation, the OS page cache, this process's
memory) are out of reach of any SQLite setting.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from sipis.store.crypto import KeyRing
from sipis.store.errors import Conflict, CryptoError, NotFound, SchemaError, StoreError
from sipis.store.models import CallRecord, HeldMessage, InstanceRecord, RegistrationStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the instances table and the store's own flags.
    (
        """
        CREATE TABLE instances (
            id                      TEXT PRIMARY KEY NOT NULL,
            secret_verifier         BLOB NOT NULL,
            app                     TEXT NOT NULL,
            aor                     TEXT NOT NULL,
            username                TEXT NOT NULL,
            password_key            TEXT NOT NULL,
            password_blob           BLOB NOT NULL,
            registrar               TEXT,
            outbound_proxy          TEXT,
            expires                 INTEGER NOT NULL,
            push_provider           TEXT NOT NULL,
            push_token_key          TEXT NOT NULL,
            push_token_blob         BLOB NOT NULL,
            push_environment        TEXT,
            contact_token           TEXT NOT NULL UNIQUE,
            instance_urn            TEXT NOT NULL,
            lifetime                INTEGER NOT NULL,
            created_at              REAL NOT NULL,
            last_heard_at           REAL NOT NULL,
            expires_at              REAL NOT NULL,
            reg_state               TEXT NOT NULL,
            reg_last_error          TEXT,
            reg_next_attempt_at     REAL,
            reg_granted_expires     INTEGER,
            reg_last_registered_at  REAL
        )
        """,
        "CREATE TABLE store_flags (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL)",
        "INSERT INTO store_flags (name, value) VALUES ('scrub_pending', 0)",
    ),
    # 2: the device digest HA1s (encrypted JSON) and the realm they were computed for. Rows
    # from version 1 get realm '' and no HA1: they cannot register a device (see models.py).
    (
        "ALTER TABLE instances ADD COLUMN device_realm TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE instances ADD COLUMN device_ha1_key TEXT",
        "ALTER TABLE instances ADD COLUMN device_ha1_blob BLOB",
    ),
    # 3: held MESSAGEs (sender, recipient, type and text as one encrypted JSON object) and
    # call records; both go with their instance (ON DELETE CASCADE) and are purged by age.
    (
        """
        CREATE TABLE messages (
            id              TEXT PRIMARY KEY NOT NULL,
            instance_id     TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
            received_at     REAL NOT NULL,
            expires_at      REAL NOT NULL,
            content_key     TEXT NOT NULL,
            content_blob    BLOB NOT NULL
        )
        """,
        "CREATE INDEX messages_by_instance ON messages (instance_id, received_at)",
        "CREATE INDEX messages_by_expiry ON messages (expires_at)",
        """
        CREATE TABLE call_records (
            instance_id     TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
            call            TEXT NOT NULL,
            sip_call_id     TEXT NOT NULL,
            from_uri        TEXT NOT NULL,
            from_name       TEXT,
            to_uri          TEXT NOT NULL,
            started_at      REAL NOT NULL,
            ended_at        REAL NOT NULL,
            outcome         TEXT NOT NULL,
            PRIMARY KEY (instance_id, call)
        )
        """,
        "CREATE INDEX call_records_by_end ON call_records (ended_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_PLAIN_COLUMNS = (
    "id", "secret_verifier", "app", "aor", "username", "registrar", "outbound_proxy", "expires",
    "push_provider", "push_environment", "contact_token", "instance_urn", "lifetime",
    "created_at", "last_heard_at", "expires_at", "device_realm",
)
_SECRET_COLUMNS = (
    "password_key", "password_blob", "push_token_key", "push_token_blob", "device_ha1_key",
    "device_ha1_blob",
)
_REG_COLUMNS = (
    "reg_state", "reg_last_error", "reg_next_attempt_at", "reg_granted_expires",
    "reg_last_registered_at",
)
_ALL_COLUMNS = _PLAIN_COLUMNS + _SECRET_COLUMNS + _REG_COLUMNS
_SELECT = f"SELECT {', '.join(_ALL_COLUMNS)} FROM instances"  # noqa: S608 (constants)
_INSERT = (
    f"INSERT INTO instances ({', '.join(_ALL_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(':' + c for c in _ALL_COLUMNS)})"
)
_UPDATE = (
    "UPDATE instances SET "  # noqa: S608
    + ", ".join(f"{c} = :{c}" for c in _ALL_COLUMNS if c != "id")
    + " WHERE id = :id"
)
_SET_REG = (
    "UPDATE instances SET "  # noqa: S608
    + ", ".join(f"{c} = :{c}" for c in _REG_COLUMNS)
    + " WHERE id = :id"
)
_SET_SCRUB_PENDING = "UPDATE store_flags SET value = ? WHERE name = 'scrub_pending'"
_HA1_FIELD = "device_ha1"

_Sealed = tuple[str, bytes] | tuple[None, None]
"""``(key id, blob)`` of an encrypted value, or ``(None, None)`` for a NULL (no HA1s)."""

_PRIVATE_MODE = 0o600


class SqliteStore:
    """The :class:`~sipis.store.base.Store` on an SQLite file (see the module doc).

    Args:
        path: the database file; its directory must exist. Created (mode 0600) if missing.
        keyring: encrypts new values with its active key; decrypts with any of its keys.
        busy_timeout: seconds to wait for another process (``sipis instances``) holding a lock.
    """

    def __init__(self, path: Path, keyring: KeyRing, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._keyring = keyring
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        self._changes_to_scrub = 0  # bumped by each committed change that needs a scrub
        self._scrubbed_upto = 0  # the value of _changes_to_scrub the last scrub covered

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r}, open={self.is_open})"

    @property
    def keyring(self) -> KeyRing:
        """The key ring the store encrypts with (the daemon derives its other keys from it)."""
        return self._keyring

    @property
    def is_open(self) -> bool:
        """True between a successful ``open()`` and ``close()`` (for readiness checks)."""
        return self._conn is not None

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating it), set the PRAGMAs, migrate, finish a pending scrub.

        Raises: SchemaError if the database is newer than this code; StoreError if the file
        cannot be opened, is not a database, or WAL mode is unavailable. Opening an open store
        does nothing.
        """
        async with self._lock:
            if self._conn is not None:
                return
            self._conn = await trio.to_thread.run_sync(self._sync_open)

    async def close(self) -> None:
        """Finish any pending scrub and close the connection. Harmless when already closed."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                await trio.to_thread.run_sync(self._sync_close, conn)
            except StoreError as exc:  # the flag stays set: the next open() scrubs
                log.error("store: scrub at close failed, will retry at open: %s", exc)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, instance_id: str) -> InstanceRecord:
        """The instance with this id. Raises NotFound; CryptoError if it does not decrypt."""
        def op(conn: sqlite3.Connection) -> InstanceRecord:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (instance_id,)).fetchone()
            if row is None:
                raise NotFound("no such instance")
            return self._to_record(row)

        return await self._run(op)

    async def get_by_contact_token(self, token: str) -> InstanceRecord:
        """The instance whose upstream Contact user part is ``token``. Raises NotFound."""
        def op(conn: sqlite3.Connection) -> InstanceRecord:
            row = conn.execute(f"{_SELECT} WHERE contact_token = ?", (token,)).fetchone()
            if row is None:
                raise NotFound("no instance has this contact token")
            return self._to_record(row)

        return await self._run(op)

    async def list_all(self) -> list[InstanceRecord]:
        """Every instance, oldest first. Raises CryptoError if any of them does not decrypt."""
        def op(conn: sqlite3.Connection) -> list[InstanceRecord]:
            rows = conn.execute(f"{_SELECT} ORDER BY created_at, id").fetchall()
            return [self._to_record(row) for row in rows]

        return await self._run(op)

    async def count(self) -> int:
        """How many instances are stored."""
        def op(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute("SELECT count(*) FROM instances").fetchone()
            return int(n)

        return await self._run(op)

    # -- writes --------------------------------------------------------------------------------

    async def insert(self, rec: InstanceRecord) -> None:
        """Store a new instance, durable on return. Raises Conflict (id or contact token)."""
        def op(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(_INSERT, self._params_encrypted(rec))

        await self._run(op)

    async def replace(self, rec: InstanceRecord) -> None:
        """Overwrite the stored record ``rec.id`` as a whole, durable on return.

        An unchanged password, push token or HA1 set keeps its ciphertext (no new copy); a
        changed one, or a changed contact token, is followed by a scrub so the old value is gone
        from the files when this returns. Raises NotFound; Conflict if the contact token is
        taken.
        """
        def op(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                old = conn.execute(
                    "SELECT password_key, password_blob, push_token_key, push_token_blob,"
                    " device_ha1_key, device_ha1_blob, contact_token FROM instances"
                    " WHERE id = ?", (rec.id,)
                ).fetchone()
                if old is None:
                    raise NotFound("no such instance")
                password, pw_changed = self._keep_or_encrypt(
                    rec, "password", rec.password, old["password_key"], old["password_blob"])
                push_token, pt_changed = self._keep_or_encrypt(
                    rec, "push_token", rec.push_token, old["push_token_key"],
                    old["push_token_blob"])
                ha1, ha1_changed = self._keep_or_encrypt(
                    rec, _HA1_FIELD, _ha1_plaintext(rec), old["device_ha1_key"],
                    old["device_ha1_blob"])
                conn.execute(_UPDATE, self._params(rec, password, push_token, ha1))
                needs_scrub = (pw_changed or pt_changed or ha1_changed
                               or old["contact_token"] != rec.contact_token)
                if needs_scrub:
                    conn.execute(_SET_SCRUB_PENDING, (1,))
            return needs_scrub

        if await self._run(op):
            await self._scrub_after_change()

    async def set_registration(self, instance_id: str, status: RegistrationStatus) -> None:
        """Replace the registration status of one instance. Raises NotFound."""
        def op(conn: sqlite3.Connection) -> None:
            params = {"id": instance_id, **_reg_params(status)}
            with _transaction(conn):
                if conn.execute(_SET_REG, params).rowcount == 0:
                    raise NotFound("no such instance")

        await self._run(op)

    async def set_registrations(
        self, items: Sequence[tuple[str, RegistrationStatus]],
    ) -> int:
        """Replace many registration statuses in one transaction (one fsync for all: the
        keeper writes them in batches). Unknown ids are skipped; returns how many matched."""
        def op(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                return sum(conn.execute(_SET_REG, {"id": instance_id, **_reg_params(status)})
                           .rowcount for instance_id, status in items)

        return await self._run(op) if items else 0

    async def delete(self, instance_id: str) -> bool:
        """Wipe an instance: when this returns, none of its bytes are left in the db files.

        Returns False if there was no such instance.
        """
        return await self._delete_scrubbed(
            "DELETE FROM instances WHERE id = ?", instance_id, name="delete")

    async def rekey(self) -> int:
        """Re-encrypt every value not under the active key, then scrub the old ciphertexts.

        Run after :meth:`KeyRing.add_key_to_file`; afterwards the old keys may be removed from
        the key file. Returns how many instances and held messages were re-encrypted.
        """
        def op(conn: sqlite3.Connection) -> int:
            active = self._keyring.active_key_id
            with _transaction(conn):
                rows = conn.execute(
                    f"{_SELECT} WHERE password_key != :k OR push_token_key != :k"
                    " OR device_ha1_key != :k", {"k": active}  # NULL (no HA1s) is no match
                ).fetchall()
                for row in rows:
                    conn.execute(_UPDATE, self._params_encrypted(self._to_record(row)))
                held = conn.execute(
                    "SELECT id, instance_id, received_at, expires_at, content_key, content_blob"
                    " FROM messages WHERE content_key != ?", (active,)).fetchall()
                for row in held:
                    msg = self._to_message(row)
                    conn.execute(
                        "UPDATE messages SET content_key = ?, content_blob = ? WHERE id = ?",
                        (*self._keyring.encrypt(_message_plaintext(msg),
                                                aad=_message_aad(msg.instance_id, msg.id)),
                         msg.id))
                if rows or held:
                    conn.execute(_SET_SCRUB_PENDING, (1,))
            return len(rows) + len(held)

        changed = await self._run(op)
        if changed:
            await self._scrub_after_change()
        return changed

    def use_keyring(self, keyring: KeyRing) -> None:
        """Encrypt with ``keyring`` from now on (the running daemon re-reads its key file).

        The caller must make sure ``keyring`` holds every key that stored values use (see
        :meth:`key_usage`) and the key this store encrypted with until now, or values written
        meanwhile could become unreadable once the file changes again.
        """
        self._keyring = keyring

    async def key_usage(self) -> dict[str, int]:
        """How many stored encrypted values each key id protects (instances and messages).

        What ``sipis rotate-key`` checks before it drops a key from the key file.
        """
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT k, count(*) FROM (SELECT password_key AS k FROM instances"
                " UNION ALL SELECT push_token_key FROM instances"
                " UNION ALL SELECT device_ha1_key FROM instances"
                " UNION ALL SELECT content_key FROM messages) WHERE k IS NOT NULL GROUP BY k"
            ).fetchall()
            return {str(k): int(n) for k, n in rows}

        return await self._run(op)

    # -- held messages and call records --------------------------------------------------------

    async def hold_message(self, msg: HeldMessage, *, max_per_instance: int) -> bool:
        """Keep a MESSAGE for the device, encrypted; durable on return.

        Returns False (nothing stored) when the instance already holds ``max_per_instance``
        messages: a sender flooding an instance cannot fill the disk. Raises NotFound if the
        instance is gone.
        """
        key_id, blob = self._keyring.encrypt(_message_plaintext(msg),
                                             aad=_message_aad(msg.instance_id, msg.id))

        def op(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                if conn.execute("SELECT 1 FROM instances WHERE id = ?",
                                (msg.instance_id,)).fetchone() is None:
                    raise NotFound("no such instance")
                (held,) = conn.execute("SELECT count(*) FROM messages WHERE instance_id = ?",
                                       (msg.instance_id,)).fetchone()
                if held >= max_per_instance:
                    return False
                conn.execute(
                    "INSERT INTO messages (id, instance_id, received_at, expires_at,"
                    " content_key, content_blob) VALUES (?, ?, ?, ?, ?, ?)",
                    (msg.id, msg.instance_id, msg.received_at, msg.expires_at, key_id, blob))
            return True

        return await self._run(op)

    async def held_messages(self, instance_id: str) -> list[HeldMessage]:
        """The messages held for an instance, oldest first (expired ones included until the
        next purge). Raises CryptoError if one does not decrypt."""
        def op(conn: sqlite3.Connection) -> list[HeldMessage]:
            rows = conn.execute(
                "SELECT id, instance_id, received_at, expires_at, content_key, content_blob"
                " FROM messages WHERE instance_id = ? ORDER BY received_at, id",
                (instance_id,)).fetchall()
            return [self._to_message(row) for row in rows]

        return await self._run(op)

    async def drop_message(self, message_id: str) -> bool:
        """Forget a delivered message; its ciphertext is scrubbed from the files on return."""
        return await self._delete_scrubbed(
            "DELETE FROM messages WHERE id = ?", message_id, name="drop_message")

    async def add_call_records(self, records: Sequence[CallRecord]) -> None:
        """Record finished calls, in one transaction (the driver batches them). A record for
        a vanished instance is dropped silently (the instance was wiped while the call ended:
        nothing of it may be kept)."""
        def op(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(
                    "INSERT OR REPLACE INTO call_records (instance_id, call, sip_call_id,"
                    " from_uri, from_name, to_uri, started_at, ended_at, outcome)"
                    " SELECT :instance_id, :call, :sip_call_id, :from_uri, :from_name, :to_uri,"
                    " :started_at, :ended_at, :outcome WHERE EXISTS"
                    " (SELECT 1 FROM instances WHERE id = :instance_id)",
                    [attrs.asdict(rec) for rec in records])

        if records:
            await self._run(op)

    async def call_records(self, instance_id: str, *, limit: int = 500) -> list[CallRecord]:
        """The instance's call records, newest first, at most ``limit``."""
        def op(conn: sqlite3.Connection) -> list[CallRecord]:
            rows = conn.execute(
                "SELECT instance_id, call, sip_call_id, from_uri, from_name, to_uri,"
                " started_at, ended_at, outcome FROM call_records WHERE instance_id = ?"
                " ORDER BY started_at DESC, call LIMIT ?", (instance_id, limit)).fetchall()
            return [CallRecord(**dict(row)) for row in rows]

        return await self._run(op)

    async def purge(self, *, now: float, records_ended_before: float) -> tuple[int, int]:
        """Drop messages past their ``expires_at`` and call records that ended before the
        cutoff; returns ``(messages, records)`` dropped. Message text is scrubbed."""
        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            with _transaction(conn):
                messages = conn.execute(
                    "DELETE FROM messages WHERE expires_at <= ?", (now,)).rowcount
                records = conn.execute(
                    "DELETE FROM call_records WHERE ended_at < ?",
                    (records_ended_before,)).rowcount
                if messages or records:
                    conn.execute(_SET_SCRUB_PENDING, (1,))
            return messages, records

        messages, records = await self._run(op)
        if messages or records:
            await self._scrub_after_change()
        return messages, records

    def _to_message(self, row: sqlite3.Row) -> HeldMessage:
        instance_id: str = row["instance_id"]
        message_id: str = row["id"]
        try:
            text = self._keyring.decrypt(row["content_key"], bytes(row["content_blob"]),
                                         aad=_message_aad(instance_id, message_id))
            content = json.loads(text)
            return HeldMessage(
                id=message_id, instance_id=instance_id,
                received_at=float(row["received_at"]), expires_at=float(row["expires_at"]),
                from_=str(content["from"]), to=str(content["to"]),
                content_type=str(content["content_type"]),
                body=base64.b64decode(content["body"], validate=True))
        except CryptoError as exc:
            raise CryptoError(f"instance {instance_id[:8]}…, message: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:  # authenticated: only our own bug
            raise CryptoError(
                f"instance {instance_id[:8]}…, message: not the expected JSON") from exc

    # -- internals (trio side) -----------------------------------------------------------------

    #: Told ``(operation, seconds)`` after every ``_run`` (the store latency metric; the
    #: daemon sets it). ``operation`` is the public method's name, a bounded set.
    on_call_done: Callable[[str, float], None] | None = None

    async def _delete_scrubbed(self, statement: str, key: str, *, name: str) -> bool:
        """One DELETE (CASCADE included) and the scrub, with the flag in the same transaction
        so a crash in between is scrubbed at the next open. False if nothing matched."""
        def op(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                deleted = conn.execute(statement, (key,)).rowcount > 0
                if deleted:
                    conn.execute(_SET_SCRUB_PENDING, (1,))
            return deleted

        deleted = await self._run(op, name=name)
        if deleted:
            await self._scrub_after_change()
        return deleted

    async def _run(self, op: Callable[[sqlite3.Connection], T], *, name: str | None = None) -> T:
        """Run ``op`` on the connection in a worker thread, alone, with errors mapped.

        ``name``: the operation for the latency metric (default: the method ``op`` is local
        to)."""
        started = trio.current_time()
        try:
            async with self._lock:
                conn = self._conn
                if conn is None:
                    raise StoreError("the store is not open")
                return await trio.to_thread.run_sync(_mapped, op, conn)
        finally:
            if self.on_call_done is not None:
                if name is None:
                    # op is the method's local "op": "SqliteStore.get.<locals>.op" → "get".
                    parts = op.__qualname__.split(".")
                    name = (parts[-3] if len(parts) >= 3 and parts[-2] == "<locals>"
                            else op.__name__)
                self.on_call_done(name, trio.current_time() - started)

    async def _scrub_after_change(self) -> None:
        """Scrub once for every change committed so far; shielded: the change is committed."""
        self._changes_to_scrub += 1
        wanted = self._changes_to_scrub
        with trio.CancelScope(shield=True):
            async with self._lock:
                conn = self._conn
                if conn is None or self._scrubbed_upto >= wanted:
                    return  # closed (close() scrubs), or a later scrub already covered us
                covers = self._changes_to_scrub
                try:
                    done = await trio.to_thread.run_sync(_mapped, _scrub, conn)
                except StoreError as exc:
                    # The change itself is committed and the flag stays set: the next change,
                    # close() or open() scrubs again. Failing the caller would misreport it.
                    log.error("store: scrub after a wipe failed, will retry: %s", exc)
                    return
                if done:
                    self._scrubbed_upto = covers

    # -- internals (worker thread side) --------------------------------------------------------

    def _sync_open(self) -> sqlite3.Connection:
        with _mapping_errors():
            _create_private(self.path)
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None,
                check_same_thread=False,
            )
        try:
            with _mapping_errors():
                conn.row_factory = sqlite3.Row
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"SQLite cannot use WAL mode for {self.path} (got {mode})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA temp_store = MEMORY")
                if conn.execute("PRAGMA secure_delete = ON").fetchone()[0] != 1:
                    raise StoreError("this SQLite build cannot turn secure_delete on")
                _migrate(conn)
                for suffix in ("-wal", "-shm"):
                    _tighten(Path(f"{self.path}{suffix}"))
                pending = conn.execute(
                    "SELECT value FROM store_flags WHERE name = 'scrub_pending'").fetchone()
                if pending is not None and pending[0]:
                    log.warning("store: finishing a wipe interrupted by a stop")
                    _scrub(conn)
                else:
                    _checkpoint(conn)  # an unclean stop may have left old frames in the WAL
        except BaseException:
            conn.close()
            raise
        return conn

    def _sync_close(self, conn: sqlite3.Connection) -> None:
        try:
            with _mapping_errors():
                pending = conn.execute(
                    "SELECT value FROM store_flags WHERE name = 'scrub_pending'").fetchone()
                if pending is not None and pending[0]:
                    _scrub(conn)
        finally:
            conn.close()

    def _encrypt(self, rec: InstanceRecord, field: str, value: str) -> tuple[str, bytes]:
        return self._keyring.encrypt(value, aad=_aad(rec.id, field))

    def _encrypt_opt(self, rec: InstanceRecord, field: str, value: str | None) -> _Sealed:
        return (None, None) if value is None else self._encrypt(rec, field, value)

    def _params_encrypted(self, rec: InstanceRecord) -> dict[str, Any]:
        """Every column of ``rec`` with its secrets freshly encrypted under the active key."""
        return self._params(rec, self._encrypt(rec, "password", rec.password),
                            self._encrypt(rec, "push_token", rec.push_token),
                            self._encrypt_opt(rec, _HA1_FIELD, _ha1_plaintext(rec)))

    def _keep_or_encrypt(
        self, rec: InstanceRecord, field: str, value: str | None, old_key: str | None,
        old_blob: bytes | None,
    ) -> tuple[_Sealed, bool]:
        """The stored ciphertext if it is under the active key and holds ``value``; else a new
        one. The flag says whether the plaintext changed (then the old one must be scrubbed).
        ``None`` stands for a NULL column on either side (only the HA1s may be NULL)."""
        if old_key is None or old_blob is None:
            return self._encrypt_opt(rec, field, value), False  # nothing old to scrub
        try:
            old_value = self._keyring.decrypt(old_key, bytes(old_blob), aad=_aad(rec.id, field))
        except CryptoError:
            return self._encrypt_opt(rec, field, value), True
        if value is None:
            return (None, None), True
        if old_value != value:
            return self._encrypt(rec, field, value), True
        if old_key != self._keyring.active_key_id:
            return self._encrypt(rec, field, value), False  # lazy rotation; same plaintext
        return (old_key, old_blob), False

    def _to_record(self, row: sqlite3.Row) -> InstanceRecord:
        instance_id: str = row["id"]
        return InstanceRecord(
            id=instance_id,
            secret_verifier=bytes(row["secret_verifier"]),
            app=row["app"],
            aor=row["aor"],
            username=row["username"],
            password=self._decrypt(row, instance_id, "password"),
            registrar=row["registrar"],
            outbound_proxy=row["outbound_proxy"],
            expires=int(row["expires"]),
            push_provider=row["push_provider"],
            push_token=self._decrypt(row, instance_id, "push_token"),
            push_environment=row["push_environment"],
            contact_token=row["contact_token"],
            instance_urn=row["instance_urn"],
            lifetime=int(row["lifetime"]),
            created_at=float(row["created_at"]),
            last_heard_at=float(row["last_heard_at"]),
            expires_at=float(row["expires_at"]),
            registration=RegistrationStatus(
                state=row["reg_state"],
                last_error=row["reg_last_error"],
                next_attempt_at=_opt_float(row["reg_next_attempt_at"]),
                granted_expires=_opt_int(row["reg_granted_expires"]),
                last_registered_at=_opt_float(row["reg_last_registered_at"]),
            ),
            device_realm=row["device_realm"],
            device_ha1=self._decrypt_ha1(row, instance_id),
        )

    def _decrypt(self, row: sqlite3.Row, instance_id: str, field: str) -> str:
        try:
            return self._keyring.decrypt(
                row[f"{field}_key"], bytes(row[f"{field}_blob"]), aad=_aad(instance_id, field))
        except CryptoError as exc:
            raise CryptoError(f"instance {instance_id[:8]}…, {field}: {exc}") from exc

    def _decrypt_ha1(self, row: sqlite3.Row, instance_id: str) -> dict[str, str]:
        if row["device_ha1_key"] is None or row["device_ha1_blob"] is None:
            return {}
        text = self._decrypt(row, instance_id, _HA1_FIELD)
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):  # authenticated, so only a bug of ours could write this; never show the content
            raise CryptoError(
                f"instance {instance_id[:8]}…, {_HA1_FIELD}: not a JSON object of strings")
        return value

    @staticmethod
    def _params(
        rec: InstanceRecord, password: _Sealed, push_token: _Sealed, device_ha1: _Sealed
    ) -> dict[str, Any]:
        params: dict[str, Any] = {name: getattr(rec, name) for name in _PLAIN_COLUMNS}
        params["password_key"], params["password_blob"] = password
        params["push_token_key"], params["push_token_blob"] = push_token
        params["device_ha1_key"], params["device_ha1_blob"] = device_ha1
        params.update(_reg_params(rec.registration))
        return params


def _ha1_plaintext(rec: InstanceRecord) -> str | None:
    """The HA1s as canonical JSON (sorted, compact: equal maps give equal text); None if none."""
    if not rec.device_ha1:
        return None
    return json.dumps(dict(rec.device_ha1), sort_keys=True, separators=(",", ":"))


def _reg_params(status: RegistrationStatus) -> dict[str, Any]:
    return {
        "reg_state": status.state,
        "reg_last_error": status.last_error,
        "reg_next_attempt_at": status.next_attempt_at,
        "reg_granted_expires": status.granted_expires,
        "reg_last_registered_at": status.last_registered_at,
    }


def _message_plaintext(msg: HeldMessage) -> str:
    return json.dumps({"from": msg.from_, "to": msg.to, "content_type": msg.content_type,
                       "body": base64.b64encode(msg.body).decode("ascii")})


def _message_aad(instance_id: str, message_id: str) -> bytes:
    return f"{instance_id}:message:{message_id}".encode()


def _aad(instance_id: str, field: str) -> bytes:
    return f"{instance_id}:{field}".encode()


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception (the connection is autocommit)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


@contextmanager
def _mapping_errors() -> Iterator[None]:
    """sqlite3 and OS errors → StoreError subclasses. SQLite messages name columns, not values."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        text = str(exc)
        if "UNIQUE" in text and "contact_token" in text:
            raise Conflict("an instance with this contact token is already stored") from exc
        if "UNIQUE" in text and "instances.id" in text:
            raise Conflict("an instance with this id is already stored") from exc
        raise StoreError(f"SQLite: {text}") from exc  # NOT NULL etc.: a bug in the caller
    except sqlite3.Error as exc:
        raise StoreError(f"SQLite: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"{exc.filename or 'store'}: {exc.strerror}") from exc


def _mapped(op: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    with _mapping_errors():
        return op(conn)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction; refuse a newer database."""
    with _transaction(conn):
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"the database has schema version {version}, this sipis knows up to "
                f"{SCHEMA_VERSION}: run a newer sipis (or restore a backup)"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number:d}")
            log.info("store: schema migrated to version %d", number)


def _checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the WAL into the main file and truncate it to 0 bytes. False if a reader blocked."""
    busy, _log_frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return int(busy) == 0


def _scrub(conn: sqlite3.Connection) -> bool:
    """Rebuild the file from live rows (VACUUM) and empty the WAL; see the module doc.

    Returns False (and leaves the flag set, so it is retried) if another process kept the
    WAL busy beyond the busy timeout.
    """
    conn.execute("VACUUM")
    if not _checkpoint(conn):
        log.warning("store: another process holds the database; the wipe of the WAL will be "
                    "retried at the next change or at close")
        return False
    # Written after the checkpoint: the WAL then holds only the flags page.
    conn.execute(_SET_SCRUB_PENDING, (0,))
    return True


def _create_private(path: Path) -> None:
    """Create the database file with mode 0600 (SQLite gives -wal/-shm the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _PRIVATE_MODE)
    except FileExistsError:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise StoreError(f"{path} is not a regular file") from None
        _tighten(path)
        return
    os.close(fd)


def _tighten(path: Path) -> None:
    """Drop group/other permissions from an existing store file (it holds credentials)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        log.warning("store: %s had mode %04o; setting 0600", path, mode)
        os.chmod(path, mode & 0o700)
