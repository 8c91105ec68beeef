"""The attention speed benchmark's machinery at CPU size: its workers start, wait, time and report.

Its numbers mean nothing on a CPU; what is tested is that the one GPU call the table comes from
runs every variant in its own process, times them, and writes the rows the issue asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_attention_speed_benchmark_writes_a_row_per_variant(tmp_path):
    out = tmp_path / "attention_speed.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "attention_speed.py"), "--device", "cpu",
         "--eager", "--no-check", "--tokens", "65", "--paths", "explicit", "fused",
         "--batch", "2", "--steps", "2", "--depth", "1", "--embed-dim", "32", "--jobs", "2",
         "--out", str(out), "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["tokens"], r["path"]) for r in rows] == [(65, "explicit"), (65, "fused")]
    for row in rows:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0
        assert row["peak_gib"] is None and row["device"].startswith("cpu")
        assert len(row["ms_per_step_blocks"]) == 2  # 2 steps: two timing blocks of one
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["65_explicit.log",
                                                                    "65_fused.log"]
    assert "65 tokens: fused" in proc.stdout
