"""Shared pieces of the benchmarks: figures, CPU clocks from /proc, machine facts, processes.

Every figure is read beside a reference measured in the same run on the same machine: the
machine is shared and noisy, so ratios mean more than absolute numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Figure:
    """One row of the table: our figure, the reference, their ratio and the target."""

    bench: str
    name: str
    value: float | None
    unit: str
    reference: float | None = None
    reference_name: str = ""
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None  # None: informational, no target
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BenchError(RuntimeError):
    """A benchmark could not run (a peer failed to start, a bound was hit)."""


# --- CPU and memory of a process -------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) in seconds, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def proc_max_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def group_cpu(pids: Sequence[int]) -> float:
    """Summed CPU seconds of several processes (e.g. all Kamailio workers); gone ones count 0."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += proc_cpu(pid)
    return total


def self_cpu() -> float:
    """CPU seconds of this process (all threads)."""
    t = os.times()
    return t.user + t.system


# --- machine ---------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """What the figures came from: cores, CPU model, memory, Python, Kamailio, sipp, load."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_bytes": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "kamailio": _version([_which("kamailio"), "-v"], r"version:\s*kamailio\s+(\S+)"),
        "sipp": _version([_which("sipp"), "-v"], r"SIPp\s+v?(\S+)"),
        "loadavg": os.getloadavg(),
    }


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _version(cmd: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, out.stdout + out.stderr, re.IGNORECASE)
    return match.group(1).rstrip(",") if match else None


# --- subprocesses ----------------------------------------------------------------------------

def python_cmd(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]


@contextlib.contextmanager
def process(cmd: list[str], *, log: Path | None = None, env: dict[str, str] | None = None,
            stdout: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, ended (TERM, then KILL) when the block ends."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=stdout if stdout is not None else out,
                            stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=ROOT, env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        stop_process(proc)
        if log is not None and hasattr(out, "close"):
            out.close()


@contextlib.contextmanager
def cores_apart() -> Iterator[frozenset[int] | None]:
    """Give sipis a CPU of its own while the block runs, as it has in production.

    The provider, the caller and the APNs server stand in for other hosts. They run on the
    remaining CPUs: this process moves there for the block, and the children it starts
    inherit that. Yields the CPU for ``SipisProcess(cpus=...)``, or None when there is only
    one CPU (then nothing moves). This process's affinity is restored afterwards.
    """
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        yield None
        return
    sipis = min(mine)
    os.sched_setaffinity(0, mine - {sipis})
    try:
        yield frozenset({sipis})
    finally:
        os.sched_setaffinity(0, mine)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the child, SIGKILL its group if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def read_json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The last JSON line a worker printed on stdout (waits for it to exit)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise BenchError(f"worker {proc.args!r} exceeded {timeout:.0f}s") from None
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"worker {proc.args!r} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def wait_until(check: Any, timeout: float, interval: float = 0.1, what: str = "") -> None:
    """Poll ``check()`` until true, or raise BenchError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what or check}")
        time.sleep(interval)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]
