"""Best-trial export: each of the top K complete trials as a config file that ``train`` re-runs.

A file holds three sections. ``config`` is the flat ``RunConfig.to_dict()`` of the trial (so
``nkat-search train --config FILE`` and ``stage2 --config FILE`` accept it as is), ``metrics`` is
what the objective measured, ``study`` says where it came from (study name, the hash of the study
file that defined the search, trial number). Every file is written to a temporary name and renamed,
so a crash never leaves a half-written export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nkat_search.errors import UserError

METRIC_ATTRS = ("global_tpe", "consistency", "robustness", "local_tpe", "cifar10_accuracy",
                "lambda", "datasets", "missing_datasets")


class NothingToExport(UserError):
    """The study has no complete trial yet."""


def best_trials(study, top: int) -> list:
    """The ``top`` complete trials, best value first (ties: the earlier trial first)."""
    import optuna
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    return complete[:top]


def trial_document(study, trial) -> dict[str, Any]:
    """The exported mapping for one trial; its config is validated the way ``train`` will read it."""
    from nkat_search.config import ConfigError, RunConfig

    stored = trial.user_attrs.get("config")
    if not isinstance(stored, dict):
        raise UserError(f"trial {trial.number} of study '{study.study_name}' has no 'config' "
                        "user attribute; it was not written by an nkat-search worker")
    try:
        config = RunConfig.from_dict(stored).to_dict()
    except ConfigError as err:
        raise UserError(f"trial {trial.number}: its stored config is not valid ({err})") from None
    metrics = {name: trial.user_attrs.get(name) for name in METRIC_ATTRS}
    metrics["value"] = trial.value
    attrs = study.user_attrs
    return {
        "config": config,
        "metrics": metrics,
        "study": {
            "name": study.study_name,
            "study_file_name": attrs.get("study_file_name"),
            "study_file_hash": attrs.get("study_file_hash"),
            "trial": trial.number,
            "params": dict(trial.params),
        },
    }


def export_best(study, out_dir: str | Path, top: int = 1) -> list[Path]:
    """Write ``trial-<n>.yaml`` / ``.json`` for the best ``top`` trials and ``best.yaml`` / ``.json``.

    Returns the paths written, best trial first, ``best.*`` last. Raises ``NothingToExport`` when
    no trial has completed.
    """
    import yaml

    from nkat_search.atomic import write_text_atomic

    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    trials = best_trials(study, top)
    if not trials:
        raise NothingToExport(f"nothing to export yet: study '{study.study_name}' has no complete "
                              "trial")
    out_dir = Path(out_dir)
    written = []
    for rank, trial in enumerate(trials, start=1):
        doc = trial_document(study, trial)
        header = (f"# nkat-search export: study '{study.study_name}', trial {trial.number}, "
                  f"rank {rank} of {len(trials)}, value {trial.value:.6g}\n"
                  f"# re-run: nkat-search train --config FILE  (or stage2 --config FILE)\n")
        yaml_text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
        json_text = json.dumps(doc, indent=2) + "\n"
        names = [f"trial-{trial.number}"] + (["best"] if rank == 1 else [])
        for name in names:
            written.append(write_text_atomic(out_dir / f"{name}.yaml", yaml_text))
            written.append(write_text_atomic(out_dir / f"{name}.json", json_text))
    written.sort(key=lambda p: p.stem == "best")
    return written
