"""Benchmark 4, INVITE → push: sipp calls through Kamailio to sipis, the local APNs answering.

sipis registers M seeded instances at the bench provider; sipp sends calls at a fixed rate to
those users (injection file, sequential) through the provider, which routes them to sipis's
contacts. Every call is cancelled by the caller after a short pause (so calls do not pile up
for the 120 s ring timer). Measured:

- inside sipis (``bench.sipis_run`` timing hooks, CLOCK_MONOTONIC): INVITE datagram handed to
  the SIP transport → the push's last bytes handed to the APNs connection's socket, p50/p99;
- at the caller (sipp ``-trace_rtt``): INVITE sent → first 180, p50/p99.

The APNs server is ``bench.apns_sink`` in its own process (answers 200 at once). On a
machine with two CPUs or more, sipis has the first CPU to itself and the peers share the
others (``cores_apart``): they stand in for other hosts, and on a shared core their bursts
showed up as sipis's latency (p99 26–30 ms apart vs 50–66 ms together, same code, same hour).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import (
    HOST,
    BenchError,
    Figure,
    cores_apart,
    percentile,
    process,
    python_cmd,
)
from bench.kamailio import DOMAIN, _free_port, provider, wait_count
from bench.push import _write_material
from bench.registration import USERS, _prepare
from bench.sipis_proc import SipisProcess, settings, user

SCENARIO = Path(__file__).with_name("sipp") / "invite_cancel.xml"
TARGET_P99_MS = 5.0


def _sipp(directory: Path, target: str, users: int, rate: int, calls: int, pause_ms: int,
          timeout: float) -> tuple[list[float], int, int]:
    """Run sipp; returns (INVITE→first 180 times in ms, successful calls, failed calls)."""
    sipp = shutil.which("sipp")
    if sipp is None:
        raise BenchError("sipp not installed")
    scenario = directory / "invite_cancel.xml"
    scenario.write_text(SCENARIO.read_text().replace("@@PAUSE_MS@@", str(pause_ms)))
    inject = directory / "users.csv"
    inject.write_text("SEQUENTIAL\n" + "".join(f"{user(i)}\n" for i in range(users)))
    stats = directory / "stats.csv"
    cmd = ["timeout", "-s", "KILL", str(int(timeout) + 10), sipp, target,
           "-sf", str(scenario), "-inf", str(inject), "-key", "domain", DOMAIN,
           "-t", "u1", "-i", HOST, "-p", str(_free_port()),
           "-ci", HOST, "-cp", str(_free_port()), "-mi", HOST, "-mp", str(_free_port()),
           "-r", str(rate), "-rp", "1000", "-m", str(calls), "-l", str(max(10, rate * 3)),
           "-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error",
           "-trace_rtt", "-rtt_freq", "1", "-trace_stat", "-stf", str(stats),
           "-recv_timeout", "10000"]
    done = subprocess.run(cmd, cwd=directory, capture_output=True, text=True,
                          timeout=timeout + 30, check=False)
    rtts: list[float] = []
    for path in directory.glob("*_rtt.csv"):
        for line in path.read_text().splitlines()[1:]:
            parts = line.split(";")
            if len(parts) >= 2:
                with contextlib.suppress(ValueError):
                    rtts.append(float(parts[1]))
    ok = failed = 0
    if stats.exists():
        lines = stats.read_text().splitlines()
        if len(lines) >= 2:
            head = lines[0].split(";")
            last = lines[-1].split(";")
            row = dict(zip(head, last, strict=False))
            ok = int(row.get("SuccessfulCall(C)", 0) or 0)
            failed = int(row.get("FailedCall(C)", 0) or 0)
    if not rtts and done.returncode not in (0, 1):
        raise BenchError(f"sipp failed ({done.returncode}): {done.stderr[-500:]}")
    return rtts, ok, failed


def _latencies(timing: Path, since_ns: int) -> tuple[list[float], int, int]:
    """INVITE arrival → push written, ms, per Call-ID (first INVITE, first push of each)."""
    invites: dict[str, int] = {}
    pushes: dict[str, int] = {}
    text = timing.read_text() if timing.exists() else ""
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3 or int(parts[0]) < since_ns:
            continue
        t, kind, key = int(parts[0]), parts[1], parts[2]
        table = invites if kind == "invite" else pushes
        table.setdefault(key, t)
    lat = [(pushes[k] - t) / 1e6 for k, t in invites.items() if k in pushes]
    return lat, len(invites), len(pushes)


def run(*, scale: int, smoke: bool, workdir: Path, profile: bool = False,
        rate: int | None = None) -> list[Figure]:
    rate = rate or (20 if smoke else 200)
    seconds = 2 if smoke else 15
    calls = rate * seconds
    users = 50 if smoke else min(scale, 2000)
    pause_ms = 200 if smoke else 500
    with cores_apart() as cpus, tempfile.TemporaryDirectory(dir=workdir) as tmp_name, \
            provider(users + 10) as prov:
        tmp = Path(tmp_name)
        cert, key, ca, p8 = _write_material(tmp)
        directory = _prepare(workdir, "invite", users, 3600, prov.uri)
        with process(python_cmd("bench.apns_sink", str(cert), str(key)),
                     stdout=subprocess.PIPE) as sink:
            assert sink.stdout is not None
            port = json.loads(sink.stdout.readline())["port"]
            timing = tmp / "timing.txt"
            config = settings(directory, rate=2000, burst=50, extra={
                "push": {"provider": "live", "apns": {
                    "team_id": "TEAM123456", "key_id": "KEY1234567", "key_file": str(p8),
                    "production_url": f"https://{HOST}:{port}", "ca_file": str(ca)}},
            })
            p8.chmod(0o600)
            env = {"SIPIS_BENCH_TIMING": str(timing)}
            if profile:
                env["SIPIS_BENCH_SAMPLE"] = str(workdir / "invite-profile.txt")
            daemon = SipisProcess(directory, config, env=env, cpus=cpus)
            try:
                daemon.start()
                wait_count(prov, USERS, users, timeout=60)
                # Warm-up: open the APNs connection and let every code path run once.
                _sipp(tmp, f"{HOST}:{prov.port}", users, 5, 5, pause_ms, 30)
                mark = time.monotonic_ns()
                if profile:
                    os.kill(daemon.pid, signal.SIGUSR2)  # the sampler starts afresh
                c0, t0 = daemon.cpu(), time.monotonic()
                rtts, ok, failed = _sipp(tmp, f"{HOST}:{prov.port}", users, rate, calls,
                                         pause_ms, seconds + 60)
                cpu, wall = daemon.cpu() - c0, time.monotonic() - t0
                time.sleep(0.5)
            finally:
                daemon.stop()  # the timing lines are written at exit
            lat, n_inv, n_push = _latencies(timing, mark)
            hooks = "hooks not installed" not in daemon.log_text()
    if not lat:
        raise BenchError(f"no INVITE→push pairs (invites {n_inv}, pushes {n_push}, "
                         f"hooks {'on' if hooks else 'missing'})")
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    r50, r99 = (percentile(rtts, 50), percentile(rtts, 99)) if rtts else (None, None)
    return [
        Figure("invite", f"INVITE→push written p99 ({rate} calls/s)", round(p99, 2), "ms",
               target=f"p99 < {TARGET_P99_MS:g} ms",
               passed=p99 < TARGET_P99_MS and failed == 0 and n_push >= 0.99 * calls,
               notes=f"p50 {p50:.2f} ms, max {max(lat):.2f} ms; {n_inv} INVITEs, {n_push} "
                     f"pushes; sipp calls ok {ok}, failed {failed}; sipis "
                     f"{1e3 * cpu / max(1, n_inv):.2f} CPU-ms per call",
               extra={"p50_ms": p50, "p99_ms": p99, "calls": calls, "rate": rate,
                      "cpu_s": cpu, "wall_s": wall}),
        Figure("invite", "INVITE→first 180 at the caller p99", r99 and round(r99, 2), "ms",
               target="informational",
               notes=f"p50 {r50} ms (sipp rtd, 1 ms resolution, through Kamailio)",
               extra={"p50_ms": r50, "p99_ms": r99, "samples": len(rtts)}),
    ]
