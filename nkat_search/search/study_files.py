"""A study as files to look at without the dashboard: Optuna's plots as PNG and a trials CSV.

``export`` and ``up`` write these next to the best-trial configs. The plots are Optuna's own
(``optuna.visualization.matplotlib``, drawn headless by matplotlib's Agg backend) but for the
learning curves, drawn here coloured by outcome. The table is a row per trial with named columns
(``csv_rows``), not ``study.trials_dataframe()``: Optuna's ``value`` column holds a pruned trial's
last Local TPE next to the complete trials' Global TPE. A plot that cannot be drawn (no
complete trial yet, a single trial, a missing plotting package) is one line of warning, never a
failed export, and every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nkat_search.atomic import atomic_path

TRIALS_CSV = "trials.csv"
# (file stem, optuna.visualization.matplotlib function, needs complete trials)
PLOTS = (
    ("optimization_history", "plot_optimization_history", True),
    ("param_importances", "plot_param_importances", True),
    ("parallel_coordinate", "plot_parallel_coordinate", True),
    ("intermediate_values", None, False),  # learning_curves below
    ("timeline", "plot_timeline", False),
)
# Optuna's plots put a legend entry per trial; past this many the legend is taller than the plot
# (a Round 2 study has hundreds of trials), so it is dropped.
MAX_LEGEND_ENTRIES = 20
# The parallel-coordinate plot shows this many parameters, the most important first: past that
# the axes' tick labels run into each other and nobody follows a line across.
PARALLEL_PARAMS = 5
# Learning curves by outcome: the ones that scored in strong colours, the stopped ones muted.
OUTCOME_STYLE = {  # outcome: (colour, line width, drawn above the others)
    "complete": ("#1f6fb4", 2.0, 4), "infeasible": ("#e08a1e", 1.6, 3),
    "running": ("#2ca02c", 1.6, 3), "gate_failed": ("#c0392b", 1.2, 2),
    "pruned": ("#8c8c8c", 1.0, 1), "failed": ("#5b2c6f", 1.0, 1),
    "interrupted": ("#5b2c6f", 1.0, 1),
}


@dataclass
class StudyFiles:
    written: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_study_files(study, out_dir: str | Path) -> StudyFiles:
    """``trials.csv`` and the PNG plots of ``study`` into ``out_dir``; what was written and why not.

    Needs at least one trial; with no complete trial, only the plots that need none are drawn
    (intermediate values, which pruned and gate-failed trials have, and the timeline).
    """
    from optuna.trial import TrialState  # Optuna: not at load, so `up --help` stays fast

    out_dir = Path(out_dir)
    result = StudyFiles()
    trials = study.get_trials(deepcopy=False)
    if not trials:
        result.warnings.append(f"study '{study.study_name}' has no trial yet: no plots and no "
                               f"{TRIALS_CSV}")
        return result
    _attempt(result, TRIALS_CSV, lambda: _write_csv(study, out_dir / TRIALS_CSV))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    skipped = [stem for stem, _, needs_complete in PLOTS if needs_complete and not complete]
    if skipped:
        result.warnings.append(f"no complete trial yet ({len(trials)} trials, none complete): "
                               f"{', '.join(skipped)} not drawn")
    if not any(t.intermediate_values for t in trials):
        skipped.append("intermediate_values")
        result.warnings.append("no trial has reported an intermediate value: "
                               "intermediate_values not drawn")
    try:
        vis, pyplot = _plotting()
    except ImportError as err:
        result.warnings.append(f"plots not drawn: {err} (pip install matplotlib)")
        return result
    # The value's axis says what it is ("Global TPE", the study's metric name), not "Objective Value".
    names = getattr(study, "metric_names", None) or []
    target = {"target_name": names[0]} if names else {}
    for stem, function, needs_complete in PLOTS:
        if stem not in skipped:
            path = out_dir / f"{stem}.png"
            kwargs = dict(target) if needs_complete else {}
            plot = getattr(vis, function) if function else learning_curves
            if stem == "parallel_coordinate":
                plot, kwargs["params"] = readable_parallel_coordinate, important_params(study)
            _attempt(result, path.name, lambda f=plot, p=path, k=kwargs:
                     _save_plot(f, pyplot, study, p, result.warnings, **k))
    return result


def _attempt(result: StudyFiles, name: str, write) -> None:
    # Whatever goes wrong with one file (a plot Optuna refuses, a dataframe column that does not
    # convert) is that file's warning; the export and the other files go on.
    try:
        result.written.append(write())
    except Exception as err:  # noqa: BLE001 - see above
        message = " ".join(str(err).split()) or type(err).__name__
        result.warnings.append(f"{name} not written: {message[:200]}")


def csv_rows(trials) -> list[dict]:
    """One flat dict per trial, the columns of ``trials.csv`` (names without spaces).

    ``global_tpe`` is the study's value of a complete trial only; ``local_tpe`` the last Local
    TPE@CIFAR10 a trial reported (a pruned trial's too) at epoch ``local_tpe_epoch``;
    ``constraint_<name>`` Optuna's constraint value (met when <= 0) beside the measured
    ``consistency`` and ``robustness``. The config is in the exported files, not here.
    """
    # Optuna loads with these: not at load, so `up --help` stays fast.
    from optuna.trial import TrialState

    from nkat_search.search import trials as trial_record
    from nkat_search.search.trials import TrialRecord

    retry_of = trial_record.retry_trials(trials)
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        record = TrialRecord.of(t)
        last = max(t.intermediate_values) if t.intermediate_values else None
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        row = {
            "number": t.number, "state": t.state.name, "outcome": trial_record.outcome(t),
            "feasible": trial_record.feasible(t),
            "global_tpe": t.value if t.state == TrialState.COMPLETE else None,
            "local_tpe": t.intermediate_values[last] if last is not None else record.local_tpe,
            "local_tpe_epoch": last,
            "consistency": record.consistency, "robustness": record.robustness,
            **{f"constraint_{name}": value for name, value in t.constraints.items()},
            "reason": trial_record.stop_reason(t, retry_of.get(t.number)) or None,
        }
        for name, score in record.datasets.items():
            row.update({f"accuracy_{name}": score.accuracy, f"tpe_{name}": score.tpe,
                        f"lambda_{name}": score.lam})
        row["missing_datasets"] = " ".join(record.missing_datasets) or None
        row.update({f"params_{name}": value for name, value in t.params.items()})
        row.update({
            "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
            "duration_s": seconds, "worker": record.worker, "error": record.error,
            "retry_of": t.system_attrs.get("failed_trial"), **record.timings,
        })
        rows.append(row)
    return rows


def _write_csv(study, path: Path) -> Path:
    import pandas as pd  # at call time: a missing pandas is this file's warning, not an error

    frame = pd.DataFrame(csv_rows(study.get_trials(deepcopy=False)))
    # Whole epochs and trial numbers stay integers where a column has gaps.
    for column in ("local_tpe_epoch", "retry_of"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def important_params(study, top: int = PARALLEL_PARAMS) -> list[str]:
    """The ``top`` searched parameters that most explain the value, among those that vary.

    Optuna's default importance (PED-ANOVA in Optuna 5) over the complete trials; a parameter
    with one value in every trial is left out (its axis says nothing, and Optuna drew it as a
    range around the value).
    """
    # Optuna loads with these: not at load, so `up --help` stays fast.
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [name for name in dict.fromkeys(n for t in complete for n in t.params)
               if len({repr(t.params.get(name)) for t in complete}) > 1]
    if len(varying) <= top:
        return varying
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranked = optuna.importance.get_param_importances(study, params=varying)
    except (RuntimeError, ValueError):  # too few trials to rank: the study's order
        return varying[:top]
    return list(ranked)[:top]


def readable_parallel_coordinate(study, params, target_name=None):
    """Optuna's parallel-coordinate plot of ``params``, redrawn to be read.

    Optuna's draws every line in "Blues", where the low values are near-white on a grey
    background, puts the legend over the title and the tick labels over the lines. Here:
    viridis (low values dark, the high ones green), a white background, the title above, and each axis labelled
    below the plot.
    """
    # At call time: a missing matplotlib is a warning, not an error (and `up --help` stays fast).
    import numpy as np
    import optuna.visualization.matplotlib as vis
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    # viridis without its last yellows, which vanish on white.
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.82, 256)))
    kwargs = {"target_name": target_name} if target_name else {}
    ax = vis.plot_parallel_coordinate(study, params=params or None, **kwargs)
    figure = ax.figure
    ax.set_facecolor("white")
    for collection in ax.collections:
        if collection.get_array() is not None:
            collection.set_cmap(cmap)
            collection.set_linewidth(2.0)
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    ax.set_title(f"Parallel coordinates: the {len(params)} most important parameters, "
                 f"lines coloured by {target_name or 'value'}", pad=14)
    ax.tick_params(axis="x", labelrotation=0, pad=8)
    for label in ax.get_xticklabels():
        label.set_fontweight("bold")
    for axis in figure.axes:  # Optuna's twin axes, one per parameter, and the colour bar
        # Their white grid lines (the ggplot style) cut the lines below into dots.
        axis.grid(False)
    figure.set_size_inches(max(9, 2.2 * (len(params) + 1)), 5.5)
    return ax


def learning_curves(study):
    """Every trial's Local TPE@CIFAR10 per epoch, coloured by how the trial ended.

    Optuna's intermediate-values plot gives each trial a pastel colour of its own and puts epoch
    ticks at 1.25; the story of the search is which curves the pruner and the gate stopped, so
    the colour is the outcome (a complete trial that misses the constraints has its own), the
    epochs are whole, and the gate is a dashed line.
    """
    # At call time: a missing matplotlib is a warning, not an error (and `up --help` stays fast).
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from nkat_search.search import trials as trial_record

    figure, ax = plt.subplots(figsize=(9, 5.5))
    ax.set_facecolor("white")
    seen = {}
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        kind = trial_record.outcome(t)
        if kind == "complete" and not trial_record.feasible(t):
            kind = "infeasible"
        colour, width, order = OUTCOME_STYLE.get(kind, OUTCOME_STYLE["failed"])
        steps = sorted(t.intermediate_values)
        label = None if kind in seen else {"infeasible": "complete, infeasible"}.get(
            kind, kind.replace("_", "-"))
        seen[kind] = True
        ax.plot(steps, [t.intermediate_values[s] for s in steps], color=colour, linewidth=width,
                marker="o", markersize=3 + width, zorder=order, label=label, alpha=0.9)
    gate = study.user_attrs.get("gate")
    if isinstance(gate, (int, float)):
        ax.axhline(gate, color="#c0392b", linestyle="--", linewidth=1, zorder=0,
                   label=f"gate {gate:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(trial_record.INTERMEDIATE_NAME)
    ax.set_title(f"Learning curves of study {study.study_name}, by outcome")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", frameon=False)
    return ax


def _plotting():
    """(Optuna's matplotlib visualisation module, pyplot), headless unless a backend was chosen."""
    # At call time: a missing matplotlib is a warning, not an error (and `up --help` stays fast).
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        # No display on a server or in a container. A caller that already chose a backend (a
        # notebook) keeps it; saving a figure works on any backend.
        matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    import optuna.visualization.matplotlib as vis

    return vis, pyplot


def _save_plot(plot, pyplot, study, path: Path, notes: list[str], **kwargs) -> Path:
    """Draw ``plot(study)`` into the PNG ``path``; Optuna's notes on the data go to ``notes``."""
    import numpy as np  # not at load, so `up --help` stays fast

    with warnings.catch_warnings(record=True) as caught:
        # Everything is recorded, so neither the matplotlib backend's ExperimentalWarning nor
        # matplotlib's axis-limit remarks reach the terminal; only what Optuna's importance
        # evaluators say about the data (too few trials to rank parameters) is passed on.
        warnings.simplefilter("always")
        axes = np.asarray(plot(study, **kwargs)).ravel()
        figure = axes[0].figure
        try:
            for ax in axes:
                legend = ax.get_legend()
                if legend is not None and len(legend.get_texts()) > MAX_LEGEND_ENTRIES:
                    legend.remove()
            figure.set_size_inches(max(figure.get_figwidth(), 9), max(figure.get_figheight(), 5.5))
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        finally:
            pyplot.close(figure)
    for warning in caught:
        if "importance" in Path(warning.filename).parts:
            notes.append(f"{path.name}: {' '.join(str(warning.message).split())}")
    return path
