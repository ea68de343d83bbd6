"""The two Kamailio roles of the benchmarks: the provider (registrar) and uac_reg (reference).

Provider: a registrar whose digest check costs no table scan. Every user's password is
``pw-{username}``, computed in the script (``pv_www_authenticate``), so the provider never
becomes the bottleneck at 100k users (db_text would scan every row per request). Nothing is
logged per request. Counting is done with ``stats.get_statistics`` (``ul.dump`` is too big).

Reference: Kamailio's own ``uac`` module keeping N registrations at the provider from a
db_text ``uacreg`` table (read once at start-up), switched on with ``uac.reg_active 1`` so that
the measured CPU covers registering only.

Both run in their own process group (``kamailio -DD -E``); CPU is summed over all their
processes from /proc.
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
from pathlib import Path
from types import TracebackType

from bench.common import HOST, BenchError, children, group_cpu, stop_process, wait_until

KAMAILIO = shutil.which("kamailio", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
KAMCMD = shutil.which("kamcmd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
DOMAIN = "sip.test"


def password(user: str) -> str:
    """The provider's password for ``user`` (the script computes the same)."""
    return f"pw-{user}"


PROVIDER_CFG = r"""#!KAMAILIO
debug=1
log_stderror=yes
children=@@CHILDREN@@
tcp_children=1
auto_aliases=no
dns=no
rev_dns=no
use_dns_cache=off
alias="@@DOMAIN@@"
listen=udp:127.0.0.1:@@PORT@@
listen=tcp:127.0.0.1:@@PORT@@

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "ctl.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"

modparam("ctl", "binrpc", "unix:@@CTL@@")
modparam("tm", "fr_timer", 5000)
modparam("tm", "fr_inv_timer", 60000)
modparam("rr", "enable_full_lr", 1)
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "use_domain", 0)
modparam("usrloc", "hash_size", 16)
modparam("usrloc", "timer_interval", 10)
modparam("registrar", "default_expires", 3600)
modparam("registrar", "min_expires", 10)
modparam("registrar", "max_expires", 0)
modparam("registrar", "max_contacts", 0)
modparam("registrar", "gruu_enabled", 0)
modparam("auth", "algorithm", "MD5")
modparam("auth", "nonce_expire", 600)

request_route {
	if (!mf_process_maxfwd_header("10")) {
		sl_send_reply("483", "Too Many Hops");
		exit;
	}
	if (is_method("REGISTER")) {
		route(REGISTRAR);
		exit;
	}
	if (is_method("OPTIONS") && uri == myself && $rU == $null) {
		sl_send_reply("200", "OK");
		exit;
	}
	if (is_method("CANCEL")) {
		if (t_check_trans()) {
			t_relay();
		}
		exit;
	}
	if (has_totag()) {
		if (loose_route()) {
			t_relay();
			exit;
		}
		if (is_method("ACK")) {
			if (t_check_trans()) {
				t_relay();
			}
			exit;
		}
		sl_send_reply("404", "Not here");
		exit;
	}
	if (!is_method("ACK")) {
		t_check_trans();
	}
	remove_hf("Route");
	if (is_method("INVITE")) {
		record_route();
	}
	if (uri != myself) {
		sl_send_reply("403", "Relaying Forbidden");
		exit;
	}
	if (!lookup("location")) {
		sl_send_reply("404", "Not Found");
		exit;
	}
	if (!t_relay()) {
		sl_reply_error();
	}
	exit;
}

route[REGISTRAR] {
	if (!is_present_hf("Authorization")) {
		www_challenge("$td", "1");
		exit;
	}
	$var(pw) = "pw-" + $au;
	if (!pv_www_authenticate("$td", "$var(pw)", "0")) {
		www_challenge("$td", "1");
		exit;
	}
	if ($au != $tU) {
		sl_send_reply("403", "Forbidden auth ID");
		exit;
	}
	consume_credentials();
	if (!save("location")) {
		sl_reply_error();
	}
	exit;
}
"""

UAC_CFG = r"""#!KAMAILIO
debug=1
log_stderror=yes
children=@@CHILDREN@@
tcp_children=1
auto_aliases=no
dns=no
rev_dns=no
use_dns_cache=off
listen=udp:127.0.0.1:@@PORT@@

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "ctl.so"
loadmodule "textops.so"
loadmodule "rr.so"
loadmodule "db_text.so"
loadmodule "uac.so"

modparam("ctl", "binrpc", "unix:@@CTL@@")
modparam("tm", "fr_timer", 5000)
modparam("uac", "reg_db_url", "text://@@DB@@")
modparam("uac", "reg_contact_addr", "127.0.0.1:@@PORT@@")
modparam("uac", "reg_timer_interval", @@TIMER@@)
modparam("uac", "reg_retry_interval", 10)
modparam("uac", "reg_active", 0)
modparam("uac", "reg_hash_size", 14)

request_route {
	if (is_method("OPTIONS")) {
		sl_send_reply("200", "OK");
		exit;
	}
	sl_send_reply("404", "Not here");
	exit;
}
"""


