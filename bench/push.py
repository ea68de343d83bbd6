"""Benchmark 5, push cost: CPU per push and pushes/s over one HTTP/2 connection, vs aioapns.

The local APNs (``bench.apns_sink``) runs in its own process; each client runs in its own
process (``bench.push_client``) one after the other, never at the same time, alternating for
``rounds`` rounds so that a noisy neighbour hits both alike; the median round counts.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import Figure, median, proc_cpu, process, python_cmd, read_json_line

TARGET_RATE = 3000.0


def _write_material(directory: Path) -> tuple[Path, Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = directory / "c.pem", directory / "k.pem", directory / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    p8 = directory / "AuthKey.p8"
    p8.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path, ca_path, p8


def run(*, scale: int, smoke: bool, workdir: Path, profile: bool = False) -> list[Figure]:
    """Returns the CPU-per-push and pushes/s figures."""
    count = 200 if smoke else 30000  # bounded by seconds first on this machine
    seconds = 2.0 if smoke else 5.0
    rounds = 1 if smoke else 3
    concurrency = 50 if smoke else 200
    results: dict[str, list[dict[str, Any]]] = {"sipis": [], "aioapns": []}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cert, key, ca, p8 = _write_material(Path(tmp))
        with process(python_cmd("bench.apns_sink", str(cert), str(key)),
                     stdout=subprocess.PIPE) as sink:
            assert sink.stdout is not None
            port = json.loads(sink.stdout.readline())["port"]
            for r in range(rounds):
                for client in ("sipis", "aioapns"):
                    extra = []
                    if profile and client == "sipis" and r == 0:
                        extra = ["--profile", str(workdir / "push-profile.txt")]
                    with process(python_cmd(
                            "bench.push_client", client, str(port), str(ca), str(p8),
                            "--count", str(count), "--seconds", str(seconds),
                            "--concurrency", str(concurrency),
                            "--warmup", "50" if smoke else "500", *extra),
                            stdout=subprocess.PIPE) as worker:
                        sink_cpu = proc_cpu(sink.pid)
                        result = read_json_line(worker, timeout=seconds + 60)
                        # Whole-run server CPU (warm-up included) per push: is it the limit?
                        result["sink_cpu"] = proc_cpu(sink.pid) - sink_cpu
                        results[client].append(result)
    per: dict[str, dict[str, float]] = {}
    for client, runs in results.items():
        per[client] = {
            "cpu_us": median([1e6 * r["cpu"] / max(1, r["pushes"]) for r in runs]),
            "rate": median([r["pushes"] / r["wall"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
        }
    ours, ref = per["sipis"], per["aioapns"]
    extra = {"rounds": results, "concurrency": concurrency}
    cpu_ratio = ours["cpu_us"] / ref["cpu_us"] if ref["cpu_us"] else None
    rate_ratio = ours["rate"] / ref["rate"] if ref["rate"] else None
    return [
        Figure("push", "CPU per push", round(ours["cpu_us"], 1), "µs",
               reference=round(ref["cpu_us"], 1), reference_name="aioapns",
               ratio=cpu_ratio and round(cpu_ratio, 2), target="ratio ≤ 1.0",
               passed=bool(cpu_ratio is not None and cpu_ratio <= 1.0
                           and ours["errors"] == 0),
               notes=f"errors sipis={ours['errors']:.0f} aioapns={ref['errors']:.0f}",
               extra=extra),
        Figure("push", "pushes/s (1 connection)", round(ours["rate"]), "/s",
               reference=round(ref["rate"]), reference_name="aioapns",
               ratio=rate_ratio and round(rate_ratio, 2), target=f"≥ {TARGET_RATE:.0f}/s",
               passed=ours["rate"] >= TARGET_RATE and ours["errors"] == 0),
    ]
