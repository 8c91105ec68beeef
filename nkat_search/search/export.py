"""Best-trial export: each of the top K complete trials as a config file that ``train`` re-runs.

A file holds three sections. ``config`` is the flat ``RunConfig.to_dict()`` of the trial (so
``nkat-search train --config FILE`` and ``stage2 --config FILE`` accept it as is), ``metrics`` is
what the objective measured (``feasible`` says whether it meets the study's constraints), ``study``
says where it came from (study name, the hashes of the study file and of its search definition,
trial number). The ranking is ``trials.ranked``: the study's best trial (``study.best_trial``)
first, then the other feasible trials, then the infeasible ones. Every file is written to a
temporary name and renamed, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nkat_search.atomic import write_text_atomic
from nkat_search.config import ConfigError, RunConfig
from nkat_search.errors import UserError
from nkat_search.search import trials as trial_record
from nkat_search.search.trials import TrialRecord


class NothingToExport(UserError):
    """The study has no complete trial yet."""


@dataclass
class Exported:
    """What ``export_best`` wrote: the paths (``best.*`` last) and the trials, best first."""

    asked: int
    paths: list[Path] = field(default_factory=list)
    trials: list[int] = field(default_factory=list)
    feasible: list[bool] = field(default_factory=list)

    def describe(self, out_dir: Path) -> str:
        """One line: how many were written, of how many asked, and how many are feasible."""
        n = len(self.trials)
        text = f"exported {n} trial(s) to {out_dir} (best: trial {self.trials[0]}, best.yaml)"
        if n < self.asked:
            text += f"; {self.asked} asked, but the study has only {n} complete"
        infeasible = [t for t, ok in zip(self.trials, self.feasible) if not ok]
        if infeasible:
            text += (f"; trial(s) {', '.join(map(str, infeasible))} miss the constraints "
                     "(metrics.feasible: false)")
        return text


def best_trials(study, top: int) -> list[trial_record.Best]:
    """The ``top`` complete trials by ``trials.ranked`` (the study's best first)."""
    return trial_record.ranked(study)[:top]


def trial_document(study, trial, feasible: bool) -> dict[str, Any]:
    """The exported mapping for one trial; its config is validated the way ``train`` will read it."""
    record = TrialRecord.of(trial)
    if not isinstance(record.config, dict):
        raise UserError(f"trial {trial.number} of study '{study.study_name}' has no 'config' "
                        "user attribute; it was not written by an nkat-search worker")
    try:
        config = RunConfig.from_dict(record.config).to_dict()
    except ConfigError as err:
        raise UserError(f"trial {trial.number}: its stored config is not valid ({err})") from None
    metrics = {
        "value": trial.value, "metric": trial_record.METRIC_NAME, "feasible": feasible,
        "global_tpe": record.global_tpe, "consistency": record.consistency,
        "robustness": record.robustness, "local_tpe": record.local_tpe, "lambda": record.lam,
        "datasets": {name: score.to_dict() for name, score in record.datasets.items()},
        "missing_datasets": record.missing_datasets,
        "constraints": dict(trial.constraints),
    }
    attrs = study.user_attrs
    return {
        "config": config,
        "metrics": metrics,
        "study": {
            "name": study.study_name,
            "study_file_name": attrs.get("study_file_name"),
            "study_file_hash": attrs.get("study_file_hash"),
            "search_hash": attrs.get("search_hash"),
            "trial": trial.number,
            "params": dict(trial.params),
        },
    }


def export_best(study, out_dir: str | Path, top: int) -> Exported:
    """Write ``trial-<n>.yaml`` / ``.json`` for the best ``top`` trials and ``best.yaml`` / ``.json``.

    Raises ``NothingToExport`` when no trial has completed.
    """
    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    ranked = best_trials(study, top)
    if not ranked:
        raise NothingToExport(f"nothing to export yet: study '{study.study_name}' has no complete "
                              "trial")
    out_dir = Path(out_dir)
    result = Exported(asked=top)
    best_paths = []
    for rank, found in enumerate(ranked, start=1):
        trial = found.trial
        doc = trial_document(study, trial, found.feasible)
        verdict = "meets the constraints" if found.feasible else "MISSES the constraints"
        header = (f"# nkat-search export: study '{study.study_name}', trial {trial.number}, "
                  f"rank {rank} of {len(ranked)}, {trial_record.METRIC_NAME} {trial.value:.6g}, "
                  f"{verdict}\n"
                  f"# re-run: nkat-search train --config FILE  (or stage2 --config FILE)\n")
        yaml_text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
        json_text = json.dumps(doc, indent=2) + "\n"
        names = [f"trial-{trial.number}"] + (["best"] if rank == 1 else [])
        for name in names:
            paths = [write_text_atomic(out_dir / f"{name}.yaml", yaml_text),
                     write_text_atomic(out_dir / f"{name}.json", json_text)]
            (best_paths if name == "best" else result.paths).extend(paths)
        result.trials.append(trial.number)
        result.feasible.append(found.feasible)
    result.paths += best_paths
    _remove_earlier_exports(study.study_name, out_dir, keep=set(result.paths))
    return result


def _remove_earlier_exports(study_name: str, out_dir: Path, keep: set[Path]) -> None:
    """An export into the folder of an earlier one replaces it: the earlier export's trial files
    that are not in this one (a trial no longer in the top K) go. Only this study's exports are
    touched (the YAML's first line, the JSON's ``study.name``); any other file stays."""
    for path in [*out_dir.glob("trial-*.yaml"), *out_dir.glob("trial-*.json")]:
        if path in keep:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".yaml":
                ours = text.startswith(f"# nkat-search export: study '{study_name}', ")
            else:
                ours = json.loads(text).get("study", {}).get("name") == study_name
        except (OSError, ValueError, AttributeError):
            continue
        if ours:
            path.unlink(missing_ok=True)
