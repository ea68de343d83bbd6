"""A real Kamailio on 127.0.0.1 playing the SIP provider in integration tests.

`Kamailio` renders `kamailio.cfg.tmpl` into a private state directory (config, db_text
tables, ctl socket, pid file, log), runs `kamailio -DD -E` in its own process group and
talks to it through `kamcmd` for the location table. Every REGISTER that reaches the
script, and every reply Kamailio sends to one, is written to the log as one tab-separated
line (`SIPIS-REG`, `SIPIS-REGREPLY`); `register_log()` turns those back into records.

The API is synchronous on purpose: start/stop take well under a second and the queries
are a single local `kamcmd` call, so trio tests may call them directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import attrs

from tests.peers.ports import HOST, free_port

KAMAILIO = shutil.which("kamailio", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
KAMCMD = shutil.which("kamcmd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
TEMPLATE = Path(__file__).with_name("kamailio.cfg.tmpl")

REG_MARK = "SIPIS-REG\t"
REPLY_MARK = "SIPIS-REGREPLY\t"


class KamailioError(RuntimeError):
    """Kamailio failed to start, died, or an RPC answered with an error."""


def available() -> bool:
    """Whether kamailio and kamcmd are installed (tests skip otherwise)."""
    return KAMAILIO is not None and KAMCMD is not None


@attrs.frozen
class KamailioConfig:
    """What the provider does; every field maps to one module parameter or script switch."""

    users: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    """username → plaintext password (db_text subscriber table, auth_db calculate_ha1)."""
    domain: str = "sip.test"
    """Served domain, also an alias of the proxy. The digest realm is the To domain."""
    algorithm: Literal["MD5", "SHA-256", ""] = "MD5"
    """auth `algorithm`: advertised in the challenge and used to verify; "" omits the param."""
    qop: Literal["auth", ""] = "auth"
    """Challenge with qop="auth" (www_challenge flag 1) or without qop (RFC 2069 style)."""
    default_expires: int = 3600
    """Granted when the REGISTER carries neither an Expires header nor a contact expires."""
    min_expires: int = 0
    """Below this (but above 0) the REGISTER gets 423 + Min-Expires; 0 disables the check."""
    max_expires: int = 0
    """Longer requests are silently cut to this in the 200's Contact expires; 0 = no cap."""
    max_contacts: int = 0
    """Contacts per AoR; 0 = unlimited."""
    fr_timer: int = 5000
    """tm fr_timer in ms: a relayed request with no reply at all fails after this."""
    fr_inv_timer: int = 60000
    """tm fr_inv_timer in ms: how long an INVITE may ring after a 1xx."""
    nonce_expire: int = 30
    """Seconds a nonce stays valid; older ones get a 401 with stale=true."""
    wrong_password_reply: Literal[401, 403] = 401
    """Answer to a wrong password: a fresh 401 challenge (Kamailio default) or 403."""
    fix_nated_register: bool = False
    """Store the source address as `received` (nathelper), so INVITEs go back to the flow."""
    debug: int = 2
    """Kamailio log level (2 = info, 3 = debug)."""

    def __attrs_post_init__(self) -> None:
        for name, password in self.users.items():
            if not re.fullmatch(r"[A-Za-z0-9._~+-]+", name):
                raise ValueError(f"unsupported user name for db_text: {name!r}")
            if "\n" in password or "\r" in password:
                raise ValueError(f"password of {name!r} contains a line break")


@attrs.frozen
class Binding:
    """One contact of an AoR in Kamailio's location table (`ul.lookup` fields)."""

    aor: str
    contact: str
    """The Contact URI as stored (no angle brackets)."""
    expires: int | None
    """Seconds left; None for a permanent contact."""
    q: float | None
    call_id: str
    cseq: int
    user_agent: str | None
    received: str | None
    """Source address saved by fix_nated_register(), e.g. "sip:127.0.0.1:40000"."""
    path: str | None
    instance: str | None
    """+sip.instance value, e.g. "<urn:uuid:…>"."""
    reg_id: int
    socket: str | None
    """Kamailio's listening socket the REGISTER came in on, e.g. "udp:127.0.0.1:25060"."""
    raw: Mapping[str, str] = attrs.field(eq=False, repr=False)

    @property
    def transport(self) -> str | None:
        """ "udp" or "tcp": the transport the REGISTER arrived over."""
        return self.socket.split(":", 1)[0].lower() if self.socket else None


