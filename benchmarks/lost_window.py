"""Close the record of a study window whose device machine was lost before `up` ended.

``gpu_study_window.sh`` writes "starting up for NAME at HH:MM:SS" when a window starts and "up
ended at HH:MM:SS after S s" when up ends. If the machine goes away in between (a call that came
after its 30 s warm time), the second line is never written, and the window's seconds would be
missing from the study's wall clock (``study_summary.py`` sums those lines). Its last snapshot
holds up's log up to the last call's end; the last elapsed time up printed there ("[h:mm:ss]")
is how long the window ran as far as anything came back. This appends

    machine lost at HH:MM:SS after S s (up did not end; its log's last line)

to the windows file, once, when it ends with a "starting up" line. ``gpu_study_window.sh`` runs
it on resume, before the next window starts.

    python3 benchmarks/lost_window.py WINDOWS_TXT UP_LOG

Standard library only: it runs on the device machine.
"""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

START = re.compile(r"^starting up for \S+ at (\d\d):(\d\d):(\d\d)$")
ELAPSED = re.compile(r"^\[(\d+):(\d\d):(\d\d)\]")
# up's first line in each run ("study NAME: storage URL"): where the lost window's log begins.
UP_START = re.compile(r"^study \S+: storage ")


def lost_line(windows: str, up_log: str) -> str | None:
    """The line that closes the last window, or None when it is closed (or none started)."""
    lines = windows.splitlines()
    start = START.match(lines[-1]) if lines else None
    if start is None:
        return None
    seconds = 0
    for line in reversed(up_log.splitlines()):
        # The log holds every window's lines: the last elapsed stamp after the last window's
        # first line, or 0 s if it printed none.
        match = ELAPSED.match(line)
        if match:
            hours, minutes, secs = map(int, match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
            break
        if UP_START.match(line):
            break
    hours, minutes, secs = map(int, start.groups())
    at = (datetime.datetime(2000, 1, 1, hours, minutes, secs)
          + datetime.timedelta(seconds=seconds)).strftime("%H:%M:%S")
    return f"machine lost at {at} after {seconds} s (up did not end; its log's last line)"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: lost_window.py WINDOWS_TXT UP_LOG", file=sys.stderr)
        return 2
    windows, up_log = map(Path, argv)
    if not windows.exists():
        return 0
    log = up_log.read_text(errors="replace") if up_log.exists() else ""
    line = lost_line(windows.read_text(), log)
    if line is not None:
        with windows.open("a") as out:
            out.write(line + "\n")
        print(f"the last window's machine was lost: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
