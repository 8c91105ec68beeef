"""What a study looks like to a person: one row per trial, the counts by outcome, the best so far.

``status``, ``up`` (its live line and final table) and ``export`` all read a study through
``trials.py`` (the record, the outcome, feasibility, the best trial), so they never disagree
about what "gate-failed" means or which trial is best.
"""

from __future__ import annotations

import datetime as dt
import os
import textwrap
from typing import Any

import optuna
from tqdm import tqdm

from nkat_search.errors import UserError
from nkat_search.search import trials as trial_record
from nkat_search.search import optuna_private
from nkat_search.search.coordinator import budget_state, load_study_spec_from_storage
from nkat_search.search.spec import HeartbeatSpec
from nkat_search.search.storage import open_storage
from nkat_search.search.storage_url import SQLITE_SCHEME, mask_url, sqlite_path
from nkat_search.search.trials import LIVE, OUTCOMES, TrialRecord

# Counted in this order in the summary line and in ``status --json``.
COUNTED = OUTCOMES + LIVE
# Always shown in the summary line; the others only when there are some.
ALWAYS_SHOWN = ("complete", "pruned", "gate_failed", "failed")


def open_study(storage_url: str, study_name: str):
    """Load ``study_name`` from the storage at ``storage_url``; an unknown name lists the others."""
    storage = open_storage_for_reading(storage_url)
    names = optuna.study.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(sorted(names)) if names else "none"
        raise UserError(f"no study named '{study_name}' in {mask_url(storage_url)}; "
                        f"studies there: {known}")
    return optuna.load_study(study_name=study_name, storage=storage)


def only_study(db: str | os.PathLike) -> optuna.Study:
    """The one study in a SQLite file: what the benchmarks read from a finished study's file."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (name,) = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def open_storage_for_reading(storage_url: str, **kwargs):
    """The project's storage for a URL; a SQLite file that does not exist is an error, not a new DB.

    SQLAlchemy creates a missing SQLite file on connect, so a typo in the path would otherwise
    show an empty storage instead of saying what is wrong.
    """
    if storage_url.startswith(SQLITE_SCHEME + "://"):
        path = sqlite_path(storage_url)
        if path is not None and path.is_dir():
            raise UserError(f"storage {storage_url}: {path} is a folder; name the study's SQLite "
                            "file (up keeps study S in runs/S.db)")
        if path is not None and not path.is_file():
            raise UserError(f"storage {storage_url}: the SQLite file {path} does not exist")
    return open_storage(storage_url, **kwargs)


def trial_rows(trials, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One plain dict per trial (JSON-ready), in trial-number order."""
    now = now or dt.datetime.now()
    trials = sorted(trials, key=lambda t: t.number)
    retry_of = trial_record.retry_trials(trials)
    rows = []
    for t in trials:
        record = TrialRecord.of(t)
        retry = retry_of.get(t.number)
        kind = trial_record.outcome(t)
        local_tpe = record.local_tpe
        if local_tpe is None and t.intermediate_values:
            # A running trial has no final Local TPE yet: show the last one reported to the pruner.
            local_tpe = t.intermediate_values[max(t.intermediate_values)]
        if t.datetime_start is None:
            seconds = None
        else:
            seconds = ((t.datetime_complete or now) - t.datetime_start).total_seconds()
        rows.append({
            "number": t.number,
            "state": t.state.name.lower(),
            "outcome": kind,
            "value": t.value if kind == "complete" else None,
            "global_tpe": record.global_tpe,
            "local_tpe": local_tpe,
            "lambda": record.lam,
            "consistency": record.consistency,
            "robustness": record.robustness,
            "feasible": trial_record.feasible(t),
            "reason": trial_record.stop_reason(t, retry),
            "datasets": {name: score.to_dict() for name, score in record.datasets.items()},
            "missing_datasets": record.missing_datasets,
            "epochs": len(t.intermediate_values),
            "progress": {"stage": record.stage, "dataset": record.dataset, "epoch": record.epoch},
            "duration_s": seconds,
            "timings": record.timings,
            "worker": record.worker,
            "error": record.error,
            "retry_of": t.system_attrs.get("failed_trial"),  # set before a retry starts
            "retried_by": retry.number if retry is not None else None,
            "started": t.datetime_start.isoformat() if t.datetime_start else None,
            "params": dict(t.params),
            "config_epochs": (record.config or {}).get("epochs"),
        })
    return rows


