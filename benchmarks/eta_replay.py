"""Replay a recorded study's history: what ``up``'s time left said, minute by minute, in one run.

    python benchmarks/eta_replay.py results/round2/nkat-round2-aug/nkat-round2-aug.db \
        --first-trial 18 [--step 60] [--out results/eta_replay_round2_aug.json]

From the first start of trial ``--first-trial`` (the run of ``up`` to replay) the trials are cut
at each moment as the database stood then: started ones, finished or running. Beside each moment,
the estimate ``up`` prints now (``report.eta_seconds``: the whole study's busy time per finished
trial) and the one it printed before (the rate of the trials finished since this run began).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.atomic import write_text_atomic  # noqa: E402
from nkat_search.search.report import eta_seconds, only_study  # noqa: E402


def rows_at(trials: list[optuna.trial.FrozenTrial], now: dt.datetime) -> list[dict]:
    rows = []
    for trial in trials:
        if trial.datetime_start is None or trial.datetime_start > now:
            continue
        ended = trial.datetime_complete is not None and trial.datetime_complete <= now
        end = trial.datetime_complete if ended else now
        rows.append({"started": trial.datetime_start.isoformat(), "retried_by": None,
                     "duration_s": (end - trial.datetime_start).total_seconds(),
                     "outcome": "complete" if ended else "running"})
    return rows


def replay(trials: list[optuna.trial.FrozenTrial], budget: int, first_trial: int,
           step_s: float) -> list[dict]:
    run = [t for t in trials if t.number >= first_trial and t.datetime_start is not None]
    start = min(t.datetime_start for t in run)
    end = max(t.datetime_complete or t.datetime_start for t in run)
    done_before = sum(t.datetime_complete is not None and t.datetime_complete <= start
                      for t in trials)
    points, k = [], 1
    while start + dt.timedelta(seconds=step_s * k) <= end:
        now = start + dt.timedelta(seconds=step_s * k)
        rows = rows_at(trials, now)
        done = sum(r["outcome"] != "running" for r in rows)
        elapsed = (now - start).total_seconds()
        since = done - done_before
        points.append({"elapsed_s": elapsed, "done": done,
                       "eta_s": eta_seconds(rows, budget),
                       "eta_this_run_only_s": (budget - done) * elapsed / since if since else None})
        k += 1
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db")
    parser.add_argument("--first-trial", type=int, default=0,
                        help="the first trial of the run of up to replay")
    parser.add_argument("--step", type=float, default=60.0, help="seconds between moments")
    parser.add_argument("--out", help="JSON to write (default: print)")
    args = parser.parse_args()
    study = only_study(args.db)
    budget = study.user_attrs["n_trials"]
    trials = study.get_trials(deepcopy=False)
    result = {"study": study.study_name, "budget": budget, "first_trial": args.first_trial,
              "points": replay(trials, budget, args.first_trial, args.step)}
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        write_text_atomic(Path(args.out), text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