@attrs.frozen
class RegisterEntry:
    """One REGISTER as the script saw it, with the reply Kamailio sent to it."""

    time: float
    call_id: str
    cseq: int
    from_user: str | None
    to_user: str | None
    transport: str
    """"udp" or "tcp"."""
    source: tuple[str, int]
    expires_header: int | None
    contacts: tuple[str, ...]
    """Each Contact value as sent (name-addr with params), or ("*",)."""
    authorization: bool
    """Whether the REGISTER carried an Authorization header."""
    auth_user: str | None
    user_agent: str | None
    status: int | None = None
    """Status of the reply, None if Kamailio sent none (yet)."""
    www_authenticate: str | None = None
    min_expires: int | None = None
    reply_contacts: tuple[str, ...] = ()

    @property
    def contact_expires(self) -> int | None:
        """The expires param of the first contact, if any."""
        return contact_param_int(self.contacts[0], "expires") if self.contacts else None

    @property
    def requested_expires(self) -> int | None:
        """What the UA asked for: contact expires param first, then the Expires header."""
        found = self.contact_expires
        return found if found is not None else self.expires_header

    @property
    def is_deregister(self) -> bool:
        """Expires 0 in the header or the contact param, or a `*` contact."""
        return self.requested_expires == 0 or self.contacts == ("*",)

    @property
    def granted_expires(self) -> int | None:
        """Expires param of the first Contact in a 2xx reply (what the registrar granted)."""
        if self.status is None or not 200 <= self.status < 300 or not self.reply_contacts:
            return None
        return contact_param_int(self.reply_contacts[0], "expires")


def split_contacts(value: str) -> tuple[str, ...]:
    """Split a Contact header value at top-level commas (not inside quotes or <>)."""
    parts: list[str] = []
    depth, quoted, start = 0, False, 0
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    parts.append(value[start:].strip())
    return tuple(p for p in parts if p)


def contact_param_int(contact: str, name: str) -> int | None:
    """An integer header parameter of a Contact value (after the >, if any)."""
    # Header params start after the ">" closing the URI, not after a quoted "<urn:…>" value.
    params = contact.split(">", 1)[1] if contact.lstrip().startswith("<") or (
        "<" in contact and contact.index("<") < contact.find(">")
    ) else contact
    match = re.search(rf";\s*{re.escape(name)}\s*=\s*(\d+)", params, re.IGNORECASE)
    return int(match.group(1)) if match else None


def _log_fields(line: str, mark: str) -> dict[str, str | None]:
    fields: dict[str, str | None] = {}
    for item in line.split(mark, 1)[1].rstrip("\r\n").split("\t"):
        key, _, value = item.partition("=")
        fields[key] = None if value in ("<null>", "") else value
    return fields


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def parse_register_log(text: str) -> list[RegisterEntry]:
    """Rebuild REGISTER records (with their replies) from the script's xlog lines."""
    entries: list[RegisterEntry] = []
    for line in text.splitlines():
        if REG_MARK in line:
            f = _log_fields(line, REG_MARK)
            host, _, port = (f.get("src") or ":0").rpartition(":")
            entries.append(
                RegisterEntry(
                    time=float(f.get("time") or 0.0),
                    call_id=f.get("call_id") or "",
                    cseq=_int_or_none((f.get("cseq") or "").split(" ", 1)[0]) or 0,
                    from_user=f.get("from_user"),
                    to_user=f.get("to_user"),
                    transport=(f.get("transport") or "").lower(),
                    source=(host, int(port or 0)),
                    expires_header=_int_or_none(f.get("expires")),
                    contacts=split_contacts(f.get("contact") or ""),
                    authorization=f.get("authorization") == "1",
                    auth_user=f.get("auth_user"),
                    user_agent=f.get("user_agent"),
                )
            )
        elif REPLY_MARK in line:
            f = _log_fields(line, REPLY_MARK)
            call_id = f.get("call_id") or ""
            cseq = _int_or_none((f.get("cseq") or "").split(" ", 1)[0]) or 0
            for index in range(len(entries) - 1, -1, -1):
                entry = entries[index]
                if entry.call_id == call_id and entry.cseq == cseq and entry.status is None:
                    entries[index] = attrs.evolve(
                        entry,
                        status=_int_or_none(f.get("status")),
                        www_authenticate=f.get("www_authenticate"),
                        min_expires=_int_or_none(f.get("min_expires")),
                        reply_contacts=split_contacts(f.get("contact") or ""),
                    )
                    break
    # Several Kamailio processes share the log file: put requests back in arrival order.
    return sorted(entries, key=lambda e: e.time)


