"""``python -m bench --smoke``: every benchmark still runs end to end at a tiny size.

No figure is checked against its target here (that is ``make bench``'s job on a quiet
machine); only that each benchmark produced its figures without an error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import kamailio as kamailio_peer

pytestmark = [pytest.mark.slow, pytest.mark.kamailio]

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"push": 2, "throughput": 1, "held": 2, "restart": 1, "invite": 2}


@pytest.mark.skipif(not kamailio_peer.available() or shutil.which("sipp") is None,
                    reason="kamailio/kamcmd or sipp not installed")
def test_bench_smoke_runs_every_benchmark(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--workdir", str(tmp_path / "work"),
         "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((results / "latest.json").read_text())
    assert report["smoke"] is True and not report["errors"], report["errors"]
    counts: dict[str, int] = {}
    for figure in report["figures"]:
        counts[figure["bench"]] = counts.get(figure["bench"], 0) + 1
        assert figure["value"] is not None, figure
    assert counts == EXPECTED
    assert report["machine"]["nproc"] >= 1 and report["machine"]["python"]
    assert "benchmark" in done.stdout and "push" in done.stdout  # the table was printed
