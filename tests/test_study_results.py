"""study_results.sh on a copy of Round 2's committed files: it makes them again, the same."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUND2 = REPO / "results" / "round2" / "nkat-round2"


def test_the_results_of_round2_come_out_as_committed(tmp_path):
    for name in ("nkat-round2.db", "nkat-round2_windows.txt", "stage2.json"):
        shutil.copy(ROUND2 / name, tmp_path / name)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "study_results.sh"), str(tmp_path),
                           "one NVIDIA H100 80GB HBM3 (all three windows)", "0.7609"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "report.md").read_text() == (ROUND2 / "report.md").read_text()
    assert (tmp_path / "status.txt").read_text() == (ROUND2 / "status.txt").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads((REPO / "results" / "round2_whole.json").read_text())
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported == sorted(p.name for p in (ROUND2 / "export").iterdir())


def test_a_folder_without_one_sqlite_file_is_one_line(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "study_results.sh"), str(tmp_path),
                           "x"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "exactly one SQLite file" in proc.stderr
