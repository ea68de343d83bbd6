"""``sipis`` CLI for the benchmarks, with optional in-process timing hooks.

With ``SIPIS_BENCH_PROFILE=FILE`` the whole run is profiled (pyinstrument text report, or
cProfile stats for a ``.pstats`` FILE, written at exit). With ``SIPIS_BENCH_TIMING=FILE`` set,
it wraps two points of a running daemon and appends one line per event to FILE at exit
(``monotonic_ns kind key``; CLOCK_MONOTONIC is shared by every process, so the lines compare
with other processes' clocks):

- ``invite``: a UDP datagram holding an INVITE handed to sipis's SIP transport, keyed by its
  Call-ID (the moment the INVITE arrived at sipis, before parsing);
- ``push``: the bytes holding a push's END_STREAM taken by the kernel (the APNs connection's
  TLS stream had nothing left to write), keyed by the push payload's ``sip_call_id``.

These wrap private functions of ``sipis.sip.transport`` and ``sipis.push.apns`` from the
outside, so that the daemon's code carries nothing for the benchmarks; if those names move,
the hooks are skipped and the INVITE benchmark says so.

Other instruments (``_INSTRUMENTS``), each turned on by a variable naming its output file:
``SIPIS_BENCH_SAMPLE`` (CPU sampler: self, self by file, inclusive), ``SIPIS_BENCH_STEPS``
(trio task steps per coroutine, main-thread CPU), ``SIPIS_BENCH_GCSTATS`` (collector time per
generation and each full collection), ``SIPIS_BENCH_GARBAGE`` (the types that form reference
cycles), ``SIPIS_BENCH_TRACEMALLOC``; ``SIPIS_BENCH_TRY`` names experiments.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any


def _install_timing(path: str) -> list[str]:
    """Install the hooks; returns the names of those that could not be installed."""
    import atexit

    lines: list[str] = []  # kept in memory: a write per event would add to what we measure
    missing: list[str] = []

    def flush() -> None:
        with open(path, "a") as out:
            out.writelines(lines)
        lines.clear()

    def note(kind: str, key: str) -> None:
        lines.append(f"{time.monotonic_ns()} {kind} {key}\n")
        if len(lines) >= 100_000:
            flush()

    atexit.register(flush)

    # -- INVITE arrival: the UDP transport's datagram handler, before parsing.
    from sipis.sip import transport

    transport_cls: Any = getattr(transport, "NetworkTransport", None)
    original_datagram = getattr(transport_cls, "_datagram", None)
    if original_datagram is None:
        missing.append("invite")
    else:
        async def datagram(self: Any, udp: Any, data: bytes, address: Any) -> None:
            if data[:7] == b"INVITE ":
                key = _call_id(data)
                if key:
                    note("invite", key)
            await original_datagram(self, udp, data, address)

        transport_cls._datagram = datagram

    # -- push written: the APNs connection's socket writes.
    from sipis.push import apns

    conn_cls: Any = getattr(apns, "_Connection", None)
    original_send_body = getattr(conn_cls, "_send_body", None)
    original_connect = getattr(conn_cls, "_connect", None)
    original_start_now = getattr(conn_cls, "start_now", None)
    if conn_cls is None or original_send_body is None or original_connect is None \
            or original_start_now is None:
        missing.append("push")
        return missing

    pending: dict[int, list[tuple[int, str]]] = {}  # id(connection) → [(end_offset, key)]

    def written(conn: Any) -> None:
        """Note the pushes whose last byte the socket has taken."""
        waiting = pending.get(id(conn))
        if waiting and conn._tls is not None and conn._tls.pending == 0:
            handed = conn._handed
            keep = []
            for end_offset, key in waiting:
                if end_offset <= handed:
                    note("push", key)
                else:
                    keep.append((end_offset, key))
            pending[id(conn)] = keep

    def sent(conn: Any, stream: Any, body: bytes) -> None:
        if stream is not None and stream.end_offset is not None:
            key = _json_value(body, b'"sip_call_id":"')
            if key:
                pending.setdefault(id(conn), []).append((stream.end_offset, key))
                written(conn)

    async def send_body(self: Any, stream: Any, body: bytes) -> None:
        # The bytes usually reach the socket inside the call (no writer task in between).
        await original_send_body(self, stream, body)
        sent(self, stream, body)

    def start_now(self: Any, ex: Any, headers: Any, body: bytes) -> bool:
        # A call's push, written from the call's own task.
        went: bool = original_start_now(self, ex, headers, body)
        if went:
            sent(self, ex.stream, body)
        return went

    async def connect(self: Any) -> Any:
        tls = await original_connect(self)
        conn = self
        original_send_pending = tls._send_pending

        def send_pending() -> bool:
            done: bool = original_send_pending()
            if done:
                written(conn)
            return done

        tls._send_pending = send_pending
        return tls

    conn_cls._send_body = send_body
    conn_cls.start_now = start_now
    conn_cls._connect = connect
    return missing


def _call_id(data: bytes) -> str | None:
    for line in data.split(b"\r\n"):
        if not line:
            return None
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"call-id", b"i"):
            return value.strip().decode("latin-1")
    return None


def _json_value(body: bytes, prefix: bytes) -> str | None:
    start = body.find(prefix)
    if start < 0:
        return None
    start += len(prefix)
    end = body.find(b'"', start)
    return body[start:end].decode() if end > start else None


def _install_sampler(path: str, interval: float = 0.0005) -> None:
    """A CPU-time sampling profiler (SIGPROF): self and inclusive samples per function.

    Cheap enough to leave the measured figures nearly unchanged, unlike tracing profilers;
    written to ``path`` at exit, most sampled first.
    """
    import atexit
    import collections
    import signal

    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = [0]

    def name(frame: Any) -> str:
        code = frame.f_code
        where = code.co_filename.rsplit("site-packages/", 1)[-1].replace(str(os.getcwd()), "")
        return f"{where.lstrip('/')}:{code.co_name}"

    def sample(signum: int, frame: Any) -> None:
        if frame is None:
            return
        total[0] += 1
        own[name(frame)] += 1
        seen = set()
        while frame is not None:
            key = name(frame)
            if key not in seen:
                seen.add(key)
                inclusive[key] += 1
            frame = frame.f_back

    def dump() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0)
        with open(path, "w") as out:
            out.write(f"samples {total[0]} (every {interval * 1e3:g} ms of CPU)\n\nself:\n")
            for key, count in own.most_common(60):
                out.write(f"{100 * count / max(1, total[0]):6.2f}%  {key}\n")
            by_file: collections.Counter[str] = collections.Counter()
            for key, count in own.items():
                by_file[key.rsplit(":", 1)[0]] += count
            out.write("\nself, by file:\n")
            for key, count in by_file.most_common(40):
                out.write(f"{100 * count / max(1, total[0]):6.2f}%  {key}\n")
            out.write("\ninclusive:\n")
            for key, count in inclusive.most_common(120):
                out.write(f"{100 * count / max(1, total[0]):6.2f}%  {key}\n")

    def restart(signum: int, frame: Any) -> None:
        own.clear()
        inclusive.clear()
        total[0] = 0

    signal.signal(signal.SIGPROF, sample)
    signal.signal(signal.SIGUSR2, restart)  # the bench's mark: forget start-up and warm-up
    signal.setitimer(signal.ITIMER_PROF, interval, interval)
    atexit.register(dump)


def _install_tracemalloc(path: str) -> None:
    """Trace allocations; at exit, write the 40 source lines holding the most memory."""
    import atexit
    import tracemalloc

    tracemalloc.start(1)

    def dump() -> None:
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("lineno")
        with open(path, "w") as out:
            out.write(f"total {sum(s.size for s in stats) / 2**20:.1f} MiB\n")
            for stat in stats[:40]:
                out.write(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d}  {stat.traceback}\n")

    atexit.register(dump)


def _install_gc_stats(path: str) -> None:
    """Time the cyclic garbage collector per generation; written to ``path`` at exit."""
    import atexit
    import gc

    spent = [0.0, 0.0, 0.0]
    runs = [0, 0, 0]
    full: list[tuple[float, float, int]] = []  # (process CPU at start, CPU taken, collected)
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            took = time.process_time() - started[0]
            spent[info["generation"]] += took
            runs[info["generation"]] += 1
            if info["generation"] == 2:
                full.append((started[0], took, info.get("collected", 0)))

    def dump() -> None:
        with open(path, "w") as out:
            for gen in range(3):
                out.write(f"gen{gen}: {runs[gen]} collections, {spent[gen]:.2f} CPU-s\n")
            out.write(f"process CPU {time.process_time():.2f} s, objects {len(gc.get_objects())}\n")
            for at, took, collected in full:
                out.write(f"  full collection at CPU {at:.2f} s: {took:.3f} s, {collected} freed\n")

    gc.callbacks.append(callback)
    atexit.register(dump)


def _install_experiments(spec: str) -> None:
    """Experiments for changes in modules the benchmarks do not own (``SIPIS_BENCH_TRY``):

    - ``gcfreeze``: ``gc.freeze()`` right after the stored instances are loaded;
    - ``sweeptime``: log how long each lifetime sweep takes (CPU).
    """
    import gc
    import logging

    from sipis import instances

    service: Any = instances.InstanceService
    wanted = set(spec.split(","))
    if "gcfreeze" in wanted:
        original_load = service.load_all

        async def load_all(self: Any) -> int:
            kept: int = await original_load(self)
            gc.collect()
            gc.freeze()
            return kept

        service.load_all = load_all
    if "sweeptime" in wanted:
        original_sweep = service.sweep

        async def sweep(self: Any) -> int:
            t0 = time.process_time()
            wiped: int = await original_sweep(self)
            logging.getLogger("bench").warning("sweep took %.3f CPU-s", time.process_time() - t0)
            return wiped

        service.sweep = sweep


def _install_step_counter(path: str) -> None:
    """Count trio task steps (wake-ups) per coroutine; written to ``path`` at exit: how many
    scheduler passes a unit of work costs."""
    import atexit
    import collections

    import trio

    steps: collections.Counter[str] = collections.Counter()

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: Any) -> None:
            code = getattr(task.coro, "cr_code", None)
            steps[code.co_qualname if code is not None else task.name] += 1

    original_run = trio.run

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = (*kwargs.get("instruments", ()), Steps())
        return original_run(*args, **kwargs)

    trio.run = run

    def dump() -> None:
        with open(path, "w") as out:
            out.write(f"total {sum(steps.values())}\n")
            for name, count in steps.most_common(40):
                out.write(f"{count:10d}  {name}\n")
            with open(f"/proc/self/task/{os.getpid()}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            main = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            out.write(f"main thread {main:.2f} CPU-s of {time.process_time():.2f}\n")

    atexit.register(dump)


def _install_garbage_census(path: str) -> None:
    """Keep what the cyclic collector frees (``gc.DEBUG_SAVEALL``) and write its types to
    ``path`` at exit: what creates reference cycles, i.e. work for the collector."""
    import atexit
    import collections
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)

    def dump() -> None:
        gc.collect()
        kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        with open(path, "w") as out:
            out.write(f"{len(gc.garbage)} objects in cycles\n")
            for name, count in kinds.most_common(40):
                out.write(f"{count:10d}  {name}\n")

    atexit.register(dump)


#: Environment variable → what it installs before sipis starts (each takes a file path).
_INSTRUMENTS: dict[str, Callable[[str], None]] = {
    "SIPIS_BENCH_GARBAGE": _install_garbage_census,
    "SIPIS_BENCH_STEPS": _install_step_counter,
    "SIPIS_BENCH_TRY": _install_experiments,
    "SIPIS_BENCH_GCSTATS": _install_gc_stats,
    "SIPIS_BENCH_TRACEMALLOC": _install_tracemalloc,
    "SIPIS_BENCH_SAMPLE": _install_sampler,
}


def main() -> int:
    for variable, install in _INSTRUMENTS.items():
        value = os.environ.get(variable)
        if value:
            install(value)
    timing = os.environ.get("SIPIS_BENCH_TIMING")
    if timing:
        missing = _install_timing(timing)
        if missing:
            print(f"bench timing hooks not installed: {', '.join(missing)}", file=sys.stderr)
    from sipis.cli import main as sipis_main

    profile = os.environ.get("SIPIS_BENCH_PROFILE")
    if not profile:
        return sipis_main(sys.argv[1:])
    if profile.endswith(".pstats"):
        import cProfile

        with cProfile.Profile() as prof:
            try:
                return sipis_main(sys.argv[1:])
            finally:
                prof.dump_stats(profile)
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    try:
        return sipis_main(sys.argv[1:])
    finally:
        profiler.stop()
        with open(profile, "w") as f:
            f.write(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    raise SystemExit(main())