def mark_silent(study, trials, rows: list[dict[str, Any]]) -> None:
    """Each running row gets ``heartbeat_age_s`` (seconds since its worker's last heartbeat, None
    if it never beat), the study's ``heartbeat_grace_s`` and ``silent``: older than the grace,
    i.e. its worker is gone (a lost machine, a killed process) and a worker will fail it and
    queue a retry when it next looks for stale trials."""
    if not any(row["outcome"] == "running" for row in rows):
        return
    storage = optuna_private.backend(optuna_private.study_storage(study))
    if not hasattr(storage, "scoped_session"):  # not an RDB storage: no heartbeats to read
        return
    try:
        grace = load_study_spec_from_storage(storage, study.study_name).heartbeat.grace
    except UserError:  # a study not made by nkat-search: the default study file's grace
        grace = HeartbeatSpec().grace
    ages = optuna_private.heartbeat_ages(storage, optuna_private.study_id(study))
    numbers = {optuna_private.trial_id(t): t.number for t in trials}
    # A trial that started after ``trials`` were read is not among the rows.
    by_number = {numbers[trial_id]: age for trial_id, age in ages.items() if trial_id in numbers}
    for row in rows:
        if row["outcome"] == "running":
            row["heartbeat_age_s"] = by_number.get(row["number"])
            row["heartbeat_grace_s"] = grace
            row["silent"] = (row["heartbeat_age_s"] or 0.0) > grace


def describe_silent(rows: list[dict[str, Any]]) -> str | None:
    """One line for people about running trials whose workers are gone, or None."""
    silent = [row for row in rows if row.get("silent")]
    if not silent:
        return None
    numbers = ", ".join(str(row["number"]) for row in silent)
    return (f"{len(silent)} running trial(s) ({numbers}) sent no heartbeat for longer than the "
            f"study's grace ({format_duration(silent[0]['heartbeat_grace_s'])}): their workers "
            "are gone (a lost machine or a killed process). The next worker to start fails them "
            "and queues a retry of each (it trains from epoch 0 unless its checkpoint is on that "
            "machine).")


def budget_text(budget: dict[str, Any]) -> str:
    """``3 of 10 trials started, 1 queued``: the budget as trials that ran, not as queue entries."""
    text = f"{budget['started']} of {budget['budget']} trials started"
    return text + (f", {budget['queued']} queued" if budget.get("queued") else "")


def describe_lost(lost: list[dict]) -> str:
    """One line for people: which configurations ended without a result, and why."""
    parts = [f"trial {c['trial']} ({c['attempts']} attempt{'s' if c['attempts'] > 1 else ''}; "
             f"last: {str(c['error']).splitlines()[0][:160]})" for c in lost]
    return (f"{len(lost)} configuration(s) ended without a result, every attempt failed and no "
            f"retry is left: {'; '.join(parts)}")


def summarize(rows: list[dict[str, Any]], best=None) -> dict[str, Any]:
    """Counts per outcome and the best trial (``trials.best``: feasible first, see there)."""
    counts = {name: 0 for name in COUNTED}
    for row in rows:
        counts[row["outcome"]] += 1
    return {
        **counts,
        "total": len(rows),
        "best_value": best.trial.value if best else None,
        "best_trial": best.trial.number if best else None,
        "best_feasible": best.feasible if best else None,
    }


def summary_line(summary: dict[str, Any]) -> str:
    """``3 complete, 1 pruned, 2 gate-failed, 0 failed, 2 running | best Global TPE 0.7123 (trial 4)``."""
    parts = [f"{summary[name]} {name.replace('_', '-')}" for name in COUNTED
             if name in ALWAYS_SHOWN or summary[name]]
    return f"{', '.join(parts)} | {best_text(summary)}"


def best_text(summary: dict[str, Any], short: bool = False) -> str:
    """``best Global TPE 0.7123 (trial 4)``; ``short``: ``best 0.7123 (#4)`` for a progress bar."""
    if summary["best_value"] is None:
        return "best -" if short else f"best {trial_record.METRIC_NAME} -"
    if short:
        flag = ", infeasible" if not summary["best_feasible"] else ""
        return f"best {summary['best_value']:.4f} (#{summary['best_trial']}{flag})"
    text = (f"best {trial_record.METRIC_NAME} {summary['best_value']:.4f} "
            f"(trial {summary['best_trial']}")
    if not summary["best_feasible"]:
        text += ", infeasible: no complete trial meets the constraints yet"
    return text + ")"


