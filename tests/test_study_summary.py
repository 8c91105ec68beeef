"""study_summary.py on a real study's SQLite file: the trials the rank rule ended above the gate.

Round 2's committed study (results/round2/nkat-round2/) is the fixture, so the figures checked
are the ones results/README.md reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "study_summary.py"
ROUND2_DB = REPO / "results" / "round2" / "nkat-round2" / "nkat-round2.db"


def test_spearman_shares_tied_ranks_and_refuses_too_few_pairs(benchmark_script):
    spearman = benchmark_script("study_summary").spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # Ties: ranks 1.5, 1.5, 3 against 1, 2, 3.
    assert spearman([5, 5, 7], [1, 2, 3]) == 0.866
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_window_seconds_count_ended_and_lost_windows(tmp_path, benchmark_script):
    window_seconds = benchmark_script("study_summary").window_seconds
    windows = tmp_path / "windows.txt"
    windows.write_text("starting up for s at 17:00:09\n"
                       "up ended at 17:12:03 after 714 s\n"
                       "starting up for s at 22:08:23\n"
                       "machine lost at 22:17:23 after 540 s (its last snapshot)\n")
    assert window_seconds(windows) == [714.0, 540.0]
    assert window_seconds(tmp_path / "absent.txt") == []


def test_round2_rank_cuts_above_the_gate_beside_the_complete_trials():
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ROUND2_DB), "--device", "test"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    cuts = json.loads(proc.stdout)["rank_cuts_above_gate"]
    assert cuts["gate"] == 0.6
    assert [c["trial"] for c in cuts["cuts"]] == [15, 16, 21, 26, 30, 32, 36, 45, 46, 47, 49, 51]
    assert all(c["epoch"] == 15 and c["local_tpe"] >= 0.6 for c in cuts["cuts"])
    at15 = cuts["complete_at_epoch"]["15"]
    assert at15["complete_trials"] == 18
    assert at15["best_trial"] == 33 and at15["best_trial_local_tpe"] == 0.6833
    assert at15["complete_at_or_below_highest_cut"] == 7
    assert at15["spearman_vs_global_tpe"] == 0.814
