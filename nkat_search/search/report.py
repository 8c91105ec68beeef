"""What a study looks like to a person: one row per trial, the counts by outcome, the best so far.

``status``, ``up`` (its live line and final table) and ``export`` all read a study through
``trial_rows`` and ``summarize``, so the three never disagree about what "gate-failed" means.
The names of the trial attributes are the ones in docs/CONTRACTS.md.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from nkat_search.errors import UserError

# Counted in this order in the summary line and in ``status --json``.
OUTCOMES = ("complete", "pruned", "gate_failed", "failed", "running", "waiting")


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


def open_storage_for_reading(storage_url: str):
    """The project's storage for a URL; a SQLite file that does not exist is an error, not a new DB.

    SQLAlchemy creates a missing SQLite file on connect, so a typo in the path would otherwise
    show an empty storage instead of saying what is wrong.
    """
    from nkat_search.search.storage import SQLITE_SCHEME, open_storage, sqlite_path

    if storage_url.startswith(SQLITE_SCHEME + "://"):
        path = sqlite_path(storage_url)
        if path is not None and not path.is_file():
            raise UserError(f"storage {storage_url}: the SQLite file {path} does not exist")
    return open_storage(storage_url)


def classify(trial) -> str:
    """One of OUTCOMES for a FrozenTrial; a gate failure is a PRUNED trial marked by the objective."""
    from optuna.trial import TrialState

    state = trial.state
    if state == TrialState.COMPLETE:
        return "complete"
    if state == TrialState.PRUNED:
        return "gate_failed" if trial.user_attrs.get("outcome") == "gate_failed" else "pruned"
    if state == TrialState.FAIL:
        return "failed"
    if state == TrialState.RUNNING:
        return "running"
    return "waiting"


def trial_rows(trials, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One plain dict per trial (JSON-ready), in trial-number order."""
    now = now or dt.datetime.now()
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        attrs = t.user_attrs
        kind = classify(t)
        local_tpe = attrs.get("local_tpe")
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
            "kind": kind,
            "outcome": attrs.get("outcome"),
            "value": t.value if kind == "complete" else None,
            "global_tpe": attrs.get("global_tpe"),
            "local_tpe": local_tpe,
            "lambda": attrs.get("lambda"),
            "epochs": len(t.intermediate_values),
            "duration_s": seconds,
            "worker": attrs.get("worker"),
            "error": attrs.get("error"),
            "missing_datasets": list(attrs.get("missing_datasets") or []),
            "started": t.datetime_start.isoformat() if t.datetime_start else None,
            "params": dict(t.params),
        })
    return rows


def summarize(rows: list[dict[str, Any]], maximize: bool = True) -> dict[str, Any]:
    """Counts per outcome and the best complete trial (by value, Global TPE for these studies)."""
    counts = {name: 0 for name in OUTCOMES}
    for row in rows:
        counts[row["kind"]] += 1
    scored = [r for r in rows if r["kind"] == "complete" and r["value"] is not None]
    best = None
    if scored:
        best = (max if maximize else min)(scored, key=lambda r: r["value"])
    return {
        **counts,
        "total": len(rows),
        "best_value": best["value"] if best else None,
        "best_trial": best["number"] if best else None,
    }


def summary_line(summary: dict[str, Any]) -> str:
    """``3 complete, 1 pruned, 2 gate-failed, 0 failed, 2 running | best Global TPE 0.7123 (#4)``."""
    parts = [f"{summary[name]} {name.replace('_', '-')}" for name in OUTCOMES[:-1]]
    if summary["waiting"]:
        parts.append(f"{summary['waiting']} waiting")
    if summary["best_value"] is None:
        best = "best Global TPE -"
    else:
        best = f"best Global TPE {summary['best_value']:.4f} (trial {summary['best_trial']})"
    return f"{', '.join(parts)} | {best}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the trials; failed trials get their error's first line below it."""
    header = (f"{'trial':>5}  {'state':<8}  {'outcome':<11}  {'GlobalTPE':>9}  {'LocalTPE':>8}  "
              f"{'lambda':>7}  {'epochs':>6}  {'duration':>8}  worker")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['number']:>5}  {r['state']:<8}  {r['outcome'] or '-':<11}  "
            f"{_num(r['value']):>9}  {_num(r['local_tpe']):>8}  {_num(r['lambda']):>7}  "
            f"{r['epochs']:>6}  {format_duration(r['duration_s']):>8}  {r['worker'] or '-'}"
        )
    for r in rows:
        if r["kind"] == "failed" and r["error"]:
            lines.append(f"trial {r['number']} failed: {str(r['error']).strip().splitlines()[-1]}")
    missing = sorted({name for r in rows for name in r["missing_datasets"]})
    if missing:
        # A Global TPE over three datasets must never pass for one over four.
        lines.append(f"missing datasets, not in Global TPE: {', '.join(missing)} "
                     "(their files were not found; see --data-dir)")
    return "\n".join(lines)


def study_report(study) -> dict[str, Any]:
    """Everything ``status --json`` prints: the study's identity, the summary and the rows."""
    import optuna

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = trial_rows(study.get_trials(deepcopy=False))
    attrs = study.user_attrs
    return {
        "study": study.study_name,
        "direction": "maximize" if maximize else "minimize",
        "study_file_name": attrs.get("study_file_name"),
        "study_file_hash": attrs.get("study_file_hash"),
        "summary": summarize(rows, maximize),
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
