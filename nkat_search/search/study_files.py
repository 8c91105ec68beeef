"""A study as files to look at without the dashboard: Optuna's plots as PNG and a trials CSV.

``export`` and ``up`` write these next to the best-trial configs. The plots are Optuna's own
(``optuna.visualization.matplotlib``, drawn headless by matplotlib's Agg backend) and the table is
``study.trials_dataframe()``; nothing here re-implements a chart. A plot that cannot be drawn (no
complete trial yet, a single trial, a missing plotting package) is one line of warning, never a
failed export, and every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

TRIALS_CSV = "trials.csv"
# The trial columns of the CSV; system attrs are Optuna's bookkeeping and stay out.
CSV_ATTRS = ("number", "state", "value", "datetime_start", "datetime_complete", "duration",
             "params", "user_attrs")
# (file stem, optuna.visualization.matplotlib function, needs complete trials)
PLOTS = (
    ("optimization_history", "plot_optimization_history", True),
    ("param_importances", "plot_param_importances", True),
    ("parallel_coordinate", "plot_parallel_coordinate", True),
    ("intermediate_values", "plot_intermediate_values", False),
    ("timeline", "plot_timeline", False),
)
# Optuna's intermediate-values plot has a legend entry per trial; past this many the legend is
# taller than the plot (a Round 2 study has hundreds of trials), so it is dropped.
MAX_LEGEND_ENTRIES = 20


@dataclass
class StudyFiles:
    written: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_study_files(study, out_dir: str | Path) -> StudyFiles:
    """``trials.csv`` and the PNG plots of ``study`` into ``out_dir``; what was written and why not.

    Needs at least one trial; with no complete trial, only the plots that need none are drawn
    (intermediate values, which pruned and gate-failed trials have, and the timeline).
    """
    from optuna.trial import TrialState

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
            kwargs = target if needs_complete else {}
            _attempt(result, path.name, lambda f=function, p=path, k=kwargs:
                     _save_plot(getattr(vis, f), pyplot, study, p, result.warnings, **k))
    return result


def _attempt(result: StudyFiles, name: str, write) -> None:
    # Whatever goes wrong with one file (a plot Optuna refuses, a dataframe column that does not
    # convert) is that file's warning; the export and the other files go on.
    try:
        result.written.append(write())
    except Exception as err:  # noqa: BLE001 - see above
        message = " ".join(str(err).split()) or type(err).__name__
        result.warnings.append(f"{name} not written: {message[:200]}")


def _write_csv(study, path: Path) -> Path:
    from nkat_search.atomic import atomic_path

    frame = study.trials_dataframe(attrs=CSV_ATTRS)
    # Nested user attrs (the trial's config, the per-dataset results) as JSON, not Python reprs.
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(
                lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _plotting():
    """(Optuna's matplotlib visualisation module, pyplot), headless unless a backend was chosen."""
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
    import numpy as np

    from nkat_search.atomic import atomic_path

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
