"""eta_replay.py on round2_aug's committed SQLite file: the time left up printed, replayed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DB = REPO / "results" / "round2" / "nkat-round2-aug" / "nkat-round2-aug.db"


def test_the_replay_of_window_2_is_steadier_than_the_rate_of_this_run_alone():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eta_replay.py"), str(DB),
                           "--first-trial", "18"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    points = json.loads(proc.stdout)["points"]
    assert len(points) >= 10 and points[0]["done"] == 18
    assert points[0]["eta_this_run_only_s"] is None and points[0]["eta_s"] is not None
    first_minutes = [p for p in points if p["elapsed_s"] <= 540]
    # The estimate from the study's history moves little while trials of mixed length end; the
    # rate of this run alone swung by a factor of 2.9 over the same minutes.
    study_rate = [p["eta_s"] for p in first_minutes]
    this_run = [p["eta_this_run_only_s"] for p in first_minutes if p["eta_this_run_only_s"]]
    assert max(study_rate) / min(study_rate) < 1.3
    assert max(this_run) / min(this_run) > 2.5