def _free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1, below the ephemeral range."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        ok = True
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((HOST, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise BenchError("no free port")


class KamailioProcess:
    """One Kamailio with a rendered config in its own temporary state directory."""

    def __init__(self, template: str, *, shm_mb: int, children: int = 2,
                 values: dict[str, str] | None = None, name: str = "kamailio") -> None:
        if KAMAILIO is None or KAMCMD is None:
            raise BenchError("kamailio/kamcmd not installed")
        self.port = _free_port()
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"sipis-bench-{name}-"))
        self.ctl = self.state_dir / "ctl.sock"
        self.log_path = self.state_dir / "kamailio.log"
        self.shm_mb = shm_mb
        self.template = template
        self.values = {"PORT": str(self.port), "CTL": str(self.ctl), "DOMAIN": DOMAIN,
                       "CHILDREN": str(children), "DB": str(self.state_dir / "db"),
                       **(values or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"sip:{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        assert KAMAILIO is not None
        cfg = self.state_dir / "kamailio.cfg"
        cfg.write_text(re.sub(r"@@([A-Z_]+)@@", lambda m: self.values[m.group(1)],
                              self.template))
        with contextlib.suppress(FileNotFoundError):
            self.ctl.unlink()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [KAMAILIO, "-DD", "-E", "-f", str(cfg), "-P", str(self.state_dir / "pid"),
             "-Y", str(self.state_dir), "-w", str(self.state_dir),
             "-m", str(self.shm_mb), "-M", "16"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.state_dir)
        log.close()

        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"kamailio exited: {self.log_tail()}")
            try:
                self.rpc("core.uptime")
            except BenchError:
                return False
            return True

        wait_until(ready, timeout, 0.1, "kamailio ctl")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def rpc(self, *args: str, timeout: float = 10) -> str:
        assert KAMCMD is not None
        try:
            done = subprocess.run([KAMCMD, "-s", f"unix:{self.ctl}", *args],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"kamcmd {args[0]} timed out") from None
        out = done.stdout + done.stderr
        if done.returncode != 0 or out.lstrip().lower().startswith("error"):
            raise BenchError(f"kamcmd {' '.join(args)}: {out.strip()[:300]}")
        return done.stdout

    def stat(self, name: str) -> int:
        """One statistic, e.g. ``usrloc:registered_users`` or ``core:rcv_requests_register``."""
        group = name.split(":", 1)[0] + ":"
        out = self.rpc("stats.get_statistics", group)
        match = re.search(rf"{re.escape(name)}\s*=\s*(\d+)", out)
        if match is None:
            raise BenchError(f"no statistic {name}: {out[:200]}")
        return int(match.group(1))

    def pids(self) -> list[int]:
        """The main process and all its descendants."""
        if self.proc is None:
            return []
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children(pid))
        return found

    def cpu(self) -> float:
        return group_cpu(self.pids())

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc)
        # Children that outlived the main process go with the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> KamailioProcess:
        try:
            self.start()
        except BaseException:
            self.close()  # no __exit__ after a failed __enter__: remove the state dir here
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def provider(users: int) -> KamailioProcess:
    """The registrar, with shared memory for ``users`` contacts."""
    shm = max(128, 64 + users // 200)  # ~3 KiB per contact with headroom
    return KamailioProcess(PROVIDER_CFG, shm_mb=shm, children=4, name="provider")


def uac_reg(users: list[str], registrar: KamailioProcess, *, expires: int = 3600,
            timer: int = 5) -> KamailioProcess:
    """Kamailio's uac_reg keeping ``users`` registered at ``registrar`` (inactive at start)."""
    # uac_reg has no pacing: every due registration is in flight at once in shared memory.
    shm = max(128, 64 + len(users) * 34 // 1000)
    kam = KamailioProcess(UAC_CFG, shm_mb=shm, children=4, name="uacreg",
                          values={"TIMER": str(timer)})
    db = kam.state_dir / "db"
    db.mkdir()
    rows = ["id(int,auto) l_uuid(string) l_username(string) l_domain(string) "
            "r_username(string) r_domain(string) realm(string) auth_username(string) "
            "auth_password(string) auth_ha1(string,null) auth_proxy(string) expires(int) "
            "flags(int) reg_delay(int) contact_addr(string,null) socket(string,null)"]
    proxy = registrar.uri.replace(":", "\\:")
    for i, user in enumerate(users, start=1):
        rows.append(f"{i}:{user}:{user}:{DOMAIN}:{user}:{DOMAIN}:{DOMAIN}:{user}:"
                    f"{password(user)}::{proxy}:{expires}:0:0::")
    (db / "uacreg").write_text("\n".join(rows) + "\n")
    (db / "version").write_text("id(int,auto) table_name(string) table_version(int)\n"
                                "0:version:1\n0:uacreg:5\n")
    return kam


def wait_count(kam: KamailioProcess, stat: str, count: int, timeout: float,
               interval: float = 0.5) -> float:
    """Wait until ``stat`` reaches ``count``; return the monotonic time it was first seen."""
    deadline = time.monotonic() + timeout
    while True:
        if kam.stat(stat) >= count:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"{stat} stayed below {count} for {timeout:.0f}s "
                             f"(at {kam.stat(stat)})")
        time.sleep(interval)
