"""Benchmarks 1-3: registrations held, REGISTER throughput vs uac_reg, cold restart.

All three register seeded instances at the bench provider (``bench.kamailio``), which counts
them (``usrloc:registered_users``) and every REGISTER it receives
(``core:rcv_requests_register``). sipis and the reference use disjoint user names, so one
provider serves both and each count is exact.

- Throughput: N accounts registered from scratch (REGISTER, 401, REGISTER, 200) by sipis, then
  by Kamailio's uac_reg; CPU of the sipis process and of all uac_reg Kamailio processes over
  the registering, per registration.
- Held: N instances registered and kept (paced by the token bucket), RSS, then one whole
  refresh cycle (0.8 × expires) watched: CPU over it, registered count never below N, no
  timeouts in sipis's log.
- Cold restart: sipis stopped and started again (the provider keeps its bindings, as a
  provider would): time from the start until the provider has accepted N more REGISTERs,
  and the highest REGISTER rate it saw (sampled each second) against the configured limit.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

from bench.common import BenchError, Figure, median
from bench.kamailio import KamailioProcess, provider, uac_reg, wait_count
from bench.sipis_proc import SipisProcess, point_store_at, seed_store, settings

USERS = "usrloc:registered_users"
REGISTERS = "core:rcv_requests_register"
ACCEPTED = "registrar:accepted_regs"
MARKER = "sip:127.0.0.1:1"  # placeholder registrar in the cached store
TIMEOUT_MARKS = ("TransactionTimeout", "timed out", "timeout", "registration=backoff")


class RateSampler:
    """Samples a provider counter once per second in a thread: the highest 1 s and 3 s rates."""

    def __init__(self, kam: KamailioProcess, stat: str = REGISTERS) -> None:
        self.kam = kam
        self.stat = stat
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RateSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(BenchError):
                self.samples.append((time.monotonic(), self.kam.stat(self.stat)))
            self._stop.wait(1.0)

    def max_rate(self, window: float = 1.0) -> float:
        best = 0.0
        s = self.samples
        j = 0
        for i in range(1, len(s)):
            while s[i][0] - s[j][0] > window + 0.5 and j < i - 1:
                j += 1
            span = s[i][0] - s[j][0]
            if span >= window * 0.5:
                best = max(best, (s[i][1] - s[j][1]) / span)
        return best


def _timeouts(daemon: SipisProcess, run: int | None = None) -> int:
    return sum(daemon.count_log(mark, run) for mark in TIMEOUT_MARKS)


def _prepare(workdir: Path, name: str, count: int, expires: int, registrar: str
             ) -> Path:
    directory = workdir / name
    shutil.rmtree(directory, ignore_errors=True)
    seed_store(directory, workdir / "cache", MARKER, count, expires)
    point_store_at(directory, MARKER, registrar)
    return directory


# --- 2: throughput --------------------------------------------------------------------------

def throughput(*, scale: int, smoke: bool, workdir: Path, rate: float = 4000.0,
               profile: bool = False) -> list[Figure]:
    """CPU-µs per authenticated registration: sipis vs uac_reg, same provider, same run.

    ``rate`` (REGISTERs/s) stays below what the provider sustains. Three rounds (one in
    smoke mode), each with a fresh provider, sipis then uac_reg: a noisy neighbour hits both
    alike, and the median of each side counts.
    """
    n = 100 if smoke else min(scale, 10000)
    rounds = [_throughput_round(n, smoke=smoke, workdir=workdir, rate=rate,
                                profile=profile and r == 0)
              for r in range(1 if smoke else 3)]
    ours = median([1e6 * r["sipis_cpu_s"] / max(1, r["sipis_registrations"]) for r in rounds])
    ref = median([1e6 * r["uac_cpu_s"] / n for r in rounds])
    timeouts = sum(int(r["sipis_timeouts"]) for r in rounds)
    ratio = (1e6 / ours) / (1e6 / ref) if ours and ref else None  # registrations per CPU-s
    return [Figure(
        "throughput", f"registrations per CPU-s ({n} accounts)",
        round(1e6 / ours) if ours else None, "/CPU-s",
        reference=round(1e6 / ref) if ref else None, reference_name="Kamailio uac_reg",
        ratio=ratio and round(ratio, 2), target="ratio ≥ 0.5",
        passed=bool(ratio is not None and ratio >= 0.5 and timeouts == 0),
        notes=f"median of {len(rounds)} rounds: sipis {ours:.0f} CPU-µs/reg, uac_reg "
              f"{ref:.0f}; timeouts {timeouts}",
        extra={"accounts": n, "rounds": rounds})]


def _throughput_round(n: int, *, smoke: bool, workdir: Path, rate: float, profile: bool
                      ) -> dict[str, float]:
    """One round: n accounts registered by sipis, then by uac_reg, at a fresh provider."""
    with provider(2 * n + 10) as prov:
        # sipis
        directory = _prepare(workdir, "throughput", n, 3600, prov.uri)
        env = {"SIPIS_BENCH_SAMPLE": str(workdir / "throughput-profile.txt")} if profile else {}
        daemon = SipisProcess(directory, settings(directory, rate=rate, burst=50), env=env)
        try:
            daemon.start()
            c0, n0, t0 = daemon.cpu(), prov.stat(USERS), time.monotonic()
            if smoke:  # 100 registrations may finish within one CPU-clock tick of the start:
                c0, n0 = 0.0, 0  # count from the process start (start-up included)
            wait_count(prov, USERS, n, timeout=60 + 4 * n / rate * 2, interval=0.2)
            sipis_cpu, sipis_wall = daemon.cpu() - c0, time.monotonic() - t0
            sipis_regs = n - n0
            sipis_msgs = prov.stat(REGISTERS)
            sipis_timeouts = _timeouts(daemon)
            rss = daemon.rss()
        finally:
            daemon.stop()
        # uac_reg
        users = [f"u{i:06d}" for i in range(n)]
        before = prov.stat(USERS)
        with uac_reg(users, prov, timer=2) as uac:
            u0, t0 = uac.cpu(), time.monotonic()
            msgs0 = prov.stat(REGISTERS)
            uac.rpc("uac.reg_active", "1")
            wait_count(prov, USERS, before + n, timeout=120 + n / 100, interval=0.2)
            uac_cpu, uac_wall = uac.cpu() - u0, time.monotonic() - t0
            uac_msgs = prov.stat(REGISTERS) - msgs0
    return {"sipis_cpu_s": sipis_cpu, "sipis_wall_s": sipis_wall,
            "sipis_registrations": sipis_regs, "sipis_register_msgs": sipis_msgs,
            "sipis_timeouts": sipis_timeouts, "sipis_rss_bytes": rss, "uac_cpu_s": uac_cpu,
            "uac_wall_s": uac_wall, "uac_register_msgs": uac_msgs}


# --- 1 and 3: held, then cold restart ---------------------------------------------------------

def held_and_restart(*, scale: int, smoke: bool, workdir: Path, rate: float,
                     restart_rate: float | None = None, do_held: bool = True,
                     do_restart: bool = True) -> list[Figure]:
    """Registrations held (RSS, CPU per refresh cycle) and the cold restart, on one store.

    ``rate`` is sipis's REGISTER rate limit while registering and holding; ``restart_rate``
    (default ``rate``) the one the restart runs under.
    """
    n = 200 if smoke else scale
    expires = 30 if smoke else (60 if n <= 5000 else 300)
    burst = max(10, int(rate / 20))
    figures: list[Figure] = []
    with provider(n + 10) as prov:
        directory = _prepare(workdir, "held", n, expires, prov.uri)
        daemon = SipisProcess(directory, settings(
            directory, rate=rate, burst=burst,
            extra={"registrar": {"min_expires": 30}}))
        try:
            start = daemon.start(timeout=600)
            ready_at = time.monotonic()
            with RateSampler(prov) as sampler:
                first_done = wait_count(prov, USERS, n, timeout=120 + 3 * n / rate)
            first_time = first_done - start
            if do_held:
                # One whole refresh cycle after everything is up: every binding refreshes once.
                cycle = 0.8 * expires if not smoke else 3.0  # smoke: only check it runs
                c0, m0 = daemon.cpu(), prov.stat(REGISTERS)
                low = n
                t_end = time.monotonic() + cycle
                while time.monotonic() < t_end:
                    low = min(low, prov.stat(USERS))
                    time.sleep(min(2.0, max(0.1, t_end - time.monotonic())))
                cycle_cpu = daemon.cpu() - c0
                cycle_msgs = prov.stat(REGISTERS) - m0
                rss, peak = daemon.rss(), daemon.max_rss()
                timeouts = _timeouts(daemon, 1)
                figures.append(Figure(
                    "held", f"RSS with {n} registered", round(rss / 2**20, 1), "MiB",
                    target="< 1024 MiB, 0 timeouts, none lost",
                    passed=rss < 2**30 and timeouts == 0 and low >= n,
                    notes=f"peak {peak / 2**20:.0f} MiB; timeouts {timeouts}; "
                          f"lowest registered count {low}",
                    extra={"instances": n, "expires": expires, "rate": rate,
                           "first_registration_s": first_time,
                           "startup_s": ready_at - start, "peak_rss_bytes": peak}))
                figures.append(Figure(
                    "held", f"CPU per refresh cycle ({cycle:.0f} s)", round(cycle_cpu, 2),
                    "CPU-s", target="informational",
                    notes=f"{1e6 * cycle_cpu / n:.0f} CPU-µs per refresh; "
                          f"{cycle_msgs} REGISTERs in the cycle "
                          f"({cycle_msgs / n:.2f} per binding)",
                    extra={"cycle_s": cycle, "register_msgs": cycle_msgs}))
            if do_restart:
                # The provider keeps its bindings (only sipis restarts): "registered again"
                # is counted as accepted REGISTERs since the restart.
                daemon.stop()
                rate = restart_rate or rate
                burst = max(10, int(rate / 20))
                daemon.reconfigure(register_rate=rate, register_burst=burst)
                accepted = prov.stat(ACCEPTED)
                with RateSampler(prov) as sampler:
                    start = daemon.start(timeout=600)
                    done = wait_count(prov, ACCEPTED, accepted + n,
                                      timeout=120 + 3 * n / rate)
                    time.sleep(1.5)  # one more sample past the end
                restart_s = done - start
                peak_1s, peak_3s = sampler.max_rate(1.0), sampler.max_rate(3.0)
                timeouts = _timeouts(daemon, daemon.runs)
                limit = rate + burst
                figures.append(Figure(
                    "restart", f"cold restart, {n} registered again", round(restart_s, 1),
                    "s", target="< 120 s, rate ≤ limit, 0 timeouts",
                    passed=restart_s < 120 and peak_3s <= limit and timeouts == 0,
                    notes=f"limit {rate:.0f} REGISTER/s (burst {burst}); provider saw at "
                          f"most {peak_1s:.0f}/s (1 s), {peak_3s:.0f}/s (3 s); "
                          f"timeouts {timeouts}",
                    extra={"rate_limit": rate, "burst": burst, "peak_1s": peak_1s,
                           "peak_3s": peak_3s, "samples": len(sampler.samples)}))
        finally:
            daemon.stop()
    return figures