def parse_kamcmd_contacts(text: str, aor: str) -> list[Binding]:
    """Read the `Contact: { Key: value ... }` blocks of `ul.lookup`/`ul.dump` output."""
    bindings: list[Binding] = []
    current: dict[str, str] | None = None
    current_aor = aor
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("AoR:"):
            current_aor = line.partition(":")[2].strip()
        elif line == "Contact: {":
            current = {}
        elif line == "}" and current is not None:
            if current_aor == aor:
                bindings.append(_binding(aor, current))
            current = None
        elif current is not None and ":" in line:
            key, _, value = line.partition(":")
            current[key.strip()] = value.strip()
    return bindings


def _binding(aor: str, fields: dict[str, str]) -> Binding:
    def opt(key: str) -> str | None:
        value = fields.get(key)
        return None if value in (None, "", "[not set]") else value

    expires = fields.get("Expires", "")
    q = fields.get("Q", "-1")
    return Binding(
        aor=aor,
        contact=fields.get("Address", ""),
        expires=int(expires) if expires.lstrip("-").isdigit() else None,
        q=None if q in ("-1", "") else float(q),
        call_id=fields.get("Call-ID", ""),
        cseq=int(fields.get("CSeq", "0") or 0),
        user_agent=opt("User-Agent"),
        received=opt("Received"),
        path=opt("Path"),
        instance=opt("Instance"),
        reg_id=int(fields.get("Reg-Id", "0") or 0),
        socket=opt("Socket"),
        raw=dict(fields),
    )


def _dbtext_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


