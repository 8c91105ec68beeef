"""The search space: a ``StudySpec`` turned into ``trial.suggest_*`` calls and back into a config."""

from __future__ import annotations

from typing import Any

from nkat_search.config import RunConfig
from nkat_search.search.spec import ParamSpec, StudySpec


def suggest(trial, param: ParamSpec) -> Any:
    """One ``trial.suggest_*`` call for one searched field."""
    if param.type == "categorical":
        return trial.suggest_categorical(param.name, param.choices)
    if param.type == "int":
        return trial.suggest_int(param.name, param.low, param.high, step=param.step or 1,
                                 log=param.log)
    return trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)


def suggest_config(trial, spec: StudySpec) -> RunConfig:
    """The trial's config: the baseline, then the study's ``fixed`` values, then the suggestions.

    Suggestions are made in the file's order, so the parameter names and distributions are the
    same in every trial (the multivariate TPE needs a fixed space).
    """
    values = {name: suggest(trial, param) for name, param in spec.search.items()}
    return RunConfig.from_dict(values, base=spec.base_config())


def enqueue(study, spec: StudySpec) -> int:
    """Queue the file's ``enqueue`` configs (the user's baseline first); returns how many.

    Only searched keys are passed: the rest of each config is the fixed recipe already, which
    ``study.py`` checked when the file was loaded.
    """
    for params in spec.enqueue:
        study.enqueue_trial({k: v for k, v in params.items() if k in spec.search},
                            skip_if_exists=True)
    return len(spec.enqueue)
