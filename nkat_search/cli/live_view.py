"""``up``'s live view of a study while its workers run: a tqdm bar on a terminal, else lines."""

from __future__ import annotations

import sys
import time

from nkat_search.terminal import draws_bars


class LiveView:
    """``up``'s live view: a tqdm bar on a terminal, else a line per change.

    Budget done, the running trials' stage, dataset, epoch and Local TPE, the best so far and the
    time left at the rate the study has finished trials (``report.eta_seconds``).
    """

    def __init__(self, study_name: str):
        self.study_name = study_name
        self.use_bar = draws_bars(sys.stdout)  # decided once: a resize does not switch views
        self.bar = None
        self.started = time.monotonic()
        self.last, self.last_printed = None, 0.0

    def say(self, message: str) -> None:
        # Through the bar on a terminal, so a message never lands on the bar's line.
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def show(self, report: dict) -> None:
        """``report`` (``study_report``) on the bar, or as a line if it says something new."""
        # optuna: not for --help.
        from nkat_search.search.report import LiveBar, finished_count, live_line

        done = finished_count(report["trials"])
        elapsed = time.monotonic() - self.started
        if self.use_bar:
            if self.bar is None:
                self.bar = LiveBar(self.study_name, sys.stdout)
            self.bar.update(report, done, report["budget"]["budget"] if report["budget"] else done)
            return
        # A line when something but the time left changed, or once a minute.
        line = live_line(report)
        news = line.rsplit(" | ", 1)[0]
        if news != self.last or elapsed - self.last_printed >= 60:
            print(f"[{format_elapsed(elapsed)}] {line}", flush=True)
            self.last, self.last_printed = news, elapsed

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
