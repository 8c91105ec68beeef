"""The results section of a study, made from the files Round 2 left (issue 23).

Reads the committed results of the real study (``results/round2_whole.json``, the winner's and the
baseline's Stage 2 JSON), so the figures checked here are the ones results/README.md reports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "benchmarks" / "study_report.py"
SUMMARY = REPO / "results" / "round2_whole.json"
WINNER = REPO / "results" / "round2" / "nkat-round2" / "stage2.json"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_report_of_round2_names_outcomes_top_five_and_the_stage2_table(tmp_path):
    out = tmp_path / "report.md"
    proc = _run("--summary", str(SUMMARY), "--stage2", str(WINNER), "--target", "0.7609",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text == proc.stdout
    assert "| complete | 18 |" in text and "| pruned by gate | 9 |" in text
    assert "| pruned by rank | 23 |" in text
    assert "| **configurations** (a retry is its original's configuration) | **50** |" in text
    assert "34.2 minutes over 3 window(s), 87.8 configurations per hour" in text
    rows = [line for line in text.splitlines() if line.startswith("| 33 | small/2/384/5 |")]
    assert len(rows) == 1 and "0.8843" in rows[0] and "78.60 %" in rows[0]
    assert sum(line.startswith("| ") and "small/2/384/5" in line
               for line in text.splitlines()) == 5
    assert "nkat_strength 0.27, dropout_embed 0.25, lr 0.19" in text
    assert "| Global TPE | 0.8842 | 0.7609 | >= 0.70 | 0.53 |" in text
    assert "| EMNIST | missing | missing |" in text
    assert "Global TPE >= 0.7609: met (0.8842)" in text
    assert "ended 12 trial(s) at or above the 0.60 gate: 15 (0.6029, epoch 15)" in text
    assert "the winner, trial 33, at 0.6833" in text and "Spearman's rho 0.814" in text


def test_report_without_stage2_says_it_is_not_run_and_a_missing_file_is_one_line():
    proc = _run("--summary", str(SUMMARY))
    assert proc.returncode == 0, proc.stderr
    assert "Stage 2 of the winner on the test splits: not run yet." in proc.stdout

    proc = _run("--summary", str(REPO / "results" / "no_such_summary.json"))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
