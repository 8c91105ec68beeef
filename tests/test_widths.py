"""What a person sees on a terminal of 80, 100 and 200 columns, through real ptys.

`status` once printed a 138-character table, so at 80 columns every row wrapped onto two lines;
`up`'s progress line left its bar one character wide at 100 columns and was cut off at 80.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from test_export_status import STUDY, build_study

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def study_url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('widths') / 'study.db'}"
    build_study(url)
    return url


def run_on_pty(argv: list[str], columns: int, timeout: float = 60.0) -> str:
    """Run ``argv`` with its stdout on a pty ``columns`` wide; what it wrote, CRLF made LF."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = dict(os.environ, COLUMNS=str(columns))
    process = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            process.kill()
            pytest.fail(f"no output for {timeout} s from {argv}")
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert process.wait(timeout=timeout) == 0, process.stderr.read().decode()
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_status_fits_the_terminal_and_never_splits_a_row(study_url, columns):
    out = run_on_pty([sys.executable, "-m", "nkat_search", "status", "--study", STUDY,
                      "--storage", study_url], columns)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns, out
    # Every trial is one row: its number, its outcome and its Global TPE on one line.
    rows = [line for line in lines if re.match(r"^\s+\d+  (complete|pruned|gate_failed|failed|"
                                               r"running)\s", line)]
    assert [int(row.split()[0]) for row in rows] == list(range(7))
    header = next(line for line in lines if line.startswith("trial  outcome"))
    for column in ("LocalTPE", "GlobalTPE", "feasible", "why it stopped"):
        assert column in header, (columns, header)
    if columns == 200:
        assert "lambda" in header and "acc mnist" in header and "hidden" not in out
    else:
        assert "lambda" not in header
        assert f"hidden to fit {columns} columns: time, lambda" in out
    assert "best Global TPE 0.7400 (trial 1)" in " ".join(out.split())


def test_status_wide_shows_every_column_on_a_narrow_terminal(study_url):
    out = run_on_pty([sys.executable, "-m", "nkat_search", "status", "--study", STUDY,
                      "--storage", study_url, "--wide"], 80)
    header = next(line for line in out.splitlines() if line.startswith("trial  outcome"))
    for column in ("lambda", "acc cifar10", "acc mnist", "time", "why it stopped / what it is"):
        assert column in header
    assert "pruned at epoch 1 of 2 by the median pruner" in out


LIVE_BAR = """
import sys
from nkat_search.search.report import LiveBar, open_study, study_report
report = study_report(open_study(sys.argv[1], sys.argv[2]))
bar = LiveBar("nkat-quick", sys.stdout)
bar.update(report, 3, 8)
bar.update(report, 4, 8)
bar.close()
"""


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_ups_progress_line_fits_and_its_bar_shrinks_last(study_url, columns):
    out = run_on_pty([sys.executable, "-c", LIVE_BAR, study_url, STUDY], columns)
    frames = [ANSI.sub("", part) for part in re.split(r"[\r\n]", out) if part.strip()]
    assert frames
    for frame in frames:
        assert len(frame) < columns, frame
        bar = re.search(r"\|(.*)\|", frame).group(1)
        assert len(bar) >= 10, frame  # the running trial's detail gave way first
    last = frames[-1]
    assert last.startswith("nkat-quick 4/8 |")
    assert "best 0.7400 (#1)" in last
    # The time left is the study's own estimate (report.eta_seconds): six trials finished within
    # seconds of each other, two left, so a few seconds at most, not tqdm's "?" or its rate.
    assert re.search(r"\| \d\d:\d\d<\d+s, ", last), last
    if columns == 200:
        assert "#6 stage 1 cifar10 epoch 1/2 Local TPE 0.5000" in last
    else:
        assert "#6" in last  # shortened, still there