class Kamailio:
    """One Kamailio process on 127.0.0.1:`port` (UDP and TCP), with its own state directory."""

    def __init__(
        self,
        config: KamailioConfig | None = None,
        *,
        port: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        if not available():
            raise KamailioError("kamailio/kamcmd not installed")
        self.config = config or KamailioConfig()
        self.port = port or free_port("both")
        self._own_dir = state_dir is None
        # mkdtemp under /tmp keeps the ctl socket path short (sun_path is 108 bytes).
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="sipis-kam-"))
        self.cfg_path = self.state_dir / "kamailio.cfg"
        self.log_path = self.state_dir / "kamailio.log"
        self.ctl_socket = self.state_dir / "ctl.sock"
        self.db_dir = self.state_dir / "db"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def domain(self) -> str:
        return self.config.domain

    def registrar_uri(self, transport: str | None = None) -> str:
        """`sip:127.0.0.1:PORT` (optionally `;transport=tcp`), for outbound proxy / registrar."""
        suffix = f";transport={transport}" if transport else ""
        return f"sip:{HOST}:{self.port}{suffix}"

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        """Render the config and the db_text tables into the state directory."""
        c = self.config
        defines = []
        if c.wrong_password_reply == 403:
            defines.append("#!define WITH_403_ON_BAD_PASSWORD")
        if c.fix_nated_register:
            defines.append("#!define WITH_FIX_NATED_REGISTER")
        values = {
            "DEFINES": "\n".join(defines),
            "DEBUG": str(c.debug),
            "DOMAIN": c.domain,
            "PORT": str(self.port),
            "CTL_SOCKET": str(self.ctl_socket),
            "FR_TIMER": str(c.fr_timer),
            "FR_INV_TIMER": str(c.fr_inv_timer),
            "DEFAULT_EXPIRES": str(c.default_expires),
            "MIN_EXPIRES": str(c.min_expires),
            "MAX_EXPIRES": str(c.max_expires),
            "MAX_CONTACTS": str(c.max_contacts),
            "ALGORITHM": c.algorithm,
            "CHALLENGE_FLAGS": "1" if c.qop == "auth" else "0",
            "NONCE_EXPIRE": str(c.nonce_expire),
            "DB_DIR": str(self.db_dir),
        }
        text = re.sub(r"@@([A-Z_]+)@@", lambda m: values[m.group(1)], TEMPLATE.read_text())
        self.cfg_path.write_text(text)
        self.db_dir.mkdir(exist_ok=True)
        # db_text: a column that may be empty must be typed (string,null), or the table
        # fails to load and every REGISTER loops on 401.
        rows = [
            "id(int,auto) username(string) domain(string,null) password(string,null) "
            "ha1(string,null) ha1b(string,null)"
        ]
        for i, (user, password) in enumerate(sorted(c.users.items()), start=1):
            rows.append(f"{i}:{user}:{_dbtext_escape(c.domain)}:{_dbtext_escape(password)}:::")
        (self.db_dir / "subscriber").write_text("\n".join(rows) + "\n")
        (self.db_dir / "version").write_text(
            "id(int,auto) table_name(string) table_version(int)\n0:version:1\n0:subscriber:7\n"
        )

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, start Kamailio and wait until UDP, TCP and ctl all answer."""
        if self.running:
            return
        assert KAMAILIO is not None
        self.write_config()
        with contextlib.suppress(FileNotFoundError):
            self.ctl_socket.unlink()
        with self.log_path.open("ab") as log:
            log.write(f"==== sipis test: starting kamailio on port {self.port}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [
                    KAMAILIO, "-DD", "-E",
                    "-f", str(self.cfg_path),
                    "-P", str(self.state_dir / "kamailio.pid"),
                    "-Y", str(self.state_dir),
                    "-w", str(self.state_dir),
                    "-m", "64", "-M", "8",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.state_dir,
            )  # fmt: skip
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        checks = [self._answers_udp, self._accepts_tcp, self._answers_ctl]
        while checks:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise KamailioError(
                    f"kamailio exited with {proc and proc.returncode} during start; log:\n"
                    + self.log_tail()
                )
            if checks[0]():
                checks.pop(0)
                continue
            if time.monotonic() > deadline:
                raise KamailioError("kamailio did not become ready; log:\n" + self.log_tail())
            time.sleep(0.05)

    def _answers_udp(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, 0))
            sock.settimeout(0.2)
            local = sock.getsockname()[1]
            options = (
                f"OPTIONS sip:{HOST}:{self.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bKready{local}\r\n"
                f"Max-Forwards: 70\r\n"
                f"From: <sip:ready@{HOST}>;tag=ready\r\n"
                f"To: <sip:{HOST}:{self.port}>\r\n"
                f"Call-ID: ready-{local}@{HOST}\r\n"
                f"CSeq: 1 OPTIONS\r\n"
                f"Content-Length: 0\r\n\r\n"
            ).encode()
            try:
                sock.connect(self.address)  # connected: a closed port fails at once (ICMP)
                sock.send(options)
                return sock.recv(65535).startswith(b"SIP/2.0 ")
            except OSError:
                return False

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection(self.address, timeout=0.2):
                return True
        except OSError:
            return False

    def _answers_ctl(self) -> bool:
        if not self.ctl_socket.exists():
            return False
        try:
            self.rpc("core.uptime")
        except KamailioError:
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the main process (it stops its children), SIGKILL the group if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Children that outlived the main process (should not happen) go with the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def restart(self, **changes: Any) -> None:
        """Stop and start again on the same port and state dir, optionally changing config.

        The location table lives in memory, so all bindings are gone afterwards (like a
        provider that crashed); the log file is kept and appended to.
        """
        self.stop()
        if changes:
            self.config = attrs.evolve(self.config, **changes)
        self.start()

    def close(self) -> None:
        """Stop and delete the state directory (when this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Kamailio:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- observation -------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything Kamailio wrote to stderr, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def register_log(self, settle: float = 1.0) -> list[RegisterEntry]:
        """Every REGISTER received so far (retransmissions included), oldest first.

        Kamailio logs a reply just after sending it, so a test that reads the log the
        moment its response arrives can be a few ms early: wait up to `settle` seconds
        until every logged REGISTER has its reply (each one gets one in this script).
        """
        deadline = time.monotonic() + settle
        while True:
            entries = parse_register_log(self.log_text())
            if all(e.status is not None for e in entries) or time.monotonic() >= deadline:
                return entries
            time.sleep(0.01)

    def rpc(self, *args: str) -> str:
        """Run one `kamcmd` RPC over the ctl socket and return its output."""
        assert KAMCMD is not None
        try:
            done = subprocess.run(
                [KAMCMD, "-s", f"unix:{self.ctl_socket}", *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KamailioError(f"kamcmd {args[0]} timed out") from exc
        out = done.stdout + done.stderr
        if done.returncode != 0 or out.lstrip().lower().startswith("error"):
            raise KamailioError(f"kamcmd {' '.join(args)}: {out.strip()}")
        return done.stdout

    def location(self, user: str) -> list[Binding]:
        """The contacts registered for `user` (use_domain=0: the AoR is the user name)."""
        try:
            text = self.rpc("ul.lookup", "location", user)
        except KamailioError as exc:
            message = str(exc).lower()
            # "AOR not found", or an AoR whose last contact just expired.
            if "not found" in message or "has no contacts" in message:
                return []
            raise
        return parse_kamcmd_contacts(text, user)

    def registered_users(self) -> int:
        """How many AoRs have at least one binding."""
        return sum(
            1
            for line in self.rpc("ul.dump", "brief").splitlines()
            if line.strip().startswith("AoR:")
        )

    def remove(self, user: str) -> None:
        """Drop every binding of `user` (the provider forgets it, e.g. after an admin action)."""
        self.rpc("ul.rm", "location", user)

    def iter_logs(self) -> Iterator[tuple[str, str]]:
        """(title, text) pairs for attaching to a failed test's report."""
        yield (f"kamailio :{self.port} log", self.log_text())
