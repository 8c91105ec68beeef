"""The scaling benchmark itself, at CPU size on the real PostgreSQL: it runs, and its checks hold.

Its timings mean nothing on a CPU; what is tested is that the benchmark the GPU numbers come from
starts its workers, counts every trial once and reports PASS only when the study is whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_scaling_benchmark_on_postgres_counts_every_trial_once(fresh_postgres_url, data_dir, tmp_path):
    base = fresh_postgres_url.rsplit("/", 1)[0]  # the server; the benchmark makes a database per run
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--quick", "--workers", "2",
         "--trials-per-gpu", "2", "--trials", "4", "--storage-base", base,
         "--data-dir", str(data_dir), "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["storage"].startswith("postgresql")
    (run,) = result["runs"]
    assert (run["workers"], run["trials_per_gpu"], run["processes"]) == (2, 2, 4)
    assert run["invariants"] == "PASS" and run["finished"] == run["trials"] == 4
    assert run["worker_exit_codes"] == [0, 0]
