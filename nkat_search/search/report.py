"""What a study looks like to a person: one row per trial, the counts by outcome, the best so far.

``status``, ``up`` (its live line and final table) and ``export`` all read a study through
``trials.py`` (the record, the outcome, feasibility, the best trial), so they never disagree
about what "gate-failed" means or which trial is best.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from nkat_search.errors import UserError
from nkat_search.search import trials as record_of
from nkat_search.search.trials import LIVE, OUTCOMES, TrialRecord

# Counted in this order in the summary line and in ``status --json``.
COUNTED = OUTCOMES + LIVE
# Always shown in the summary line; the others only when there are some.
ALWAYS_SHOWN = ("complete", "pruned", "gate_failed", "failed")


def open_study(storage_url: str, study_name: str):
    """Load ``study_name`` from the storage at ``storage_url``; an unknown name lists the others."""
    import optuna

    from nkat_search.search.storage import mask_url

    storage = open_storage_for_reading(storage_url)
    names = optuna.study.get_all_study_names(storage)
    if study_name not in names:
        known = ", ".join(sorted(names)) if names else "none"
        raise UserError(f"no study named '{study_name}' in {mask_url(storage_url)}; "
                        f"studies there: {known}")
    return optuna.load_study(study_name=study_name, storage=storage)


def open_storage_for_reading(storage_url: str, **kwargs):
    """The project's storage for a URL; a SQLite file that does not exist is an error, not a new DB.

    SQLAlchemy creates a missing SQLite file on connect, so a typo in the path would otherwise
    show an empty storage instead of saying what is wrong.
    """
    from nkat_search.search.storage import SQLITE_SCHEME, open_storage, sqlite_path

    if storage_url.startswith(SQLITE_SCHEME + "://"):
        path = sqlite_path(storage_url)
        if path is not None and not path.is_file():
            raise UserError(f"storage {storage_url}: the SQLite file {path} does not exist")
    return open_storage(storage_url, **kwargs)


def trial_rows(trials, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One plain dict per trial (JSON-ready), in trial-number order."""
    now = now or dt.datetime.now()
    trials = sorted(trials, key=lambda t: t.number)
    retried_by = record_of.retries(trials)
    rows = []
    for t in trials:
        record = TrialRecord.of(t)
        kind = record_of.outcome(t)
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
            "feasible": record_of.feasible(t),
            "reason": record_of.stop_reason(t, retried_by.get(t.number)),
            "datasets": {name: score.to_dict() for name, score in record.datasets.items()},
            "missing_datasets": record.missing_datasets,
            "epochs": len(t.intermediate_values),
            "progress": {"stage": record.stage, "dataset": record.dataset, "epoch": record.epoch},
            "duration_s": seconds,
            "timings": record.timings,
            "worker": record.worker,
            "error": record.error,
            "retry_of": t.system_attrs.get("failed_trial"),  # set before a retry starts
            "retried_by": retried_by.get(t.number),
            "started": t.datetime_start.isoformat() if t.datetime_start else None,
            "params": dict(t.params),
            "config_epochs": (record.config or {}).get("epochs"),
        })
    return rows


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
        return "best -" if short else f"best {record_of.METRIC_NAME} -"
    if short:
        flag = ", infeasible" if not summary["best_feasible"] else ""
        return f"best {summary['best_value']:.4f} (#{summary['best_trial']}{flag})"
    text = f"best {record_of.METRIC_NAME} {summary['best_value']:.4f} (trial {summary['best_trial']}"
    if not summary["best_feasible"]:
        text += ", infeasible: no complete trial meets the constraints yet"
    return text + ")"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The trials as a person compares them: results and why each stopped, then the parameters.

    The results table has one accuracy column per dataset that ran anywhere; the parameter table
    only the searched parameters whose values differ between trials.
    """
    datasets = sorted({name for r in rows for name in r["datasets"]},
                      key=lambda n: (n != record_of.STAGE1_DATASET, n))
    columns = [("trial", ">", lambda r: str(r["number"])),
               ("outcome", "<", lambda r: r["outcome"]),
               ("lambda", ">", lambda r: _num(r["lambda"]))]
    columns += [(f"acc {name}", ">", lambda r, n=name: _num((r["datasets"].get(n) or {}).get(
        "accuracy"))) for name in datasets]
    columns += [("LocalTPE", ">", lambda r: _num(r["local_tpe"])),
                ("GlobalTPE", ">", lambda r: _num(r["value"])),
                ("feasible", "<", lambda r: {True: "yes", False: "no", None: "-"}[r["feasible"]]),
                ("time", ">", lambda r: format_duration(r["duration_s"])),
                ("why it stopped / what it is doing", "<", _why)]
    lines = _grid(columns, rows)
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
        lines += _grid(param_columns, [r for r in rows if r["params"]])
    return "\n".join(lines)


def _why(row: dict[str, Any]) -> str:
    if row["outcome"] == "running":
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


def _grid(columns, rows) -> list[str]:
    cells = [[get(r) for _, _, get in columns] for r in rows]
    widths = [max([len(title)] + [len(row[i]) for row in cells])
              for i, (title, _, _) in enumerate(columns)]

    def line(values) -> str:
        out = [f"{v:{align}{w}}" for v, (_, align, _), w in zip(values, columns, widths)]
        return "  ".join(out).rstrip()

    header = line([title for title, _, _ in columns])
    return [header, "-" * len(header)] + [line(row) for row in cells]


def study_report(study) -> dict[str, Any]:
    """Everything ``status --json`` prints: the study's identity, budget, summary and rows."""
    from nkat_search.search.coordinator import budget_state

    rows = trial_rows(study.get_trials(deepcopy=False))
    attrs = study.user_attrs
    try:
        budget = budget_state(study)
    except UserError:  # a study not made by nkat-search: no stored budget
        budget = None
    return {
        "study": study.study_name,
        "direction": "maximize" if record_of.maximizes(study) else "minimize",
        "metric": record_of.METRIC_NAME,
        "study_file_name": attrs.get("study_file_name"),
        "study_file_hash": attrs.get("study_file_hash"),
        "search_hash": attrs.get("search_hash"),
        "budget": budget,
        "summary": summarize(rows, record_of.best(study)),
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


def running_text(rows: list[dict[str, Any]]) -> str:
    """``#3 stage 1 cifar10 epoch 2/3 Local TPE 4.1234; #4 starting``, or 'none running'."""
    running = [f"#{r['number']} {progress_text(r) or 'starting'}" for r in rows
               if r["outcome"] == "running"]
    return "; ".join(running) if running else "none running"


def eta_seconds(done_now: int, done_before: int, budget: int, elapsed_s: float) -> float | None:
    """Time left at the rate of the trials finished since the watch began (None before one)."""
    finished_here = done_now - done_before
    if finished_here <= 0 or elapsed_s <= 0:
        return None
    return max(0, budget - done_now) * elapsed_s / finished_here


def live_line(report: dict[str, Any], done_before: int, elapsed_s: float) -> str:
    """``3/8 trials done (2 complete, 1 gate-failed) | running: ... | best ... | ETA 2m10s``."""
    rows = report["trials"]
    summary = report["summary"]
    done = finished_count(rows)
    budget = report["budget"]["budget"] if report["budget"] else summary["total"]
    counts = ", ".join(f"{summary[name]} {name.replace('_', '-')}" for name in OUTCOMES
                       if summary[name])
    eta = eta_seconds(done, done_before, budget, elapsed_s)
    left = ("ETA after the first trial" if eta is None and done < budget
            else f"about {format_duration(eta)} left" if done < budget else "budget spent")
    return (f"{done}/{budget} trials done" + (f" ({counts})" if counts else "")
            + f" | {running_text(rows)} | {best_text(summary)} | {left}")