# Narrowest the "why it stopped" column gets before other columns are hidden to make room.
WHY_MIN = 28
# Hidden first when a table is wider than the terminal: the columns a person needs least to tell
# the trials apart (``--wide`` and ``--json`` still have them).
HIDE_ORDER = ("time", "lambda", "acc mnist", "acc fashion_mnist", "acc emnist", "acc cifar10")
WHY_TITLE = "why it stopped / what it is doing"


def format_table(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """The trials as a person compares them: results and why each stopped, then the parameters.

    The results table has one accuracy column per dataset that ran anywhere; the parameter table
    only the searched parameters whose values differ between trials. With ``width`` (a terminal's
    columns) no line is longer: the "why" column is shortened, then the least needed columns
    (``HIDE_ORDER``) and parameters are left out, and a last line says which; a terminal never
    wraps a row onto two lines. ``width=None`` (a pipe, a file, ``--wide``) shows everything.
    """
    datasets = sorted({name for r in rows for name in r["datasets"]},
                      key=lambda n: (n != trial_record.STAGE1_DATASET, n))
    columns = [("trial", ">", lambda r: str(r["number"])),
               ("outcome", "<", lambda r: r["outcome"]),
               ("lambda", ">", lambda r: _num(r["lambda"]))]
    columns += [(f"acc {name}", ">", lambda r, n=name: _num((r["datasets"].get(n) or {}).get(
        "accuracy"))) for name in datasets]
    columns += [("LocalTPE", ">", lambda r: _num(r["local_tpe"])),
                ("GlobalTPE", ">", lambda r: _num(r["value"])),
                ("feasible", "<", lambda r: {True: "yes", False: "no", None: "-"}[r["feasible"]]),
                ("time", ">", lambda r: format_duration(r["duration_s"])),
                (WHY_TITLE, "<", _why)]
    hidden: list[str] = []
    if width is not None:
        columns, hidden = _fit(columns, rows, width)
    lines = _grid(columns, rows, width)
    missing = sorted({name for r in rows for name in r["missing_datasets"]})
    if missing:
        # A Global TPE over three datasets must never pass for one over four.
        lines.append(f"missing datasets, not in Global TPE: {', '.join(missing)} "
                     "(their files were not found; see --data-dir)")
    names = list(dict.fromkeys(name for r in rows for name in r["params"]))
    differ = [n for n in names if len({repr(r["params"].get(n)) for r in rows if r["params"]}) > 1]
    if differ:
        lines += ["", "searched parameters that differ:"]
        param_columns = [("trial", ">", lambda r: str(r["number"]))]
        param_columns += [(n, ">", lambda r, n=n: _value(r["params"].get(n))) for n in differ]
        with_params = [r for r in rows if r["params"]]
        if width is not None:
            # Parameters in the study's order until the line is full.
            cells = _widths(param_columns, with_params)
            used, keep = -2, 0
            for w in cells:
                if used + 2 + w > width and keep > 1:
                    break
                used, keep = used + 2 + w, keep + 1
            hidden += [title for title, _, _ in param_columns[keep:]]
            param_columns = param_columns[:keep]
        lines += _grid(param_columns, with_params, width)
    if hidden:
        lines += wrap(f"hidden to fit {width} columns: {', '.join(hidden)} (--wide shows them)",
                      width).splitlines()
    return "\n".join(lines)


def _fit(columns, rows, width: int):
    """(the columns that fit in ``width`` with the "why" column at least ``WHY_MIN``, hidden)."""
    hidden = []

    def needed(cols) -> int:
        fixed = [w for (title, _, _), w in zip(cols, _widths(cols, rows)) if title != WHY_TITLE]
        return sum(fixed) + 2 * len(fixed) + WHY_MIN

    for title in HIDE_ORDER:
        if needed(columns) <= width:
            break
        if any(c[0] == title for c in columns):
            columns = [c for c in columns if c[0] != title]
            hidden.append(title)
    return columns, hidden


def _widths(columns, rows) -> list[int]:
    return [max([len(title)] + [len(get(r)) for r in rows]) for title, _, get in columns]


def wrap(text: str, width: int | None) -> str:
    """A line of prose wrapped at word boundaries to ``width`` (as is for ``None``)."""
    if width is None or len(text) <= width:
        return text
    return textwrap.fill(text, width, break_on_hyphens=False, subsequent_indent="  ")


def _shorten(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[:max(width - 3, 0)] + "..."


def _why(row: dict[str, Any]) -> str:
    if row["outcome"] == "running":
        if row.get("silent"):
            return (f"no heartbeat for {format_duration(row['heartbeat_age_s'])}, worker gone; "
                    f"last: {progress_text(row) or 'starting'}")
        return progress_text(row) or "starting"
    if row["outcome"] == "waiting":
        return f"queued (retry of trial {row['retry_of']})" if row["retry_of"] is not None \
            else "queued"
    return row["reason"] or ""


def progress_text(row: dict[str, Any]) -> str:
    """``stage 1 cifar10 epoch 2/3 Local TPE 4.1234`` for a running trial ('' before epoch 0)."""
    progress = row["progress"]
    if progress["stage"] is None:
        return ""
    text = f"stage {progress['stage']} {progress['dataset']} epoch {progress['epoch']}"
    if row.get("config_epochs"):
        text += f"/{row['config_epochs']}"
    if progress["stage"] == 1 and row["local_tpe"] is not None and progress["epoch"]:
        text += f" Local TPE {row['local_tpe']:.4f}"
    return text


def _grid(columns, rows, width: int | None = None) -> list[str]:
    cells = [[get(r) for _, _, get in columns] for r in rows]
    widths = _widths(columns, rows)
    if width is not None and columns[-1][0] == WHY_TITLE:
        # The last column takes what is left of the line; longer texts end in "...".
        room = max(width - sum(widths[:-1]) - 2 * (len(widths) - 1), 8)
        widths[-1] = min(widths[-1], room)
        cells = [row[:-1] + [_shorten(row[-1], room)] for row in cells]

    def line(values) -> str:
        out = [f"{v:{align}{w}}" for v, (_, align, _), w in zip(values, columns, widths)]
        return "  ".join(out).rstrip()

    header = _shorten(line([title for title, _, _ in columns]), width)
    return [header, "-" * len(header)] + [line(row) for row in cells]


def study_report(study, heartbeats: bool = False) -> dict[str, Any]:
    """Everything ``status --json`` prints: the study's identity, budget, summary and rows.
    ``heartbeats``: the running rows say whether their worker is gone (``mark_silent``: one more
    query and the stored study file read; ``status`` asks for it, up's live view, which refreshes
    every few seconds and does not show it, does not)."""
    trials = study.get_trials(deepcopy=False)
    rows = trial_rows(trials)
    if heartbeats:
        mark_silent(study, trials, rows)
    attrs = study.user_attrs
    try:
        budget = budget_state(study)
    except UserError:  # a study not made by nkat-search: no stored budget
        budget = None
    return {
        "study": study.study_name,
        "direction": "maximize" if trial_record.maximizes(study) else "minimize",
        "metric": trial_record.METRIC_NAME,
        "study_file_name": attrs.get("study_file_name"),
        "study_file_hash": attrs.get("study_file_hash"),
        "search_hash": attrs.get("search_hash"),
        "budget": budget,
        "summary": summarize(rows, trial_record.best(study)),
        "trials": rows,
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# ---- the live view of a running study (``up``) ----------------------------------------------


def finished_count(rows: list[dict[str, Any]]) -> int:
    """Configurations that are done: ended, and not continued by a retry."""
    ended = ("complete", "pruned", "gate_failed", "failed", "interrupted")
    return sum(1 for r in rows if r["outcome"] in ended and r["retried_by"] is None)


def running_text(rows: list[dict[str, Any]], level: int = 0) -> str:
    """``#3 stage 1 cifar10 epoch 2/3 Local TPE 4.1234; #4 starting``, or 'none running'.

    ``level`` shortens it for a narrow line: 1 ``#3 cifar10 2/3 4.1234``, 2 ``#3 2/3``,
    3 ``2 running``.
    """
    running = [r for r in rows if r["outcome"] == "running"]
    if not running:
        return "none running"
    if level >= 3:
        return f"{len(running)} running"
    return "; ".join(f"#{r['number']} {_progress_short(r, level) or 'starting'}" for r in running)


def _progress_short(row: dict[str, Any], level: int) -> str:
    if level == 0:
        return progress_text(row)
    progress = row["progress"]
    if progress["stage"] is None:
        return ""
    text = f"{progress['epoch']}" + (f"/{row['config_epochs']}" if row.get("config_epochs") else "")
    if level == 2:
        return text
    text = f"{progress['dataset']} {text}"
    if progress["stage"] == 1 and row["local_tpe"] is not None and progress["epoch"]:
        text += f" {row['local_tpe']:.4f}"
    return text


def bar_postfix(report: dict[str, Any], room: int) -> str:
    """The running trials and the best so far in at most ``room`` characters (maybe '').

    The running trials' detail is shortened first (``running_text`` levels), then the best goes.
    """
    best = best_text(report["summary"], short=True)
    for level in range(4):
        text = f"{running_text(report['trials'], level)} | {best}"
        if len(text) <= room:
            return text
    for text in (best, running_text(report["trials"], 3)):
        if len(text) <= room:
            return text
    return ""


class _StudyBar(tqdm):
    """tqdm with one more field for its format, ``{left}``, set before each draw."""

    left = "?"

    @property
    def format_dict(self):
        return {**super().format_dict, "left": self.left}


class LiveBar:
    """``up``'s progress bar on a terminal: one line that fits the terminal however wide it is.

    The bar itself gets what the counts, the times and the text leave, at least ``MIN_BAR``
    characters; the text (running trials, best so far) shrinks first (``bar_postfix``). The width
    is read at every update, so a resized terminal gets a line of its new width.
    """

    MIN_BAR = 10
    # {left}: the study's own estimate (eta_seconds), not tqdm's rate since this run started.
    FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{left}{postfix}"

    def __init__(self, name: str, stream):
        self.name = name
        self.stream = stream
        self.bar = None

    def columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            return 80

    def update(self, report: dict[str, Any], done: int, budget: int) -> None:
        if self.bar is None:
            self.bar = _StudyBar(total=budget, initial=done, unit="trial", dynamic_ncols=True,
                                 desc=self.name, file=self.stream, bar_format=self.FORMAT)
        self.bar.total = budget
        eta = eta_seconds(report["trials"], budget)
        self.bar.left = "?" if eta is None else format_duration(eta)
        # Everything but the bar and the text, at its longest ("1:02:03<1:02:03"), and tqdm
        # draws one column less than the terminal's so the cursor never wraps.
        fixed = len(f"{self.name} {budget}/{budget} || 00:00:00<00:00:00, ") + 1
        room = self.columns() - fixed - self.MIN_BAR
        self.bar.set_postfix_str(bar_postfix(report, room), refresh=False)
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)
        else:
            self.bar.refresh()

    def write(self, message: str) -> None:
        if self.bar is None:
            print(message, file=self.stream, flush=True)
        else:
            self.bar.write(message, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def busy_seconds(rows: list[dict[str, Any]]) -> float:
    """Wall seconds during which at least one trial ran: the union of their start-to-end spans.

    Gaps between runs of ``up`` (a study resumed the next day) are left out, so a resumed study's
    history counts from its first line.
    """
    spans = sorted((start, start + r["duration_s"]) for r in rows
                   if r["started"] and r["duration_s"] is not None
                   for start in [dt.datetime.fromisoformat(r["started"]).timestamp()])
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def eta_seconds(rows: list[dict[str, Any]], budget: int) -> float | None:
    """Time left at the rate the study has finished trials while any ran (None before one).

    The whole history, earlier runs of ``up`` included: a rate over this run alone swung from 1h13m
    to 19m in 20 s on round2_aug's second window, as one long trial or three short ones ended.
    Later trials of a TPE search pass the gate more often and run longer, so this errs short.
    """
    done = finished_count(rows)
    busy = busy_seconds(rows)
    if done <= 0 or busy <= 0:
        return None
    return max(0, budget - done) * busy / done


def live_line(report: dict[str, Any]) -> str:
    """``3/8 trials done (2 complete, 1 gate-failed) | running: ... | best ... | ETA 2m10s``."""
    rows = report["trials"]
    summary = report["summary"]
    done = finished_count(rows)
    budget = report["budget"]["budget"] if report["budget"] else summary["total"]
    counts = ", ".join(f"{summary[name]} {name.replace('_', '-')}" for name in OUTCOMES
                       if summary[name])
    eta = eta_seconds(rows, budget)
    left = ("ETA after the first trial" if eta is None and done < budget
            else f"about {format_duration(eta)} left" if done < budget else "budget spent")
    return (f"{done}/{budget} trials done" + (f" ({counts})" if counts else "")
            + f" | {running_text(rows)} | {best_text(summary)} | {left}")
