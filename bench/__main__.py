"""``make bench``: run the benchmarks, print the table, write it as JSON under bench/results/.

Usage: ``python -m bench [--only push,throughput,held,restart,invite] [--scale N] [--smoke]
[--rate R] [--restart-rate R] [--profile] [--workdir DIR] [--no-save]``.

Benchmarks (each bounds its own duration and load, loopback only):

- ``held``: N instances registered at a real Kamailio by one sipis (RSS, CPU per refresh
  cycle, zero timeouts);
- ``throughput``: authenticated registrations per CPU-second, sipis vs Kamailio's uac_reg;
- ``restart``: time for all N to be registered again after a restart, under the rate limit;
- ``invite``: sipp calls through Kamailio to sipis, INVITE arrival → push written (p50/p99)
  and the 180 at the caller;
- ``push``: CPU per push and pushes/s on one HTTP/2 connection, sipis vs aioapns.

``--smoke`` runs each at a tiny size (the test suite uses it to check the bench code runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, Figure, machine_info

RESULTS = ROOT / "bench" / "results"
ALL = ("push", "throughput", "held", "restart", "invite")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(ALL),
                        help=f"comma-separated subset of {', '.join(ALL)}")
    parser.add_argument("--scale", type=int, default=100_000,
                        help="instances for held/restart (throughput uses min(scale, 10000))")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds each")
    parser.add_argument("--rate", type=float, default=1500.0,
                        help="sipis register_rate (REGISTERs/s) while registering and holding")
    parser.add_argument("--restart-rate", type=float, default=4000.0,
                        help="sipis register_rate for the cold restart: what the provider "
                             "sustains (~4000 authenticated REGISTERs/s on this machine)")
    parser.add_argument("--profile", action="store_true",
                        help="write pyinstrument profiles of sipis into the work directory")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep state here (seeded stores are cached per size)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    return parser


def _runners(args: argparse.Namespace, workdir: Path
             ) -> dict[str, Callable[[], list[Figure]]]:
    from bench import invite, push, registration

    common = {"scale": args.scale, "smoke": args.smoke, "workdir": workdir}
    held = "held" in args.only
    restart = "restart" in args.only
    return {
        "push": lambda: push.run(profile=args.profile, **common),
        "throughput": lambda: registration.throughput(profile=args.profile, **common),
        # held and restart share one seeded store and one sipis (restart follows held).
        "held": lambda: registration.held_and_restart(
            rate=args.rate, restart_rate=args.restart_rate, do_held=held, do_restart=restart,
            **common),
        "restart": (lambda: registration.held_and_restart(
            rate=args.rate, restart_rate=args.restart_rate, do_held=False, do_restart=True,
            **common)) if not held else list,
        "invite": lambda: invite.run(profile=args.profile, **common),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"


def table(figures: list[Figure]) -> str:
    """The figures as a fixed-width text table."""
    head = ("benchmark", "figure", "value", "reference", "ratio", "target", "result")
    rows = [head]
    for f in figures:
        ref = f"{_fmt(f.reference)} ({f.reference_name})" if f.reference is not None else "-"
        result = {True: "PASS", False: "FAIL", None: "info"}[f.passed]
        rows.append((f.bench, f.name, f"{_fmt(f.value)} {f.unit}", ref,
                     _fmt(f.ratio), f.target, result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {f.bench}/{f.name}: {f.notes}" for f in figures if f.notes]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(ALL))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC)
    info = machine_info()
    print(f"sipis benchmarks on {info['nproc']} × {info['cpu_model']}, Python {info['python']}, "
          f"Kamailio {info['kamailio']}; scale {args.scale}{' (smoke)' if args.smoke else ''}",
          flush=True)
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sipis-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runners = _runners(args, workdir)
        for name in ALL:
            if name not in args.only:
                continue
            t0 = time.monotonic()
            print(f"-- {name} ...", flush=True)
            try:
                got = runners[name]()
            except Exception as exc:  # one failed benchmark must not hide the others
                traceback.print_exc()
                errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
                figures.append(Figure(name, "error", None, "", target="runs",
                                      passed=False, notes=errors[name][:300]))
                continue
            figures.extend(got)
            print(f"   {name} took {time.monotonic() - t0:.0f} s", flush=True)
    print()
    print(table(figures))
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": (datetime.datetime.now(datetime.UTC) - started).total_seconds(),
        "argv": sys.argv[1:] if argv is None else argv,
        "scale": args.scale, "smoke": args.smoke, "rate": args.rate,
        "restart_rate": args.restart_rate,
        "machine": info,
        "figures": [f.as_dict() for f in figures],
        "errors": errors,
        "passed": all(f.passed is not False for f in figures),
    }
    if not args.no_save:
        args.results.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        text = json.dumps(report, indent=2, default=str) + "\n"
        (args.results / f"{stamp}.json").write_text(text)
        (args.results / "latest.json").write_text(text)
        print(f"\nwritten: {args.results / (stamp + '.json')}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
