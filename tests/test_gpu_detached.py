"""benchmarks/gpu_detached.sh: one long command across several short calls, as on the device.

Real processes: the first call starts the command detached and returns while it runs; a later call
with the same name starts nothing, waits for it, and reports its exit status and files.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_detached.sh"


def _call(tmp_path: Path, wait_s: int, *command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"),
               COPY=str(tmp_path / "result.txt"))
    return subprocess.run(["bash", str(SCRIPT), "job", str(wait_s), "--", *command],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def test_a_command_outlives_its_call_and_the_next_call_reports_it(tmp_path):
    marker = tmp_path / "runs_count"
    command = ("bash", "-c", f"echo run >> {marker}; sleep 3; echo 42 > {tmp_path}/result.txt; "
                             "echo finished; exit 3")
    first = _call(tmp_path, 0, *command)
    assert first.returncode == 0, first.stderr
    assert "starting job" in first.stdout and "job still running" in first.stdout

    second = _call(tmp_path, 30, *command)
    assert "starting job" not in second.stdout  # found the running one, started nothing
    assert "finished" in second.stdout and "job ended rc=3 after" in second.stdout
    assert (tmp_path / "out" / "job_result.txt").read_text() == "42\n"
    assert "finished" in (tmp_path / "out" / "job_log.txt").read_text()

    third = _call(tmp_path, 5, *command)  # a finished job is reported again, not re-run
    assert "job ended rc=3" in third.stdout
    assert marker.read_text() == "run\n"


def test_a_call_without_the_separator_is_refused_with_its_usage(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "job", "5", "sleep", "1"], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: gpu_detached.sh")
