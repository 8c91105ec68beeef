"""benchmarks/gpu_study_finish.sh on the CPU: after up has ended with the study finished, the
winner's Stage 2 starts (detached) in the same call and its files come back; an unfinished study
starts none. Real processes and the committed SQLite files; Stage 2 gets an empty data folder, so
it ends at once with its "not found" report (exit 2) instead of training."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_study_finish.sh"


def _ended_up_run(runs: Path, name: str) -> None:
    """An up.pid of a process that has ended: up ran on "this machine" and is over."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (runs / name / "up.pid").write_text(f"{dead.pid}\n")


def _call(tmp_path: Path, study_file: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"),
               NKAT_DATA_DIR=str(tmp_path / "no-data"), NKAT_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run(["bash", str(SCRIPT), study_file, "30"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_finished_study_runs_its_winners_stage2_once(tmp_path):
    name = "nkat-round2"
    study = tmp_path / "runs" / name
    (study / name / "export").mkdir(parents=True)
    (tmp_path / "no-data").mkdir()
    shutil.copy(REPO / "results" / "round2" / name / f"{name}.db", study / f"{name}.db")
    shutil.copy(REPO / "results" / "round2" / name / "export" / "best.yaml",
                study / name / "export" / "best.yaml")
    _ended_up_run(tmp_path / "runs", name)
    first = _call(tmp_path, "studies/round2.yaml")
    assert first.returncode == 0, first.stderr
    assert f"starting stage2_{name}" in first.stdout and "--val_fraction 0" in first.stdout
    assert f"stage2_{name} ended rc=2" in first.stdout  # no data here: nothing trained
    out = tmp_path / "out"
    for suffix in ("log.txt", "stage2.json", "stage2.md"):
        assert (out / f"stage2_{name}_{suffix}").exists(), suffix
    second = _call(tmp_path, "studies/round2.yaml")
    assert "starting" not in second.stdout and f"stage2_{name} ended rc=2" in second.stdout


def test_unfinished_study_starts_up_again_and_no_stage2(tmp_path):
    # round2_aug's file after window 3: 47 of 50 done, 3 trials left RUNNING by a lost machine.
    # With no data here the new up run stops at once with its "not found" error.
    name = "nkat-round2-aug"
    study = tmp_path / "runs" / name
    study.mkdir(parents=True)
    (tmp_path / "no-data").mkdir()
    shutil.copy(REPO / "results" / "round2" / name / f"{name}.db", study / f"{name}.db")
    _ended_up_run(tmp_path / "runs", name)
    result = _call(tmp_path, "studies/round2_aug.yaml")
    assert result.returncode == 0, result.stderr
    assert f"starting up for {name}" in result.stdout and "not found" in result.stdout
    assert f"{name} is not finished" in result.stdout
    assert "stage2" not in result.stdout
    assert not list((tmp_path / "out").glob("stage2_*"))
