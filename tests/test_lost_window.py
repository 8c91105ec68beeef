"""benchmarks/lost_window.py: a window whose device machine was lost gets its closing line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "lost_window.py"
UP_LOG = REPO / "results" / "round2" / "nkat-round2-aug" / "nkat-round2-aug_up_log.txt"


def test_lost_window_closed_from_the_last_elapsed_stamp_of_round2_aug(benchmark_script):
    # round2_aug's third window: started 22:08:23, its last snapshot's log ends at [0:08:50].
    windows = ("starting up for nkat-round2-aug at 19:45:23\n"
               "up ended at 20:02:40 after 1037 s\n"
               "starting up for nkat-round2-aug at 22:08:23\n")
    line = benchmark_script("lost_window").lost_line(windows, UP_LOG.read_text())
    assert line == "machine lost at 22:17:13 after 530 s (up did not end; its log's last line)"


def test_closed_or_empty_records_are_left_alone(benchmark_script):
    lost_line = benchmark_script("lost_window").lost_line
    assert lost_line("", "[0:01:00] x\n") is None
    assert lost_line("starting up for s at 17:00:09\nup ended at 17:12:03 after 714 s\n",
                     "[0:11:54] x\n") is None
    # A window that printed nothing after up's first line: 0 s, not the window before's stamp.
    log = "study s: storage sqlite:///a.db\n[0:11:54] x\nstudy s: storage sqlite:///a.db\n"
    assert lost_line("starting up for s at 23:59:50\n", log) == (
        "machine lost at 23:59:50 after 0 s (up did not end; its log's last line)")
    # Past midnight the clock wraps.
    assert lost_line("starting up for s at 23:59:50\n", "[0:00:20] x\n").startswith(
        "machine lost at 00:00:10 after 20 s")


def test_script_appends_once(tmp_path):
    windows = tmp_path / "windows.txt"
    windows.write_text("starting up for s at 10:00:00\n")
    log = tmp_path / "up.log"
    log.write_text("study s: storage sqlite:///a.db\n[0:02:05] 3/50 trials done\n")
    for _ in range(2):
        subprocess.run([sys.executable, str(SCRIPT), str(windows), str(log)], check=True)
    assert windows.read_text().splitlines() == [
        "starting up for s at 10:00:00",
        "machine lost at 10:02:05 after 125 s (up did not end; its log's last line)"]
